"""Integrations and their keys against the real PostgreSQL (no Kafka needed).

Every test works in throw-away databases (``cstest_<uuid8>_<tenant>``),
dropped at the end of the module.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import asyncpg
import orjson
import pytest

from sinks.postgres import database_name
from streams.config import PROJECT_ROOT, load_tenants
from streams.domain.auth import hash_key, key_tenant, new_key
from streams.integrations import KINDS, Integration, IntegrationError, IntegrationStore

pytestmark = pytest.mark.integration

TENANT = "on-call"


class FakeClock:
    """The store's cache clock (validity itself is PostgreSQL's clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Env:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.prefix = f"cstest_{uuid.uuid4().hex[:8]}_"
        self.tenants = load_tenants()

    def store(self, cache_seconds: float = 0.0, **kw) -> IntegrationStore:
        return IntegrationStore(self.dsn, self.prefix, self.tenants, cache_seconds=cache_seconds, **kw)

    async def fetch(self, tenant: str, sql: str, *args) -> list[dict]:
        conn = await asyncpg.connect(self.dsn, database=database_name(tenant, self.prefix))
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    def drop(self) -> None:
        async def run():
            conn = await asyncpg.connect(self.dsn)
            try:
                like = self.prefix.replace("_", r"\_") + "%"
                for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", like):
                    await conn.execute(f'DROP DATABASE IF EXISTS "{r["datname"]}" WITH (FORCE)')
            finally:
                await conn.close()

        asyncio.run(run())


@pytest.fixture(scope="module")
def pg(engine_set):
    env = Env(engine_set.env["POSTGRES_DSN"])
    yield env
    env.drop()


def run(coro):
    return asyncio.run(coro)


async def _with(store: IntegrationStore, fn):
    try:
        return await fn(store)
    finally:
        await store.close()


# --------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------


def test_create_then_authenticate(pg):
    async def scenario(store):
        integ, key = await store.create(TENANT, "alertmanager", "prod alertmanager", {"dedup_by": "group"})
        assert integ.id.startswith("int_") and len(integ.id) == 16
        assert (integ.tenant, integ.kind, integ.name, integ.options) == (
            TENANT, "alertmanager", "prod alertmanager", {"dedup_by": "group"})
        assert integ.signing_secret is None and integ.revoked_at is None
        assert key_tenant(key) == TENANT and len(key) == len(f"cs_{TENANT}_") + 32
        got = await store.authenticate(key)
        assert isinstance(got, Integration)
        assert got == integ
        signed, skey = await store.create(TENANT, "grafana", "grafana", signed=True)
        assert signed.signing_secret.startswith("whsec_") and len(signed.signing_secret) == 6 + 32
        assert (await store.authenticate(skey)).signing_secret == signed.signing_secret
        other, okey = await store.create("case-management", "events", "cm events")
        assert key_tenant(okey) == "case-management"
        assert (await store.authenticate(okey)).tenant == "case-management"
        # what is not ours: foreign format, unknown tenant, unknown key, a key of one tenant posing as another's
        random_part = key[len(f"cs_{TENANT}_"):]
        for bad in ("", "nonsense", key + "x", key.upper(), new_key("nope", "a" * 32),
                    new_key(TENANT, "b" * 32), new_key("case-management", random_part)):
            assert await store.authenticate(bad) is None, bad

    run(_with(pg.store(), scenario))


def test_store_migrates_the_tenant_database_on_first_use(pg):
    run(_with(pg.store(), lambda s: s.list("case-management")))
    rows = run(pg.fetch("case-management", "SELECT name FROM schema_migrations ORDER BY version"))
    assert "0003_integrations.sql" in [r["name"] for r in rows]


def test_no_plaintext_key_is_stored(pg):
    async def scenario(store):
        integ, key = await store.create(TENANT, "datadog", "dd", signed=True)
        key2 = await store.rotate(TENANT, integ.id, 3600)
        tables = await pg.fetch(TENANT, "SELECT row_to_json(k)::text AS r FROM integration_keys k "
                                        "UNION ALL SELECT row_to_json(i)::text FROM integrations i")
        dump = "\n".join(r["r"] for r in tables)
        for k in (key, key2):
            assert k not in dump
            assert k.split("_", 2)[2] not in dump        # not even the random part
            assert hash_key(k) in dump
        assert integ.signing_secret in dump                 # the verifier needs it: stored as is
        listed = orjson.dumps(await store.list(TENANT)).decode()
        for secret in (key, key2, hash_key(key), hash_key(key2), integ.signing_secret):
            assert secret not in listed

    run(_with(pg.store(), scenario))


def test_rotate_overlap_then_only_the_new_key(pg):
    async def scenario(store):
        integ, k1 = await store.create(TENANT, "alertmanager", "am")
        k2 = await store.rotate(TENANT, integ.id, 3600)
        assert k2 != k1 and key_tenant(k2) == TENANT
        assert (await store.authenticate(k1)).id == integ.id       # both valid during the overlap
        assert (await store.authenticate(k2)).id == integ.id
        keys = next(i for i in await store.list(TENANT) if i["id"] == integ.id)["keys"]
        assert [k["valid"] for k in keys] == [True, True]
        assert keys[0]["expires_at"] == keys[1]["created_at"] + timedelta(seconds=3600)
        assert keys[1]["expires_at"] is None
        # no overlap: every earlier key stops at once
        k3 = await store.rotate(TENANT, integ.id, 0)
        assert await store.authenticate(k1) is None
        assert await store.authenticate(k2) is None
        assert (await store.authenticate(k3)).id == integ.id
        keys = next(i for i in await store.list(TENANT) if i["id"] == integ.id)["keys"]
        assert [k["valid"] for k in keys] == [False, False, True]

    run(_with(pg.store(), scenario))


def test_overlap_ends_by_the_clock(pg):
    async def scenario(store):
        integ, k1 = await store.create(TENANT, "events", "ev")
        k2 = await store.rotate(TENANT, integ.id, 1)
        assert (await store.authenticate(k1)) is not None and (await store.authenticate(k2)) is not None
        deadline = time.monotonic() + 15
        while await store.authenticate(k1) is not None:
            assert time.monotonic() < deadline, "the old key outlived its 1 s overlap"
            await asyncio.sleep(0.2)
        assert (await store.authenticate(k2)).id == integ.id

    run(_with(pg.store(), scenario))


def test_rotation_never_extends_an_expiry(pg):
    async def scenario(store):
        integ, k1 = await store.create(TENANT, "events", "ev")
        await store.rotate(TENANT, integ.id, 600)
        await store.rotate(TENANT, integ.id, 86400)
        keys = next(i for i in await store.list(TENANT) if i["id"] == integ.id)["keys"]
        assert keys[0]["expires_at"] == keys[1]["created_at"] + timedelta(seconds=600)   # not pushed out
        assert keys[1]["expires_at"] == keys[2]["created_at"] + timedelta(seconds=86400)
        await store.rotate(TENANT, integ.id, 0)
        await store.rotate(TENANT, integ.id, 86400)                                   # does not resurrect
        keys = next(i for i in await store.list(TENANT) if i["id"] == integ.id)["keys"]
        assert [k["valid"] for k in keys] == [False, False, False, True, True]
        assert await store.authenticate(k1) is None

    run(_with(pg.store(), scenario))


def test_revoke(pg):
    async def scenario(store):
        integ, k1 = await store.create(TENANT, "pagerduty", "pd")
        k2 = await store.rotate(TENANT, integ.id, 3600)
        other, k3 = await store.create(TENANT, "pagerduty", "pd 2")
        await store.revoke(TENANT, integ.id)
        assert await store.authenticate(k1) is None and await store.authenticate(k2) is None
        assert (await store.authenticate(k3)).id == other.id          # other integrations are untouched
        listed = next(i for i in await store.list(TENANT) if i["id"] == integ.id)
        assert listed["revoked_at"] is not None
        assert all(not k["valid"] and k["revoked_at"] is not None for k in listed["keys"])
        await store.revoke(TENANT, integ.id)                             # idempotent
        again = next(i for i in await store.list(TENANT) if i["id"] == integ.id)
        assert again["revoked_at"] == listed["revoked_at"]
        with pytest.raises(IntegrationError, match="revoked"):
            await store.rotate(TENANT, integ.id)

    run(_with(pg.store(), scenario))


def test_errors_say_what_to_do(pg):
    async def scenario(store):
        with pytest.raises(IntegrationError, match="unknown tenant 'nope'.*on-call"):
            await store.create("nope", "events", "x")
        with pytest.raises(IntegrationError, match="unknown kind 'nagios'; use one of pagerduty"):
            await store.create(TENANT, "nagios", "x")
        with pytest.raises(IntegrationError, match="name"):
            await store.create(TENANT, "events", "  ")
        with pytest.raises(IntegrationError, match="options"):
            await store.create(TENANT, "events", "x", {"a": object()})
        for fn in (store.rotate, store.revoke):
            with pytest.raises(IntegrationError, match="no integration 'int_000000000000'.*integrations list"):
                await fn(TENANT, "int_000000000000")
            with pytest.raises(IntegrationError, match="no integration"):
                await fn(TENANT, "'; DROP TABLE integrations; --")
            with pytest.raises(IntegrationError, match="unknown tenant"):
                await fn("nope", "int_000000000000")
        integ, _ = await store.create(TENANT, "events", "x")
        with pytest.raises(IntegrationError, match="overlap"):
            await store.rotate(TENANT, integ.id, -1)
        with pytest.raises(IntegrationError, match="unknown tenant"):
            await store.list("nope")
        assert set(KINDS) == {"pagerduty", "alertmanager", "grafana", "datadog", "events", "slack"}

    run(_with(pg.store(), scenario))


def test_cache_keeps_a_revoked_key_valid_until_the_entry_expires(pg):
    """Another process revokes: a gateway with cache_seconds=60 keeps answering
    from its cache until the entry expires; one with cache_seconds=0 sees it at once."""
    clock = FakeClock()

    async def scenario():
        admin, cached, uncached = pg.store(), pg.store(60, clock=clock), pg.store(0)
        try:
            integ, key = await admin.create(TENANT, "alertmanager", "am")
            unknown = new_key(TENANT, "u" * 32)
            assert (await cached.authenticate(key)).id == integ.id
            assert await cached.authenticate(unknown) is None              # negative results are cached too
            await admin.revoke(TENANT, integ.id)
            assert await uncached.authenticate(key) is None
            fresh = pg.store(60, clock=FakeClock())                       # a fresh store: nothing cached
            assert await _with(fresh, lambda s: s.authenticate(key)) is None
            clock.now += 59
            assert (await cached.authenticate(key)).id == integ.id        # still cached: revocation not seen
            clock.now += 2
            assert await cached.authenticate(key) is None                  # entry expired: revocation seen
            # the process that revokes drops its own entries at once
            integ2, key2 = await cached.create(TENANT, "alertmanager", "am2")
            assert (await cached.authenticate(key2)).id == integ2.id
            await cached.revoke(TENANT, integ2.id)
            assert await cached.authenticate(key2) is None
        finally:
            for s in (admin, cached, uncached):
                await s.close()

    run(scenario())


def test_cache_entry_does_not_outlive_the_key(pg):
    clock = FakeClock()

    async def scenario():
        admin, cached = pg.store(), pg.store(60, clock=clock)
        try:
            integ, k1 = await admin.create(TENANT, "events", "ev")
            await admin.rotate(TENANT, integ.id, 2)
            assert (await cached.authenticate(k1)).id == integ.id
            expires, _ = cached._cache[hash_key(k1)]
            assert expires - clock.now <= 2                              # bounded by the key's expiry, not 60 s
        finally:
            await admin.close()
            await cached.close()

    run(scenario())


def test_concurrent_lookups_share_one_query(pg):
    async def scenario():
        admin, cached = pg.store(), pg.store(60)
        try:
            integ, key = await admin.create(TENANT, "events", "ev")
            calls = 0
            original = cached._lookup

            async def counting(tenant, h):
                nonlocal calls
                calls += 1
                return await original(tenant, h)

            cached._lookup = counting
            results = await asyncio.gather(*(cached.authenticate(key) for _ in range(50)))
            assert all(r is not None and r.id == integ.id for r in results)
            assert calls == 1 and not cached._inflight
            assert (await cached.authenticate(key)).id == integ.id and calls == 1
        finally:
            await admin.close()
            await cached.close()

    run(scenario())


# --------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------


def cli(pg, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CASESTREAM_DB_PREFIX=pg.prefix, POSTGRES_DSN=pg.dsn, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "streams.cli", "integrations", *args], env=env,
                          cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120)


def cli_json(pg, *args: str):
    p = cli(pg, *args, "--json")
    assert p.returncode == 0, p.stderr
    return orjson.loads(p.stdout)


def authenticate(pg, key: str) -> Integration | None:
    return run(_with(pg.store(), lambda s: s.authenticate(key)))


def test_cli_create_list_rotate_revoke(pg):
    created = cli_json(pg, "create", "--tenant", TENANT, "--kind", "alertmanager", "--name", "prod am",
                       "--option", "dedup_by=group", "--option", "max_alerts=5", "--signed")
    key, secret, iid = created["key"], created["signing_secret"], created["id"]
    assert key_tenant(key) == TENANT and secret.startswith("whsec_") and iid.startswith("int_")
    assert created["options"] == {"dedup_by": "group", "max_alerts": 5}
    assert created["signed"] is True and created["kind"] == "alertmanager" and created["tenant"] == TENANT
    assert created["path"] == f"/v1/integrations/{key}/alertmanager"
    assert created["use"] == f"POST /v1/integrations/{key}/alertmanager"
    got = authenticate(pg, key)
    assert got.id == iid and got.signing_secret == secret

    pd = cli_json(pg, "create", "--tenant", TENANT, "--kind", "pagerduty", "--name", "pd")
    assert pd["use"] == f"POST /v2/enqueue with routing_key={pd['key']}" and pd["path"] == "/v2/enqueue"
    assert "signing_secret" not in pd

    table = cli(pg, "create", "--tenant", TENANT, "--kind", "grafana", "--name", "graf")
    assert table.returncode == 0, table.stderr
    assert "cs_on-call_" in table.stdout and "shown only this once" in table.stdout

    listed = cli_json(pg, "list", "--tenant", TENANT)
    mine = next(i for i in listed if i["id"] == iid)
    assert mine["signed"] is True and mine["options"] == {"dedup_by": "group", "max_alerts": 5}
    assert [k["valid"] for k in mine["keys"]] == [True]
    list_table = cli(pg, "list", "--tenant", TENANT)
    assert list_table.returncode == 0 and iid in list_table.stdout and "prod am" in list_table.stdout
    for out in (orjson.dumps(listed).decode(), list_table.stdout):
        for s in (key, secret, hash_key(key), pd["key"], hash_key(pd["key"])):
            assert s not in out

    rotated = cli_json(pg, "rotate", "--tenant", TENANT, iid, "--overlap", "30m")
    new = rotated["key"]
    assert new != key and key_tenant(new) == TENANT and rotated["overlap_seconds"] == 1800
    assert rotated["use"] == f"POST /v1/integrations/{new}/alertmanager"
    assert "signing_secret" not in rotated                          # the secret is not shown again
    assert [k["valid"] for k in rotated["keys"]] == [True, True]
    assert rotated["keys"][0]["expires_at"] is not None and rotated["keys"][1]["expires_at"] is None
    assert authenticate(pg, key).id == iid and authenticate(pg, new).id == iid

    revoked = cli_json(pg, "revoke", "--tenant", TENANT, iid)
    assert revoked["id"] == iid and revoked["revoked_at"] is not None
    assert not any(k["valid"] for k in revoked["keys"])
    assert authenticate(pg, key) is None and authenticate(pg, new) is None
    assert authenticate(pg, pd["key"]).kind == "pagerduty"


@pytest.mark.parametrize("args, message", [
    (["create", "--tenant", "nope", "--kind", "events", "--name", "x"], "unknown tenant 'nope'"),
    (["create", "--tenant", TENANT, "--kind", "events", "--name", "x", "--option", "novalue"], "--option"),
    (["rotate", "--tenant", TENANT, "int_000000000000"], "no integration 'int_000000000000'"),
    (["revoke", "--tenant", TENANT, "int_000000000000"], "no integration 'int_000000000000'"),
    (["rotate", "--tenant", TENANT, "int_000000000000", "--overlap", "soon"], "--overlap"),
    (["create", "--tenant", TENANT, "--kind", "nagios", "--name", "x"], "invalid choice"),
    (["list"], "--tenant"),
])
def test_cli_errors_exit_2_with_a_clear_message(pg, args, message):
    p = cli(pg, *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_cli_durations(pg):
    created = cli_json(pg, "create", "--tenant", TENANT, "--kind", "events", "--name", "durations")
    for text, seconds in (("90s", 90), ("30m", 1800), ("24h", 86400), ("1h30m", 5400), ("2d", 172800),
                          ("45", 45)):
        assert cli_json(pg, "rotate", "--tenant", TENANT, created["id"], "--overlap", text)["overlap_seconds"] \
            == seconds
