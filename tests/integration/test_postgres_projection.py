"""The PostgreSQL projection: case rows and the timeline, from the domain-event log."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from schemas import decode, encode
from sinks.base import SinkRecord
from sinks.postgres import PostgresSink, migrate
from streams.config import get_tenant
from streams.domain import case_schema
from streams.domain.cases import ONCALL_DEFAULTS, replay

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

pytestmark = [pytest.mark.integration, pytest.mark.smoke]


def test_alerts_and_commands_end_as_rows_and_timeline(stack, run_id):
    key = f"{run_id}/pg"
    actor = {"id": "u-1", "name": "Ann", "email": "ann@example.com"}
    stack.send("on-call", [
        {"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": key, "summary": "db down", "severity": "critical",
         "custom_details": {"host": "db-1"}, "tags": ["db"], "timestamp": "2026-11-24T10:00:00Z"},
        {"event_id": f"{run_id}-2", "action": "trigger", "dedup_key": key, "summary": "db down",
         "timestamp": "2026-11-24T10:01:00Z"},
        {"event_id": f"{run_id}-3", "command": "assign", "dedup_key": key, "actor": actor, "assignee": actor,
         "timestamp": "2026-11-24T10:02:00Z"},
        {"event_id": f"{run_id}-4", "action": "acknowledge", "dedup_key": key, "timestamp": "2026-11-24T10:03:00Z"},
        {"event_id": f"{run_id}-5", "action": "resolve", "dedup_key": key, "timestamp": "2026-11-24T10:10:00Z"},
    ])
    events = stack.read("on-call", "domain-events", lambda r: r.get("dedup_key") == key, count=5)
    case_id = events[0]["case_id"]
    rows = stack.poll(lambda: stack.pg("on-call", "SELECT * FROM cases WHERE case_id = $1", case_id),
                      lambda rows: rows and rows[0]["version"] == 5, what="the case row at version 5")
    row = rows[0]
    assert (row["status"], row["occurrence_count"], row["severity"], row["tags"]) == ("RESOLVED", 2, "critical", ["db"])
    assert orjson.loads(row["assignee"])["id"] == "u-1" and orjson.loads(row["custom_details"]) == {"host": "db-1"}
    assert row["acknowledged_at"].isoformat() == "2026-11-24T10:03:00+00:00"
    assert row["resolved_at"].isoformat() == "2026-11-24T10:10:00+00:00"
    timeline = stack.pg("on-call", "SELECT version, type, event_id FROM timeline WHERE case_id = $1 ORDER BY version",
                        case_id)
    assert [(t["version"], t["type"]) for t in timeline] == [
        (1, "CaseCreated"), (2, "AlertDeduplicated"), (3, "Assigned"), (4, "StatusChanged"), (5, "StatusChanged")]
    assert [t["event_id"] for t in timeline] == [e["event_id"] for e in sorted(events, key=lambda e: e["version"])]


def test_redelivery_and_out_of_order_change_nothing(stack, run_id):
    """Drive the sink directly with duplicated, reordered and replayed batches."""
    tenant = get_tenant("case-management")
    key = f"{run_id}/direct"
    stack.send("case-management", [
        {"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": key, "summary": f"s{i}"} for i in range(4)])
    events = sorted(stack.read("case-management", "domain-events", lambda r: r.get("dedup_key") == key, count=4),
                    key=lambda e: e["version"])
    case_id = events[0]["case_id"]
    stack.poll(lambda: stack.pg("case-management", "SELECT version FROM cases WHERE case_id = $1", case_id),
               lambda rows: rows and rows[0]["version"] == 4, what="the live projection")
    live = stack.pg("case-management", "SELECT * FROM cases WHERE case_id = $1", case_id)

    async def drive():
        db = f"{stack.db_prefix}direct_{run_id}"
        await migrate(stack.postgres_dsn, db)
        sink = PostgresSink(stack.postgres_dsn, db, tenant)
        await sink.open()
        try:
            def rec(e, off):
                return SinkRecord("t", 0, off, {k: v for k, v in e.items() if not k.startswith("_")})
            # versions 3 and 4 before 1 and 2 (different partitions of a replay), then everything again
            await sink.write_batch([rec(events[2], 10), rec(events[3], 11)])
            await sink.write_batch([SinkRecord("u", 0, 0, rec(events[0], 0).event),
                                    SinkRecord("u", 0, 1, rec(events[1], 1).event)])
            await sink.write_batch([rec(e, i) for i, e in enumerate(events)])       # below the position: skipped
            await sink.write_batch([SinkRecord("v", 0, i, rec(e, i).event) for i, e in enumerate(events)])
            return await sink.case(case_id), await sink.timeline(case_id)
        finally:
            await sink.close()

    case, timeline = asyncio.run(drive())
    assert case["version"] == 4 and case["occurrence_count"] == 4
    assert [e["version"] for e in timeline] == [1, 2, 3, 4]
    assert case["status"] == live[0]["status"] and case["occurrence_count"] == live[0]["occurrence_count"]


def test_cli_db_migrate_and_case_show(stack, run_id):
    import subprocess
    import sys

    from streams.config import PROJECT_ROOT

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, env=stack.env,
                              cwd=str(PROJECT_ROOT), timeout=120)

    mig = cli("db", "migrate", "--json")
    assert mig.returncode == 0, mig.stderr
    assert {r["database"] for r in orjson.loads(mig.stdout)} == {stack.database("on-call"),
                                                                 stack.database("case-management")}
    key = f"{run_id}/cli"
    stack.send("on-call", [{"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": key, "summary": "x"},
                           {"event_id": f"{run_id}-2", "action": "acknowledge", "dedup_key": key}])
    ev = stack.read("on-call", "domain-events", lambda r: r.get("dedup_key") == key, count=1)[0]
    stack.poll(lambda: stack.pg("on-call", "SELECT version FROM cases WHERE case_id = $1", ev["case_id"]),
               lambda rows: rows and rows[0]["version"] == 2, what="projection")
    shown = cli("case", "show", ev["case_id"], "--tenant", "on-call", "--timeline", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = orjson.loads(shown.stdout)
    assert doc["case"]["status"] == "ACKNOWLEDGED" and [e["type"] for e in doc["timeline"]] == [
        "CaseCreated", "StatusChanged"]
    table = cli("case", "show", ev["case_id"], "--tenant", "on-call", "--timeline")
    assert table.returncode == 0 and b"TRIGGERED -> ACKNOWLEDGED" in table.stdout
    missing = cli("case", "show", "PG-00000000000000000000-1", "--tenant", "on-call")
    assert missing.returncode == 1 and b"no case" in missing.stderr


# --------------------------------------------------------------------------
# on-call properties (the scenario of tests/unit/helpers.py, through the codec)
# --------------------------------------------------------------------------

_UNIT = str(Path(__file__).resolve().parents[1] / "unit")
if _UNIT not in sys.path:
    sys.path.insert(0, _UNIT)

from helpers import ALICE, BOB, CAROL, World, emit, oncall_scenario  # noqa: E402


def _wire(events: list[dict]) -> list[dict]:
    """The events as a sink receives them: encoded and decoded."""
    return [decode(encode(e)) for e in events]


async def _write(sink: PostgresSink, batches: list[list[dict]]) -> None:
    for n, batch in enumerate(batches):
        await sink.write_batch([SinkRecord("t", 0, n * 1000 + i, e) for i, e in enumerate(batch)])


def test_oncall_columns(stack, run_id):
    tenant = get_tenant("on-call")
    w = World(tenant, prefix=f"{run_id}-")
    events = _wire(oncall_scenario(w, key=f"{run_id}/oncall"))
    page_id, low_id = events[0]["case_id"], events[-1]["case_id"]
    page = [e for e in events if e["case_id"] == page_id]
    db = f"{stack.db_prefix}oncall_{run_id}"

    async def drive():
        await migrate(stack.postgres_dsn, db)
        sink = PostgresSink(stack.postgres_dsn, db, tenant)
        await sink.open()
        try:
            await _write(sink, [events[:4], events[4:]])
            async with sink.pool.acquire() as conn:
                rows = {r["case_id"]: dict(r) for r in await conn.fetch("SELECT * FROM cases")}
            return rows, await sink.case(page_id), await sink.timeline(page_id)
        finally:
            await sink.close()

    rows, state, timeline = asyncio.run(drive())
    row = rows[page_id]
    assert row["version"] == len(page) == state["version"]
    assert orjson.loads(row["responders"]) == [ALICE, CAROL, BOB]  # PostgreSQL keeps names and emails
    assert row["responder_users"] == ["u-alice", "u-carol", "u-bob"]
    assert orjson.loads(row["targets"]) == [{"kind": "user", "id": "u-alice"},
                                            {"kind": "schedule", "id": "sch-primary"},
                                            {"kind": "team", "id": "team-db"}]
    assert (row["escalation_policy_id"], row["escalation_policy_step_id"], row["escalation_policy_retry_count"],
            row["escalation_active"], row["is_shadow"], row["sla_breaches"]) == (
        "ep-db", "ep-db-s1", 0, False, False, ["resolution"])
    added = next(e for e in reversed(page) if e["type"] == "RespondersAdded")
    assert row["responders_added_at"] == _EPOCH + timedelta(milliseconds=added["occurred_at"])
    assert row["time_to_first_acknowledge_ms"] == state["acknowledged_at"] - state["created_at"] > 0
    assert row["time_to_first_acknowledge_ms"] == (row["acknowledged_at"] - row["created_at"]) // timedelta(
        milliseconds=1)
    low = rows[low_id]
    assert (low["is_shadow"], low["escalation_active"], low["urgency"], low["responders"]) == (
        True, True, "low", "[]")
    assert [e["type"] for e in timeline] == [e["type"] for e in page]
    assert {e["type"] for e in timeline} >= {"EscalationStepStarted", "RespondersAdded", "NotificationRequested",
                                             "EscalationEnded", "AcknowledgeTimedOut", "SlaBreached",
                                             "AutomationApplied"}


def test_existing_database_migrates_to_the_oncall_columns(stack, run_id):
    """A database at migration 0001 with a case in it: 0002 is applied alone, the
    row gets the defaults (and its time to first acknowledge), later events fold."""
    import asyncpg

    from sinks.postgres import CASE_COLUMNS, _checksum, case_row, ensure_database, migrations

    tenant = get_tenant("on-call")
    w = World(tenant, prefix=f"{run_id}-")
    key = f"{run_id}/old"
    cid = w.open_case(key)
    w.send({"action": "acknowledge", "dedup_key": key})
    before = _wire(w.events_of(cid))
    old_state = {k: v for k, v in replay(tenant, before).items() if k not in ONCALL_DEFAULTS}
    db = f"{stack.db_prefix}old_{run_id}"
    (v1, name1, sql1), *_ = migrations()
    old_cols = [f.column_name for f in case_schema.FIELDS if f.postgres and not f.oncall]  # migration 0001's

    async def setup_old():  # what the previous release left behind
        await ensure_database(stack.postgres_dsn, db)
        conn = await asyncpg.connect(stack.postgres_dsn, database=db)
        try:
            await conn.execute("CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL, "
                               "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            await conn.execute(sql1)
            await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                               v1, name1, _checksum(sql1))
            cols = ", ".join(f'"{c}"' for c in old_cols)
            params = ", ".join(f"${i}" + ("::jsonb" if c in ("links", "custom_details", "assignee") else "")
                               for i, c in enumerate(old_cols, start=1))
            row = dict(zip(CASE_COLUMNS, case_row(old_state)))
            await conn.execute(f"INSERT INTO cases ({cols}) VALUES ({params})", *(row[c] for c in old_cols))
            await conn.execute("INSERT INTO case_states (case_id, version, state) VALUES ($1, $2, $3::jsonb)",
                               cid, old_state["version"], orjson.dumps(old_state).decode())
        finally:
            await conn.close()

    async def drive():
        await setup_old()
        applied = await migrate(stack.postgres_dsn, db)
        again = await migrate(stack.postgres_dsn, db)
        sink = PostgresSink(stack.postgres_dsn, db, tenant)
        await sink.open()
        try:
            async with sink.pool.acquire() as conn:
                migrated = dict(await conn.fetchrow("SELECT * FROM cases WHERE case_id = $1", cid))
            later = _wire([emit(w, cid, "RespondersAdded", escalation_policy_step_id=None, responders=[ALICE]),
                           emit(w, cid, "SlaBreached", sla="first_response", priority="P3",
                                due_at=before[0]["occurred_at"] + 60_000)])
            await _write(sink, [later])
            async with sink.pool.acquire() as conn:
                after = dict(await conn.fetchrow("SELECT * FROM cases WHERE case_id = $1", cid))
            return applied, again, migrated, after
        finally:
            await sink.close()

    applied, again, migrated, after = asyncio.run(drive())
    assert applied[0] == "0002_oncall.sql" and again == []  # then any later migrations
    assert (migrated["escalation_policy_id"], migrated["escalation_policy_retry_count"], migrated["escalation_active"],
            migrated["is_shadow"], migrated["targets"], migrated["responder_users"], migrated["responders"],
            migrated["responders_added_at"], migrated["sla_breaches"]) == (
        None, 0, False, False, "[]", [], "[]", None, [])
    assert migrated["time_to_first_acknowledge_ms"] == 1000  # backfilled from acknowledged_at - created_at
    assert after["version"] == old_state["version"] + 2
    assert orjson.loads(after["responders"]) == [ALICE] and after["responder_users"] == ["u-alice"]
    assert after["sla_breaches"] == ["first_response"] and after["time_to_first_acknowledge_ms"] == 1000
