"""`casestream dlq list|show|replay` against the real worker and Kafka."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time

import orjson
import pytest

from streams.config import PROJECT_ROOT
from streams.domain.intake import routing_token

pytestmark = pytest.mark.integration

TENANT = "on-call"


def dlq_cli(stack, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "streams.cli", "dlq", *args], capture_output=True,
                         env=stack.env, cwd=str(PROJECT_ROOT), timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out


def by_key(key: str):
    return lambda r: r.get("dedup_key") == key


def statuses(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["from_status"], e["to_status"]) for e in events if e["type"] == "StatusChanged"]


def test_replay_after_the_trigger_acknowledges_and_a_second_replay_changes_nothing(stack, run_id):
    key = f"{run_id}/dlq/ack-before-trigger"
    # no event_id: the worker derives it from the bytes, which a replay republishes unchanged
    stack.send(TENANT, [{"action": "acknowledge", "dedup_key": key, "timestamp": "2026-11-24T10:00:05Z"}])
    stack.read(TENANT, "dlq", lambda r: r["reason"] == "no_open_case" and key in (r.get("original") or ""), count=1)

    stack.send(TENANT, [{"action": "trigger", "dedup_key": key, "summary": "Replica lag 120s",
                         "timestamp": "2026-11-24T10:00:00Z"}])
    stack.read(TENANT, "domain-events", lambda r: by_key(key)(r) and r["type"] == "CaseCreated", count=1)

    args = ("replay", "--tenant", TENANT, "--reason", "no_open_case", "--match", key, "--json")
    report = orjson.loads(dlq_cli(stack, *args).stdout)
    assert (report["matched"], report["published"], report["skipped"]) == (1, 1, 0)
    assert report["by_topic"] == {stack.topic(TENANT, "intake"): 1}
    assert report["items"][0]["published"][0]["key"] == routing_token(key)  # the partition of its alerts
    events = stack.read(TENANT, "domain-events", by_key(key), until=lambda f: statuses(f))
    assert statuses(events) == [("TRIGGERED", "ACKNOWLEDGED")]

    # again: the same bytes, the same event id -> the worker ignores it
    report = orjson.loads(dlq_cli(stack, *args).stdout)
    assert report["published"] == 1
    # a later message of the same key is processed after the replayed one (same partitions, in order)
    stack.send(TENANT, [{"event_id": f"{run_id}-marker", "action": "trigger", "dedup_key": key,
                         "summary": "Replica lag 130s"}])
    events = stack.read(TENANT, "domain-events", by_key(key),
                        until=lambda f: any(e["type"] == "AlertDeduplicated" for e in f), settle=2.0)
    assert [e["type"] for e in sorted(events, key=lambda e: e["version"])] == [
        "CaseCreated", "StatusChanged", "AlertDeduplicated"]
    assert statuses(events) == [("TRIGGERED", "ACKNOWLEDGED")]
    # and the replays were not dead-lettered again
    dead = stack.read(TENANT, "dlq", lambda r: key in (r.get("original") or ""), count=1, settle=0.5)
    assert len(dead) == 1


def test_list_and_show(stack, run_id):
    raw = b"\xff\xfe not json " + run_id.encode()  # not UTF-8: kept as base64
    stack.send(TENANT, [raw])
    stack.read(TENANT, "dlq", lambda r: r["reason"] == "invalid_json" and r["original_encoding"] == "base64"
               and run_id.encode() in base64.b64decode(r["original"]), count=1)

    lines = dlq_cli(stack, "list", "--tenant", TENANT, "--reason", "invalid_json", "--match", run_id,
                    "--json").stdout.splitlines()
    assert len(lines) == 1
    rec = orjson.loads(lines[0])
    assert rec["reason"] == "invalid_json" and rec["original_encoding"] == "base64"
    assert rec["source"]["topic"] == stack.topic(TENANT, "intake")
    assert isinstance(rec["dlq_partition"], int) and isinstance(rec["dlq_offset"], int)
    assert isinstance(rec["dead_lettered_at"], int) and "not valid JSON" in rec["detail"]
    ref = f"{rec['dlq_partition']}:{rec['dlq_offset']}"

    table = dlq_cli(stack, "list", "--tenant", TENANT, "--match", run_id).stdout.decode()
    assert ref in table and "invalid_json" in table and "1 of 1 matching" in table

    shown = orjson.loads(dlq_cli(stack, "show", "--tenant", TENANT, ref, "--json").stdout)
    assert {k: v for k, v in shown.items() if k not in ("original_text", "replay")} == rec
    assert shown["original_text"] == "\\xff\\xfe not json " + run_id
    assert shown["replay"] == f"{stack.topic(TENANT, 'intake')} key -"
    text = dlq_cli(stack, "show", "--tenant", TENANT, ref).stdout.decode()
    assert "invalid_json" in text and run_id in text and "original:" in text

    missing = subprocess.run([sys.executable, "-m", "streams.cli", "dlq", "show", "--tenant", TENANT,
                              f"{rec['dlq_partition']}:999999999"], capture_output=True, env=stack.env,
                             cwd=str(PROJECT_ROOT), timeout=120)
    assert missing.returncode == 1 and b"no dead letter at" in missing.stderr

    # a dry run says where it would go and publishes nothing
    dry = orjson.loads(dlq_cli(stack, "replay", "--tenant", TENANT, "--reason", "invalid_json", "--match", run_id,
                               "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["published"] == 0 and dry["messages"] == 1
    assert dry["items"][0]["published"] == [{"topic": stack.topic(TENANT, "intake"), "key": None, "bytes": len(raw)}]


def test_a_rate_limited_gateway_body_is_translated_and_replayed_once(stack, run_id):
    key = f"{run_id}/dlq/gateway"
    body = orjson.dumps({"action": "trigger", "dedup_key": key, "summary": "Queue depth 10k", "severity": "warning"})
    record = {"reason": "rate_limited", "detail": "rate limit of tenant on-call exceeded",
              "source": {"topic": "gateway:events", "partition": -1, "offset": -1},
              "original": body.decode(), "original_encoding": "utf-8", "dead_lettered_at": int(time.time() * 1000)}
    asyncio.run(stack._send(TENANT, stack.topic(TENANT, "dlq"), [orjson.dumps(record)], False))

    args = ("replay", "--tenant", TENANT, "--reason", "rate_limited", "--match", key, "--json")
    report = orjson.loads(dlq_cli(stack, *args).stdout)
    assert (report["matched"], report["published"]) == (1, 1)
    stack.read(TENANT, "domain-events", lambda r: by_key(key)(r) and r["type"] == "CaseCreated", count=1)
    assert orjson.loads(dlq_cli(stack, *args).stdout)["published"] == 1
    stack.send(TENANT, [{"event_id": f"{run_id}-marker", "action": "resolve", "dedup_key": key}])
    events = stack.read(TENANT, "domain-events", by_key(key), until=lambda f: statuses(f), settle=2.0)
    assert [e["type"] for e in sorted(events, key=lambda e: e["version"])] == ["CaseCreated", "StatusChanged"]
