"""streams.integrations.IntegrationStore's look-up cache (no PostgreSQL: the one query is
``_fetch``, counted here; tests/integration/test_integrations.py runs the store on a real server)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from streams.domain.auth import hash_key
from streams.integrations import IntegrationStore

GOOD = "cs_on-call_" + "G" * 32


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class CountingStore(IntegrationStore):
    """An IntegrationStore whose one query answers from a dict, counting the queries."""

    def __init__(self, clock, **kw):
        super().__init__("postgresql://unused", "casestream_", ["on-call"], clock=clock, **kw)
        self.rows = {hash_key(GOOD): {"id": "int_000000000001", "kind": "events", "name": "n", "options": "{}",
                                      "signing_secret": None, "created_at": datetime.now(timezone.utc),
                                      "revoked_at": None, "remaining": None}}
        self.queries = 0

    async def _fetch(self, tenant, h):
        self.queries += 1
        return self.rows.get(h)


def _made_up(i: int) -> str:
    return f"cs_on-call_{i:032d}"


def test_unknown_keys_are_cached_for_the_ttl():
    clock = Clock()
    store = CountingStore(clock)

    async def run():
        assert await store.authenticate(_made_up(1)) is None
        assert await store.authenticate(_made_up(1)) is None
        assert store.queries == 1
        clock.now += 5.01
        assert await store.authenticate(_made_up(1)) is None
        assert store.queries == 2
        # a key of a tenant that is not configured, or not a key: no query at all
        assert await store.authenticate("cs_elsewhere_" + "x" * 32) is None
        assert await store.authenticate("nonsense") is None
        assert store.queries == 2

    asyncio.run(run())


def test_a_flood_of_made_up_keys_neither_grows_the_cache_nor_evicts_good_keys():
    clock = Clock()
    store = CountingStore(clock)
    store.MAX_CACHE = 50
    store.MAX_MISSES = 20

    async def run():
        assert (await store.authenticate(GOOD)).id == "int_000000000001"
        for i in range(500):
            assert await store.authenticate(_made_up(i)) is None
        assert len(store._misses) <= 20 and len(store._cache) <= 50
        before = store.queries
        assert (await store.authenticate(GOOD)).id == "int_000000000001"   # still cached
        assert store.queries == before
        assert await store.authenticate(_made_up(499)) is None              # the newest misses are kept
        assert store.queries == before

    asyncio.run(run())
