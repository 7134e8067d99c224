"""The PostgreSQL projection: case rows and the timeline, from the domain-event log."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from sinks.base import SinkRecord
from sinks.postgres import PostgresSink, migrate
from streams.config import get_tenant

pytestmark = pytest.mark.integration


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
