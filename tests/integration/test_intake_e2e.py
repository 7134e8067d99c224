"""The intake stream end to end: real worker subprocesses, real Kafka."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest

from streams.config import PROJECT_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.smoke]

STATUSES = {
    "on-call": ("TRIGGERED", "ACKNOWLEDGED", "RESOLVED", "PG-"),
    "case-management": ("OPEN", "IN_PROGRESS", "CLOSED", "CM-"),
}


def by_key(key: str):
    return lambda r: r.get("dedup_key") == key


def gapless(events: list[dict]) -> None:
    by_case: dict[str, list[int]] = {}
    for e in events:
        by_case.setdefault(e["case_id"], []).append(e["version"])
    for case_id, versions in by_case.items():
        assert sorted(set(versions)) == list(range(1, max(versions) + 1)), (case_id, versions)


@pytest.mark.parametrize("tenant", ["on-call", "case-management"])
def test_alert_lifecycle_and_dedup(stack, run_id, tenant):
    default, ack, final, prefix = STATUSES[tenant]
    key = f"{run_id}/disk-full"
    ts = "2026-11-24T10:00:0{}Z"
    stack.send(tenant, [
        {"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": key, "summary": "Disk 95% full",
         "severity": "critical", "source": "node-exporter", "timestamp": ts.format(0),
         "custom_details": {"used": 0.95, "mount": "/var"}, "tags": ["env:prod"], "priority": "P2",
         "links": [{"href": "https://example.com/d", "text": "dashboard"}]},
        {"event_id": f"{run_id}-2", "action": "trigger", "dedup_key": key, "summary": "Disk 96% full",
         "severity": "critical", "timestamp": ts.format(1)},
        {"event_id": f"{run_id}-3", "action": "acknowledge", "dedup_key": key, "timestamp": ts.format(2)},
        {"event_id": f"{run_id}-4", "action": "resolve", "dedup_key": key, "timestamp": ts.format(3)},
        {"event_id": f"{run_id}-5", "action": "trigger", "dedup_key": key, "summary": "Disk full again",
         "timestamp": ts.format(4)},
    ])
    events = stack.read(tenant, "domain-events", by_key(key), count=5)
    # the two cases may sit in different partitions: order by (case, version)
    events.sort(key=lambda e: (int(e["case_id"].rsplit("-", 1)[1]), e["version"]))
    assert [e["type"] for e in events] == [
        "CaseCreated", "AlertDeduplicated", "StatusChanged", "StatusChanged", "CaseCreated"]
    first, dedup, acked, resolved, reopened = events
    assert first["case_id"].startswith(prefix) and first["case_id"].endswith("-1")
    assert first["status"] == default and first["version"] == 1 and first["tenant"] == tenant
    assert first["custom_details"] == {"used": 0.95, "mount": "/var"}
    assert first["caused_by"] == f"{run_id}-1" and first["occurred_at"] == 1795514400000
    assert first["_headers"]["event_type"] == "CaseCreated" and first["_headers"]["case_id"] == first["case_id"]
    assert dedup["occurrence_count"] == 2 and dedup["version"] == 2 and dedup["case_id"] == first["case_id"]
    assert (acked["from_status"], acked["to_status"], acked["version"]) == (default, ack, 3)
    assert (resolved["from_status"], resolved["to_status"], resolved["version"]) == (ack, final, 4)
    assert reopened["case_id"] != first["case_id"] and reopened["case_id"].endswith("-2")
    assert reopened["version"] == 1
    # per-case order: a case's events sit in one partition, in version order
    case1 = [e for e in events if e["case_id"] == first["case_id"]]
    assert len({e["_partition"] for e in case1}) == 1
    assert [e["_offset"] for e in case1] == sorted(e["_offset"] for e in case1)


def test_case_commands(stack, run_id):
    key = f"{run_id}/fraud"
    actor = {"id": "u-1", "name": "Ann", "email": "ann@example.com"}
    stack.send("case-management", [
        {"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": key, "summary": "fraud", "priority": "P3"},
        {"event_id": f"{run_id}-2", "command": "assign", "dedup_key": key, "actor": actor, "assignee": actor},
        {"event_id": f"{run_id}-3", "command": "set_priority", "dedup_key": key, "actor": actor, "priority": "P1"},
        {"event_id": f"{run_id}-4", "command": "comment", "dedup_key": key, "actor": actor, "text": "on it"},
        {"event_id": f"{run_id}-5", "command": "set_status", "dedup_key": key, "actor": actor, "status": "CLOSED"},
        {"event_id": f"{run_id}-6", "command": "set_status", "dedup_key": key, "actor": actor,
         "status": "IN_PROGRESS"},  # CLOSED -> IN_PROGRESS is not allowed
        {"event_id": f"{run_id}-7", "command": "set_status", "dedup_key": key, "actor": actor, "status": "OPEN"},
    ])
    events = stack.read("case-management", "domain-events", by_key(key), count=6)
    assert [e["type"] for e in events] == ["CaseCreated", "Assigned", "PriorityChanged", "CommentAdded",
                                           "StatusChanged", "StatusChanged"]
    assert events[1]["assignee"] == actor and events[1]["actor"] == actor
    assert (events[2]["from_priority"], events[2]["to_priority"]) == ("P3", "P1")
    assert events[3]["text"] == "on it"
    assert (events[4]["to_status"], events[5]["from_status"], events[5]["to_status"]) == ("CLOSED", "CLOSED", "OPEN")
    gapless(events)
    dlq = stack.read("case-management", "dlq", lambda r: key in (r.get("original") or ""), count=1)
    assert dlq[0]["reason"] == "invalid_transition" and "CLOSED -> IN_PROGRESS" in dlq[0]["detail"]


def _metric(port: int, name: str, **labels) -> float:
    """A counter's value from a worker's /metrics (polls until the server answers)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # polling a starting worker, with a deadline
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bad_input_dead_letters_and_the_partition_keeps_flowing(stack, run_id):
    tenant = "on-call"
    key = f"{run_id}/flow".encode()

    async def send_same_partition():
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, acks="all", max_request_size=2 * 1024 * 1024)
        await producer.start()
        try:
            topic = stack.topic(tenant, "intake")
            bad = [
                b"{not json " + run_id.encode(),
                orjson.dumps({"action": "trigger", "dedup_key": run_id, "summary": "x" * 600_000}),
                b'{"run": "' + run_id.encode() + b'", "a": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}",
                orjson.dumps({"action": "page", "dedup_key": f"{run_id}/a"}),
                orjson.dumps({"command": "escalate", "dedup_key": f"{run_id}/b", "actor": {"id": "u"}}),
                orjson.dumps({"command": "set_status", "dedup_key": f"{run_id}/c", "actor": {"id": "u"},
                              "status": "ACKNOWLEDGE"}),
                orjson.dumps({"action": "trigger", "dedup_key": f"{run_id}/d"}),  # no summary
                orjson.dumps({"action": "resolve", "dedup_key": f"{run_id}/never-opened"}),
                orjson.dumps({"command": "comment", "case_id": "PG-00000000000000000000-9",
                              "actor": {"id": "u"}, "text": run_id}),
                orjson.dumps({"command": "comment", "case_id": f"CM-{run_id}", "actor": {"id": "u"}, "text": "x"}),
                b"\xff\xfe" + run_id.encode(),
            ]
            for raw in bad:  # same key -> same partition, before the good message
                await producer.send_and_wait(topic, raw, key=key)
            good = {"action": "trigger", "dedup_key": f"{run_id}/after-bad", "summary": "still flowing"}
            await producer.send_and_wait(topic, orjson.dumps(good), key=key)
        finally:
            await producer.stop()

    before = _metric(stack.oncall.metrics_port, "casestream_dlq_messages_total", tenant=tenant, reason="too_large")
    asyncio.run(send_same_partition())
    ok = stack.read(tenant, "domain-events", by_key(f"{run_id}/after-bad"), count=1)
    assert ok[0]["type"] == "CaseCreated"

    def mine(r):
        return run_id in (r.get("original") or "") or run_id.encode() in (r.get("original") or "").encode() \
            or (r["reason"] == "too_large" and r["source"]["topic"] == stack.topic(tenant, "intake")
                and r["dead_lettered_at"] and run_id in r["original"][:200])

    dlq = stack.read(tenant, "dlq", lambda r: run_id in (r.get("original") or "")
                     or (r.get("original_encoding") == "base64"), until=lambda f: len(
                         [r for r in f if r.get("original_encoding") != "base64"]) >= 10)
    reasons = sorted(r["reason"] for r in dlq if r.get("original_encoding") != "base64")
    assert reasons == sorted(["invalid_json", "too_large", "invalid_json", "invalid_event", "invalid_event",
                              "invalid_event", "invalid_event", "no_open_case", "unknown_case", "unknown_case"])
    from fastavro import parse_schema
    from fastavro.validation import validate

    dlq_schema = parse_schema(orjson.loads((PROJECT_ROOT / "schemas/json/DeadLetter.avsc").read_bytes()))
    for r in dlq:
        assert validate({k: v for k, v in r.items() if not k.startswith("_")}, dlq_schema, raise_errors=True)
        assert r["source"]["topic"] == stack.topic(tenant, "intake")
        assert isinstance(r["source"]["offset"], int) and r["detail"]
    details = " ".join(r["detail"] for r in dlq)
    assert "nested deeper than 64" in details and "'summary' is required" in details
    assert any(r.get("original_encoding") == "base64" and r["reason"] == "invalid_json" for r in dlq)
    assert stack.oncall.alive()
    assert _metric(stack.oncall.metrics_port, "casestream_dlq_messages_total",
                   tenant=tenant, reason="too_large") >= before + 1


def test_a_message_sent_twice_counts_by_its_identity(stack, run_id):
    """An explicit event_id dedupes; without one, every record is an event (README "Event identity")."""
    key = f"{run_id}/dup"
    trigger = {"event_id": f"{run_id}-t", "action": "trigger", "dedup_key": key, "summary": "dup"}
    no_id = {"action": "trigger", "dedup_key": key, "summary": "no id", "timestamp": "2026-11-24T10:00:00Z"}
    ack = {"event_id": f"{run_id}-a", "action": "acknowledge", "dedup_key": key}
    stack.send("on-call", [trigger, trigger, no_id, no_id, ack, ack, trigger])
    marker = {"event_id": f"{run_id}-m", "action": "trigger", "dedup_key": key, "summary": "marker"}
    stack.send("on-call", [marker])
    events = stack.read("on-call", "domain-events", by_key(key),
                        until=lambda f: any(e["caused_by"] == f"{run_id}-m" for e in f))
    assert [e["type"] for e in events] == ["CaseCreated", "AlertDeduplicated", "AlertDeduplicated",
                                           "StatusChanged", "AlertDeduplicated"]
    assert events[-1]["occurrence_count"] == 4
    gapless(events)


def test_a_recurring_alert_without_event_id_pages_again_after_a_resolve(stack, run_id):
    """The very same trigger bytes after a resolve open a new case (PagerDuty opens a new incident)."""
    key = f"{run_id}/recurring"
    fire = {"action": "trigger", "dedup_key": key, "summary": "disk full"}
    stack.send("on-call", [fire])
    stack.read("on-call", "domain-events", lambda r: by_key(key)(r) and r["type"] == "CaseCreated", count=1)
    stack.send("on-call", [{"action": "resolve", "dedup_key": key}, fire])
    created = stack.read("on-call", "domain-events", lambda r: by_key(key)(r) and r["type"] == "CaseCreated",
                         count=2)
    assert len({e["case_id"] for e in created}) == 2


def test_concurrent_producers_make_exactly_one_open_case(stack, run_id):
    """Many producers, no Kafka key (any intake partition): one case per key."""
    key = f"{run_id}/storm"
    n_producers, per_producer = 4, 25

    async def producer_task(i: int):
        await stack._send("on-call", stack.topic("on-call", "intake"), [
            {"event_id": f"{run_id}-{i}-{j}", "action": "trigger", "dedup_key": key, "summary": f"storm {i}/{j}"}
            for j in range(per_producer)], key_by_dedup=False)

    async def all_at_once():
        await asyncio.gather(*(producer_task(i) for i in range(n_producers)))

    asyncio.run(all_at_once())
    total = n_producers * per_producer
    events = stack.read("on-call", "domain-events", by_key(key), count=total)
    assert sum(e["type"] == "CaseCreated" for e in events) == 1
    assert {e["case_id"] for e in events} == {events[0]["case_id"]}
    assert sorted(e["version"] for e in events) == list(range(1, total + 1))
    assert max(e.get("occurrence_count") or 1 for e in events) == total


def test_tenants_are_isolated(stack, run_id):
    key = f"{run_id}/shared-key"
    stack.send("on-call", [{"event_id": f"{run_id}-oc", "action": "trigger", "dedup_key": key, "summary": "oc"}])
    stack.send("case-management", [
        {"event_id": f"{run_id}-cm", "action": "trigger", "dedup_key": key, "summary": "cm"},
        # an on-call status is not a case-management status
        {"event_id": f"{run_id}-bad", "command": "set_status", "dedup_key": key, "actor": {"id": "u"},
         "status": "ACKNOWLEDGED"},
    ])
    oc = stack.read("on-call", "domain-events", by_key(key), count=1, settle=2.0)
    cm = stack.read("case-management", "domain-events", by_key(key), count=1, settle=2.0)
    assert len(oc) == 1 and len(cm) == 1
    assert oc[0]["case_id"].startswith("PG-") and oc[0]["status"] == "TRIGGERED" and oc[0]["tenant"] == "on-call"
    assert cm[0]["case_id"].startswith("CM-") and cm[0]["status"] == "OPEN" and cm[0]["tenant"] == "case-management"
    dlq = stack.read("case-management", "dlq", lambda r: f"{run_id}-bad" in (r.get("original") or ""), count=1)
    assert dlq[0]["reason"] == "invalid_event" and "ACKNOWLEDGED" in dlq[0]["detail"]
    # nothing of one tenant ever lands in the other's log
    assert all(e["tenant"] == "on-call" for e in stack.read("on-call", "domain-events", lambda r: True,
                                                               until=lambda f: True))


def _cli(stack, *args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], input=stdin, capture_output=True,
                          env=stack.env, cwd=str(PROJECT_ROOT), timeout=120)


def test_cli_topics_send_tail(stack, run_id):
    again = _cli(stack, "topics", "create", "--json")
    assert again.returncode == 0, again.stderr
    rows = orjson.loads(again.stdout)
    assert rows and all(r["state"] == "exists" for r in rows)
    assert {"on-call.intake", "case-management.domain-events", "casestream-on-call-keys-changelog"} <= {
        r["topic"] for r in rows}

    lines = b"\n".join([
        orjson.dumps({"action": "trigger", "dedup_key": f"{run_id}/cli", "summary": "from the CLI"}),
        orjson.dumps({"action": "trigger", "summary": f"no key {run_id}"}),
        b"not json",
    ])
    sent = _cli(stack, "send", "--tenant", "on-call", "-", stdin=lines)
    assert sent.returncode == 0, sent.stderr
    printed = sent.stdout.decode().splitlines()
    assert printed[0] == f"{run_id}/cli" and len(printed[1]) == 36 and printed[2].startswith("- (invalid_json")
    stack.read("on-call", "domain-events", lambda r: r["dedup_key"] in (printed[0], printed[1]), count=2)

    tail = _cli(stack, "tail", "--tenant", "on-call", "--from-beginning", "--idle-timeout", "2")
    assert tail.returncode == 0, tail.stderr
    decoded = [orjson.loads(ln) for ln in tail.stdout.splitlines()]
    assert any(d.get("dedup_key") == f"{run_id}/cli" and d["type"] == "CaseCreated" for d in decoded)

    bad = _cli(stack, "worker", "--tenant", "nope")
    assert bad.returncode == 2 and b"unknown tenant 'nope'" in bad.stderr
    assert b"case-management, on-call" in bad.stderr


def test_a_record_that_cannot_be_processed_is_dead_lettered_and_the_partition_flows(stack, run_id):
    """Garbage written straight to the internal topics (not through route) raises in the apply
    agent: the record goes to the DLQ as processing_error and the next record of the same
    partition is applied."""
    from streams.domain.intake import routing_token

    key = f"{run_id}/after-garbage"
    token = routing_token(key).encode()

    async def garbage():
        from aiokafka import AIOKafkaProducer

        p = AIOKafkaProducer(bootstrap_servers=stack.kafka, acks="all")
        await p.start()
        try:
            for role, body in (("intake-routed", b'{"not": "an envelope ' + run_id.encode() + b'"}'),
                               ("timers", b'{"timer_id": "' + run_id.encode() + b'"}')):
                await p.send_and_wait(stack.topic("on-call", role), body, key=token)
        finally:
            await p.stop()

    asyncio.run(garbage())
    stack.send("on-call", [{"event_id": f"{run_id}-ok", "action": "trigger", "dedup_key": key, "summary": "ok"}])
    dead = stack.read("on-call", "dlq", lambda r: run_id in (r.get("original") or ""), count=2)
    assert {d["reason"] for d in dead} == {"processing_error"}
    assert {d["source"]["topic"] for d in dead} == {stack.topic("on-call", "intake-routed"),
                                                    stack.topic("on-call", "timers")}
    assert all(d["detail"] for d in dead)
    assert stack.read("on-call", "domain-events", by_key(key), count=1)[0]["type"] == "CaseCreated"
