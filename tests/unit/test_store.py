"""streams/store.py: the worker's RocksDB databases share one memory budget (real rocksdict
databases in a temporary directory; no broker)."""

from __future__ import annotations

import os

import pytest

from streams import store


@pytest.fixture()
def budget():
    store.set_budget(16)     # MiB
    yield 16 * 2**20
    store.set_budget(128)


def _options():
    return store.BudgetOptions(use_rocksdict=True)


def test_every_database_shares_the_one_cache_and_write_buffer_manager(budget):
    a, b = _options(), _options()
    assert store.shared() == store.shared()
    a.as_options(), b.as_options()
    assert store.usage()["budget"] == budget


def test_writes_to_many_databases_stay_within_the_budget(tmp_path, budget):
    dbs = [_options().open(tmp_path / f"t-{i}.db") for i in range(8)]
    try:
        value = os.urandom(2000)
        for n in range(20_000):       # 40 MB of values across 8 databases: 2.5 x the budget
            dbs[n % 8][b"k%08d" % n] = value
        used = store.usage()
        # charged to the cache, the memtables keep under their share (RocksDB flushes early);
        # Faust's defaults would hold all 40 MB in eight 64 MiB memtables
        assert used["memtables"] <= budget * store.MEMTABLE_SHARE * 1.25, used
        assert used["cache"] <= budget * 1.25, used
        assert dbs[3][b"k%08d" % 3] == value and dbs[7][b"k%08d" % 19_999] == value
    finally:
        for db in dbs:
            db.close()


def test_a_store_needs_the_rocksdict_driver():
    assert store.STORES.aliases[store.SCHEME] == "streams.store:Store"
