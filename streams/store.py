"""The worker's RocksDB stores under one memory budget.

Faust opens one RocksDB database per table partition (five tables x eight
partitions = 40 in an intake worker) and gives each its own 2 GiB block cache
and up to three 64 MiB memtables. Nothing of that is a leak, but a worker's
RSS then grows with what it writes until each database's memtables flush: in
a 150 000-event run the `keys` memtables alone held 46 MiB each (8 x) after
four minutes, and RSS climbed 50 MiB every 30 s.

Here every database of the process shares one LRU block cache and one write
buffer manager that charges memtables to that cache, so table state costs at
most ``CASESTREAM_STATE_MEMORY_MB`` (default 128) in all, whatever the number
of partitions or keys: a memtable is flushed early when the total would pass
it, and reads evict older blocks. Data lives on disk (the table directories)
and in the changelog topics; the budget only decides what stays in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faust.stores import STORES, rocksdb

SCHEME = "casestream-rocksdb"
MEMTABLE_SHARE = 0.5    # of the budget, at most, for memtables (the rest: read blocks)
MEMTABLES_PER_SHARE = 16   # one memtable of one database: this fraction of the share, at most 16 MiB (each
# database holds an arena block, an eighth of it, even when idle: 40 databases x 512 KiB at the default)

_shared: dict[str, Any] = {}


def set_budget(megabytes: float) -> None:
    """The budget of the databases opened from now on (``App`` sets it at start)."""
    _shared.clear()
    _shared["bytes"] = max(8 * 2**20, int(megabytes * 2**20))


def shared() -> tuple[Any, Any]:
    """The process's block cache and write buffer manager (made on first use)."""
    import rocksdict

    if "cache" not in _shared:
        budget = _shared.setdefault("bytes", 128 * 2**20)
        _shared["cache"] = rocksdict.Cache(budget)
        _shared["wbm"] = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            int(budget * MEMTABLE_SHARE), False, _shared["cache"])
    return _shared["cache"], _shared["wbm"]


def write_buffer_bytes() -> int:
    """The size of one database's memtable under the budget."""
    share = _shared.setdefault("bytes", 128 * 2**20) * MEMTABLE_SHARE
    return int(min(16 * 2**20, max(256 * 2**10, share / MEMTABLES_PER_SHARE)))


def usage() -> dict[str, int]:
    """Bytes held now: the block cache (memtables included) and the memtables alone."""
    if "cache" not in _shared:
        return {"budget": _shared.get("bytes", 0), "cache": 0, "memtables": 0}
    return {"budget": _shared["bytes"], "cache": _shared["cache"].get_usage(),
            "memtables": _shared["wbm"].get_usage()}


class BudgetOptions(rocksdb.RocksDBOptions):
    """Faust's rocksdict options, with the shared cache and write buffer manager."""

    def as_options(self):
        import rocksdict

        cache, wbm = shared()
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_open_files(self.max_open_files)
        opts.set_write_buffer_size(write_buffer_bytes())
        opts.set_max_write_buffer_number(2)
        opts.set_target_file_size_base(self.target_file_size_base)
        opts.set_write_buffer_manager(wbm)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, block_based=True)
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)   # index and filters count against the budget too
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        opts.set_block_based_table_factory(table)
        return opts

    def open(self, path: Path, *, read_only: bool = False):
        import rocksdict

        access = (rocksdict.AccessType.read_write() if self.ttl is None
                  else rocksdict.AccessType.with_ttl(self.ttl))
        db = rocksdict.Rdict(str(path), options=self.as_options(), access_type=access)
        db.set_read_options(rocksdict.ReadOptions())
        return db


class Store(rocksdb.Store):
    """Faust's RocksDB store (rocksdict driver) opening its databases under the budget."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.use_rocksdict:
            raise RuntimeError("casestream's stores need the rocksdict driver (options={'driver': 'rocksdict'})")
        o = self.rocksdb_options
        self.rocksdb_options = BudgetOptions(
            max_open_files=o.max_open_files, target_file_size_base=o.target_file_size_base,
            bloom_filter_size=o.bloom_filter_size, use_rocksdict=True, ttl=o.ttl)


STORES.aliases.setdefault(SCHEME, f"{__name__}:Store")
