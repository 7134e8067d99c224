"""Relay subscriptions with a real worker: each relay topic carries exactly the subscribed domain
events, in per-case order, with the documented headers, decodable with the .avsc files alone (Avro)
or as JSON; `casestream topics create` creates the topics; a subscription added by a config reload
starts relaying."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest

import schemas
from streams.config import PROJECT_ROOT, load_topics

pytestmark = pytest.mark.integration

TENANT = "on-call"
CONFIG = """\
subscriptions:
  - id: critical-json
    format: json
    match: {severity: critical}
  - id: status-avro
    format: avro
    event_types: [StatusChanged]
"""


def relay_read(stack, name: str, fmt: str, match, count: int, settle: float = 0.0) -> list[dict]:
    topic = load_topics(TENANT).relay(name).name
    return asyncio.run(stack._read(topic, "domain-events" if fmt == "avro" else "json", match, count, None,
                                   90.0, settle))


def test_relay_topics_carry_exactly_the_subscribed_events(fresh_stack, tmp_path, run_id):
    stack = fresh_stack
    oncall_dir = tmp_path / "oncall"
    oncall_dir.mkdir()
    (oncall_dir / f"{TENANT}.yaml").write_text(CONFIG)
    env = dict(stack.env, CASESTREAM_ONCALL_DIR=str(oncall_dir))
    out = subprocess.run([sys.executable, "-m", "streams.cli", "topics", "create", "--tenant", TENANT, "--json"],
                         env=env, cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    roles = {r["role"]: r for r in orjson.loads(out.stdout)}
    assert {"relay:critical-json", "relay:status-avro"} <= set(roles)
    assert roles["relay:critical-json"]["topic"] == f"{TENANT}.relay.critical-json"

    stack.worker(TENANT, env={"CASESTREAM_ONCALL_DIR": str(oncall_dir), "CASESTREAM_TIMER_TICK": "0.1"})
    msgs = []
    for i in range(6):
        key = f"{run_id}/k{i}"
        sev = "critical" if i % 2 == 0 else "warning"
        msgs += [{"event_id": f"{run_id}-t{i}", "action": "trigger", "dedup_key": key, "summary": "s", "severity": sev},
                 {"event_id": f"{run_id}-d{i}", "action": "trigger", "dedup_key": key, "summary": "s", "severity": sev},
                 {"event_id": f"{run_id}-a{i}", "action": "acknowledge", "dedup_key": key},
                 {"event_id": f"{run_id}-r{i}", "action": "resolve", "dedup_key": key}]
    stack.send(TENANT, msgs)
    mine = lambda r: r.get("dedup_key", "").startswith(f"{run_id}/")  # noqa: E731
    events = stack.read(TENANT, "domain-events", mine, count=6 * 4)
    critical_cases = {e["case_id"] for e in events if e["type"] == "CaseCreated" and e["severity"] == "critical"}
    want_critical = {e["event_id"] for e in events if e["case_id"] in critical_cases}
    want_status = {e["event_id"] for e in events if e["type"] == "StatusChanged"}

    got_json = relay_read(stack, "critical-json", "json", mine, len(want_critical), settle=1.5)
    got_avro = relay_read(stack, "status-avro", "avro", mine, len(want_status), settle=1.5)
    assert {e["event_id"] for e in got_json} == want_critical and len(got_json) == len(want_critical)
    assert {e["event_id"] for e in got_avro} == want_status and len(got_avro) == len(want_status)
    # the JSON copy is the event itself; the Avro copy the same bytes as the log, with its schema id
    by_id = {e["event_id"]: e for e in events}
    for e in got_json + got_avro:
        copy = {k: v for k, v in e.items() if not k.startswith("_")}
        assert copy == {k: v for k, v in by_id[e["event_id"]].items() if not k.startswith("_")}
        h = e["_headers"]
        assert (h["event_type"], h["tenant"], h["case_id"], h["event_id"]) == (e["type"], TENANT, e["case_id"],
                                                                               e["event_id"])
    assert all(int(e["_headers"]["schema_id"]) == schemas.registry().latest["StatusChanged"].id for e in got_avro)
    # per-case order: within a partition, each case's versions increase with the offset
    for copies in (got_json, got_avro):
        last: dict[str, int] = {}
        for e in sorted(copies, key=lambda e: (e["_partition"], e["_offset"])):
            assert e["version"] > last.get(e["case_id"], 0)
            last[e["case_id"]] = e["version"]

    # the README's consumer decodes the Avro relay with the .avsc files alone (run as written, on this topic)
    readme_consumer_prints(stack, f"{TENANT}.relay.status-avro", len(want_status))

    # a subscription added by a reload starts relaying (its topic is created by the worker)
    (oncall_dir / f"{TENANT}.yaml").write_text(CONFIG + """\
  - id: new-cases
    format: json
    event_types: [CaseCreated]
""")
    late = f"{run_id}/late"
    stack.poll(lambda: _relay_exists(stack, "new-cases"), lambda ok: ok, what="the new relay topic")
    stack.send(TENANT, [{"event_id": f"{run_id}-late", "action": "trigger", "dedup_key": late, "summary": "s"}])
    got = relay_read(stack, "new-cases", "json", lambda r: r.get("dedup_key") == late, 1)
    assert got[0]["type"] == "CaseCreated"


def _relay_exists(stack, name: str) -> bool:
    async def go():
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
        await admin.start()
        try:
            return load_topics(TENANT).relay(name).name in await admin.list_topics()
        finally:
            await admin.close()

    return asyncio.run(go())


def readme_consumer_prints(stack, topic: str, count: int) -> None:
    import time

    text = (PROJECT_ROOT / "README.md").read_text()
    code = text.split("A consumer needs nothing but the `.avsc` files:", 1)[1].split("```python\n", 1)[1]
    code = code.split("```", 1)[0]
    code = code.replace('"on-call.relay.sre-pages"', repr(topic)).replace('"localhost:9092"', repr(stack.kafka))
    code = code.replace('group_id="sre-dashboard"', 'group_id="readme-test", auto_offset_reset="earliest"')
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], cwd=str(PROJECT_ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    import queue
    import threading

    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(line) for line in proc.stdout], daemon=True).start()
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(lines) < count and time.monotonic() < deadline:
            try:
                line = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith("StatusChanged "):
                lines.append(line)
    finally:
        proc.kill()
        proc.wait(10)
    assert len(lines) >= count, lines


def test_a_subscription_added_under_load_keeps_the_worker_flowing(fresh_stack, tmp_path, run_id):
    """The reproducer of a hang: the relay topic of a subscription added while alerts flow is created
    by the worker; the first send to it must not make the producer forget the topics it was writing
    to (it then never flushed, and Faust's commit waited for ever). Everything sent keeps being
    applied, the new topic relays, and SIGTERM stops the worker."""
    import threading

    stack = fresh_stack
    oncall_dir = tmp_path / "oncall"
    oncall_dir.mkdir()
    (oncall_dir / f"{TENANT}.yaml").write_text("subscriptions: []\n")
    worker = stack.worker(TENANT, env={"CASESTREAM_ONCALL_DIR": str(oncall_dir), "CASESTREAM_TIMER_TICK": "0.1",
                                       "CASESTREAM_STALL_SECONDS": "600"})
    sent: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def feed():
        try:
            i = 0
            while not stop.is_set():
                batch = [{"event_id": f"{run_id}-{i + j}", "action": "trigger", "dedup_key": f"{run_id}/k{i + j}",
                          "summary": "s"} for j in range(50)]
                stack.send(TENANT, batch)
                sent.extend(m["dedup_key"] for m in batch)
                i += 50
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    mine = lambda r: r.get("dedup_key", "").startswith(f"{run_id}/")  # noqa: E731
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        stack.read(TENANT, "domain-events", mine, count=200)           # under way
        (oncall_dir / f"{TENANT}.yaml").write_text(
            "subscriptions:\n  - id: added-live\n    format: json\n    event_types: [CaseCreated]\n")
        stack.poll(lambda: _relay_exists(stack, "added-live"), lambda ok: ok, what="the new relay topic")
        at_creation = len(sent)
        stack.poll(lambda: len(sent), lambda n: n >= at_creation + 1000, what="1 000 more alerts sent")
    finally:
        stop.set()
        feeder.join(60)
    assert not errors, errors
    keys = set(sent)
    created = stack.read(TENANT, "domain-events", mine,
                         until=lambda rs: {r["dedup_key"] for r in rs if r["type"] == "CaseCreated"} >= keys)
    assert len({r["dedup_key"] for r in created if r["type"] == "CaseCreated"}) == len(keys)
    relayed = relay_read(stack, "added-live", "json", mine, 1)
    assert relayed and relayed[0]["type"] == "CaseCreated"
    worker.stop()                                                       # SIGTERM, waited for
    assert worker.proc.returncode == 0, worker.log()
