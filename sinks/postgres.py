"""PostgreSQL projection: the current case and its timeline, per tenant.

One database per tenant on the server of ``POSTGRES_DSN``
(``<prefix><tenant>``, prefix ``casestream_`` by default, ``-`` becomes
``_``), created when absent, with versioned migrations from
``sinks/migrations/postgres`` recorded in ``schema_migrations``.

``write_batch`` runs one transaction: it inserts timeline rows (unique on
``(case_id, version)``: a redelivered event is a no-op), folds the new
events onto the stored case states (``case_states``) with the fold of
``sinks/base.py`` (events at or below a case's version are skipped; when
versions arrive out of order, the ones in between are read from the
timeline, as far as they have arrived), writes the case rows, and stores
the partition positions reached -- so a crash between write and commit
neither loses nor doubles anything. Positions are a record of progress, not a filter: skipping by
offset would silently drop a recreated topic's events.

The case row's columns are the fields of ``streams/domain/case_schema.py``
(the migrations create them). Case rows carry the on-call properties
(migration 0002), responders as full records with names and emails --
unlike the search index, which keeps ids.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

from sinks.base import Backoff, BatchingSink, Rejected, SinkRecord
from streams.config import Tenant
from streams.domain import case_schema

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations" / "postgres"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class MigrationError(RuntimeError):
    pass


def database_name(tenant: str, prefix: str = "casestream_") -> str:
    return f"{prefix}{tenant}".replace("-", "_")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, sql) in version order; files are NNNN_name.sql."""
    out = []
    for f in sorted(MIGRATIONS_DIR.glob("*.sql")):
        head = f.name.split("_", 1)[0]
        if not head.isdigit():
            raise MigrationError(f"{f}: migration files are named NNNN_description.sql")
        out.append((int(head), f.name, f.read_text()))
    versions = [v for v, _, _ in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{MIGRATIONS_DIR}: two migrations share a version number")
    return out


def _checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


async def ensure_database(dsn: str, name: str) -> bool:
    """Create the database when absent; True when it was created."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            return False  # created meanwhile by another worker (a race: unique violation in pg_database)
        return True
    finally:
        await conn.close()


async def migrate(dsn: str, name: str) -> list[str]:
    """Apply pending migrations (idempotent, serialized by an advisory lock)."""
    import asyncpg

    await ensure_database(dsn, name)
    conn = await asyncpg.connect(dsn, database=name)
    applied_now = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('casestream-migrations'))")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text NOT NULL, "
                "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
            for version, fname, sql in migrations():
                if version in done:
                    if done[version]["checksum"] != _checksum(sql):
                        raise MigrationError(
                            f"{fname} changed after it was applied to {name}; add a new migration instead")
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                                   version, fname, _checksum(sql))
                applied_now.append(fname)
    finally:
        await conn.close()
    return applied_now


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else _EPOCH + timedelta(milliseconds=ms)


# the cases table's columns (streams/domain/case_schema.py); responders keep names and emails here
CASE_COLUMNS = tuple(f.column_name for f in case_schema.FIELDS if f.postgres)
_FIELD_OF = {f.column_name: f for f in case_schema.FIELDS if f.postgres}
_JSON_TYPES = {case_schema.JSON, case_schema.PERSON, case_schema.PEOPLE, case_schema.TARGETS}   # jsonb columns


def _value(f: case_schema.CaseField, v):
    if f.type == case_schema.TIME:
        return _ts(v)
    if f.type in _JSON_TYPES:
        return orjson.dumps(v).decode() if v is not None else None
    if f.type == case_schema.STRS:
        return list(v or [])
    return v


def case_row(case: dict) -> tuple:
    """The ``cases`` row of a case (a state folded before the on-call fields existed gets their defaults)."""
    case = case_schema.with_defaults(case)
    return tuple(_value(_FIELD_OF[c], case.get(_FIELD_OF[c].name)) for c in CASE_COLUMNS)


def _upsert_sql() -> str:
    cols = ", ".join(f'"{c}"' for c in CASE_COLUMNS)
    params = ", ".join(f"${i}" + ("::jsonb" if _FIELD_OF[c].type in _JSON_TYPES else "")
                       for i, c in enumerate(CASE_COLUMNS, start=1))
    sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in CASE_COLUMNS if c != "case_id")
    return (f"INSERT INTO cases ({cols}) VALUES ({params}) ON CONFLICT (case_id) DO UPDATE SET {sets} "
            f"WHERE cases.version < EXCLUDED.version")


_UPSERT = _upsert_sql()
_TIMELINE_INSERT = (
    "INSERT INTO timeline (case_id, version, event_id, type, occurred_at, caused_by, actor, payload) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb) ON CONFLICT DO NOTHING")


def retry_on() -> tuple[type[BaseException], ...]:
    """asyncpg errors worth retrying: the server unreachable, starting, stopping or crashed
    mid-query (AdminShutdown / CrashShutdown, 57P01-57P03), a connection lost or refused, too
    many connections, and a transaction rolled back by a concurrent one (serialization failure,
    deadlock: class 40). Anything else (a constraint, a bad query) is a bug: raised."""
    import asyncpg

    return (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
            asyncpg.TooManyConnectionsError, asyncpg.TransactionRollbackError)


class PostgresSink(BatchingSink):
    """The tenant's case projection and timeline (see the module docstring)."""

    name = "postgres"

    def __init__(self, dsn: str, database: str, tenant: Tenant, backoff: Backoff | None = None,
                 track_positions: bool = True):
        self.track_positions = track_positions  # False for replays: they do not move the live position
        self.dsn = dsn
        self.database = database
        self.tenant = tenant
        self.backoff = backoff or Backoff()
        self.pool = None

    @property
    def target(self) -> str:
        return self.database

    def is_open(self) -> bool:
        return self.pool is not None

    def retryable(self) -> tuple[type[BaseException], ...]:
        return retry_on()

    async def connect(self) -> None:
        import asyncpg

        await migrate(self.dsn, self.database)
        self.pool = await asyncpg.create_pool(self.dsn, database=self.database, min_size=1, max_size=4)

    async def write_once(self, records: list[SinkRecord]) -> list[Rejected]:
        """Everything or an error: PostgreSQL refuses no record for good (``[]``)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_TIMELINE_INSERT, [
                (e["case_id"], e["version"], e["event_id"], e["type"], _ts(e["occurred_at"]), e["caused_by"],
                 orjson.dumps(e.get("actor")).decode(), orjson.dumps(e).decode())
                for e in (r.event for r in records)])
            await self._store_cases(conn, records)
            if self.track_positions:
                last: dict[tuple[str, int], int] = {}
                for r in records:
                    last[(r.topic, r.partition)] = max(r.offset, last.get((r.topic, r.partition), -1))
                await conn.executemany(
                    'INSERT INTO projection_positions (topic, partition, "offset") VALUES ($1, $2, $3) '
                    'ON CONFLICT (topic, partition) DO UPDATE SET "offset" = EXCLUDED."offset"',
                    [(t, p, o) for (t, p), o in last.items()])
        return []

    async def _store_cases(self, conn, records: list[SinkRecord]) -> None:
        async def load(ids: list[str]) -> dict[str, dict]:
            return {r["case_id"]: orjson.loads(r["state"]) for r in await conn.fetch(
                "SELECT case_id, state FROM case_states WHERE case_id = ANY($1::text[])", ids)}

        async def from_timeline(gaps) -> None:
            # out of order: the events in between are in the timeline (this batch's too, inserted above),
            # as far as they have arrived
            for case in gaps:
                case.add(orjson.loads(r["payload"]) for r in await conn.fetch(
                    "SELECT payload FROM timeline WHERE case_id = $1 AND version > $2 ORDER BY version",
                    case.case_id, case.stored_version))

        new_states = [f.state for f in await self.fold_batch(records, load, from_timeline) if f.changed]
        if not new_states:
            return
        await conn.executemany(_UPSERT, [case_row(s) for s in new_states])
        await conn.executemany(
            "INSERT INTO case_states (case_id, version, state) VALUES ($1, $2, $3::jsonb) "
            "ON CONFLICT (case_id) DO UPDATE SET version = EXCLUDED.version, state = EXCLUDED.state "
            "WHERE case_states.version < EXCLUDED.version",
            [(s["case_id"], s["version"], orjson.dumps(s).decode()) for s in new_states])

    async def truncate(self) -> None:
        """Empty the projection (a rebuild starts here)."""
        async with self.pool.acquire() as conn:
            await conn.execute("TRUNCATE cases, case_states, timeline, projection_positions")

    async def flush(self) -> None:
        return None  # every write_batch commits

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # -- reads ------------------------------------------------------------------

    async def timeline(self, case_id: str) -> list[dict]:
        return await read_timeline(self.pool, case_id)

    async def case(self, case_id: str) -> dict | None:
        return await read_case(self.pool, case_id)


async def read_case(pool, case_id: str) -> dict | None:
    """A case's current state from the projection (None: unknown)."""
    raw = await pool.fetchval("SELECT state FROM case_states WHERE case_id = $1", case_id)
    return orjson.loads(raw) if raw else None


async def read_timeline(pool, case_id: str) -> list[dict]:
    """A case's domain events, in version order (empty: unknown)."""
    rows = await pool.fetch("SELECT payload FROM timeline WHERE case_id = $1 ORDER BY version", case_id)
    return [orjson.loads(r["payload"]) for r in rows]
