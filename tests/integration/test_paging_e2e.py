"""On-call paging and automation with real workers: a fast (file) clock drives escalation,
acknowledgement timeouts and SLAs; timers survive SIGKILL; config reloads; PII stays out of search.

Every worker here reads its clock from a file (CASESTREAM_CLOCK=file:...): writing a time 30 minutes
ahead makes everything due by then fire at once -- no sleeping. Intake records carry Kafka timestamps
on the same clock (``send(..., timestamp_ms=...)``), since timers count from receipt.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from streams.clock import FileClock
from streams.config import get_tenant
from streams.domain.intake import parse
from streams.oncall_config import load_oncall
from streams.stage.memory import MemoryStage

pytestmark = pytest.mark.integration

MIN = 60_000

ONCALL = """\
ack_timeout: 30m
users:
  u-ann: {name: Ann Pagerson, email: ann.pagerson@example.com}
  u-ben: {name: Ben Pagerson, email: ben.pagerson@example.com}
  u-cat: {name: Cat Pagerson, email: cat.pagerson@example.com}
teams:
  ops: [u-ann, u-ben, u-cat]
schedules:
  primary:
    time_zone: UTC
    layers:
      - {users: [u-ann, u-ben], rotation_start: "2026-01-05T00:00:00Z", shift_length: 1w}
escalation_policies:
  default:
    steps:
      - {escalate_after_seconds: 300, targets: [{schedule: primary}]}
      - {escalate_after_seconds: 600, targets: [{user: u-cat}]}
      - {escalate_after_seconds: 900, targets: [{team: ops}]}
    retries: 0
    resolve_page_on_policy_end: true
  other:
    steps:
      - {escalate_after_seconds: 300, targets: [{user: u-cat}]}
routing_rules:
  - id: all
    match: {}
    escalation_policy: default
"""

CASES = """\
ack_timeout: off
users:
  u-ann: {name: Ann Casey, email: ann.casey@example.com}
automation_rules:
  - id: critical-is-p1
    trigger: case_created
    conditions: {severity: critical}
    actions:
      - set_priority: P1
      - assign: u-ann
  - id: late
    trigger: sla_breached
    sla: first_response
    actions:
      - comment: first response SLA breached
slas:
  P1: {first_response: 15m, resolution: 4h}
"""


class Pager:
    """A tenant's worker with its own on-call file and file clock, and the pure domain beside it."""

    def __init__(self, stack, tenant: str, config: str, base: Path, start_ms: int):
        self.stack, self.tenant_name = stack, tenant
        self.dir = base / f"oncall-{tenant}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"{tenant}.yaml"
        self.file.write_text(config)
        self.clock = FileClock(base / f"clock-{tenant}")
        self.clock.set(start_ms)
        self.now = start_ms
        self.env = {"CASESTREAM_ONCALL_DIR": str(self.dir), "CASESTREAM_CLOCK": f"file:{self.clock.path}",
                    "CASESTREAM_TIMER_TICK": "0.1"}
        self.tenant = get_tenant(tenant)
        self.model = MemoryStage(self.tenant, load_oncall(self.tenant, self.file))
        self.model_events: list[dict] = []
        self.worker = None

    def start(self, **kw):
        self.worker = self.stack.worker(self.tenant_name, env=self.env, **kw)
        return self.worker

    def send(self, msgs: list[dict]) -> None:
        """Publish at the current clock time, and apply to the model too."""
        ids = self.stack.send(self.tenant_name, msgs, timestamp_ms=self.now)
        for m, record_id in zip(msgs, ids):
            self.model_events += self.model.handle(parse(orjson.dumps(m), self.tenant, self.now, record_id)).events

    def at(self, ms: int) -> None:
        self.now = ms
        self.clock.set(ms)
        self.model_events += self.model.advance(ms)

    def expected(self, prefix: str) -> list[tuple]:
        """(case, version, type) of every event the model produced for keys under ``prefix``."""
        out = []
        for key, entry in self.model.entries.items():
            if key.startswith(prefix):
                for cid in entry["cases"]:
                    out += [(cid, v) for v in range(1, entry["cases"][cid]["version"] + 1)]
        return sorted(out)

    def events(self, prefix: str, count: int) -> list[dict]:
        return self.stack.read(self.tenant_name, "domain-events",
                               lambda r: r.get("dedup_key", "").startswith(prefix),
                               until=lambda f: len({(e["case_id"], e["version"]) for e in f}) >= count)


def _types(events, case_id):
    seen = {}
    for e in events:
        if e["case_id"] == case_id:
            seen[e["version"]] = e["type"]
    return [seen[v] for v in sorted(seen)]


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name) and not line.startswith("#"))


@pytest.fixture(scope="module")
def pagers(engine_set, tmp_path_factory):
    from tests.conftest import _start_stack, _stop_stack

    base = tmp_path_factory.mktemp("oncall")
    stack, own, root = _start_stack(base, engine_set, own_kafka=True)
    start = (int(time.time() * 1000) // MIN) * MIN
    pg = Pager(stack, "on-call", ONCALL, base, start)
    cm = Pager(stack, "case-management", CASES, base, start)
    pg.start()
    cm.start()
    yield pg, cm
    _stop_stack(stack, own, root)


def test_full_escalation_ack_and_ack_timeout(pagers, run_id):
    pg, _ = pagers
    t0 = pg.now
    a, b = f"{run_id}/a", f"{run_id}/b"
    pg.send([{"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": a, "summary": "api down"},
             {"event_id": f"{run_id}-2", "action": "trigger", "dedup_key": b, "summary": "db down"}])
    pg.events(f"{run_id}/", 2 * 4)                       # both pages ran step 1
    pg.at(t0 + MIN)
    pg.send([{"event_id": f"{run_id}-3", "action": "acknowledge", "dedup_key": b}])
    pg.events(f"{run_id}/", 2 * 4 + 2)                   # the acknowledgement is in before the clock moves on
    pg.at(t0 + 31 * MIN)                                  # a: every step, then resolved; b: ack timed out
    want = pg.expected(f"{run_id}/")
    got = pg.events(f"{run_id}/", len(want))
    assert sorted({(e["case_id"], e["version"]) for e in got}) == want
    case_a, case_b = (next(e["case_id"] for e in got if e["dedup_key"] == k) for k in (a, b))
    assert _types(got, case_a) == [
        "CaseCreated", "EscalationStepStarted", "RespondersAdded", "NotificationRequested",
        "EscalationStepStarted", "RespondersAdded", "NotificationRequested",
        "EscalationStepStarted", "RespondersAdded"] + ["NotificationRequested"] * 3 + [
        "EscalationEnded", "StatusChanged"]
    assert _types(got, case_b) == [
        "CaseCreated", "EscalationStepStarted", "RespondersAdded", "NotificationRequested",
        "StatusChanged", "EscalationEnded", "AcknowledgeTimedOut", "StatusChanged",
        "EscalationStepStarted", "RespondersAdded", "NotificationRequested"]
    steps = [e for e in got if e["case_id"] == case_a and e["type"] == "EscalationStepStarted"]
    assert [s["occurred_at"] - t0 for s in steps] == [0, 5 * MIN, 15 * MIN]   # at their due times
    # every event exactly as the pure domain made it (same ids, so the same inputs and times)
    assert {e["event_id"] for e in got} == {e["event_id"] for e in pg.model_events if e["dedup_key"] in (a, b)}
    # projections: the on-call properties in PostgreSQL (with names) and Elasticsearch (ids only)
    stack = pg.stack
    rows = stack.poll(lambda: stack.pg("on-call", "SELECT * FROM cases WHERE case_id = $1", case_b),
                      lambda r: r and r[0]["version"] == len(_types(got, case_b)), what="case b projected")
    row = rows[0]
    assert row["status"] == "TRIGGERED" and row["escalation_policy_id"] == "default"
    assert row["acknowledged_at"] is not None and row["time_to_first_acknowledge_ms"] == MIN
    assert row["responder_users"] == ["u-ann"] or row["responder_users"] == ["u-ben"]
    doc = stack.poll(lambda: stack.es("GET", f"/{stack.index('on-call')}/_doc/{case_a}"),
                     lambda d: d.get("found") and d["_source"]["version"] == len(_types(got, case_a)),
                     what="case a indexed")["_source"]
    assert doc["status"] == "RESOLVED" and doc["escalation_active"] is False
    assert set(doc["responder_users"]) == {"u-ann", "u-ben", "u-cat"}
    assert _metric(pg.worker.metrics_port, "casestream_escalation_steps_total") >= 5
    assert _metric(pg.worker.metrics_port, "casestream_time_to_acknowledge_seconds_count") >= 1


def test_case_automation_and_sla(pagers, run_id):
    _, cm = pagers
    t0 = cm.now
    key = f"{run_id}/fraud"
    cm.send([{"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": key, "summary": "fraud ring",
              "severity": "critical"}])
    got = cm.events(f"{run_id}/", 4)
    cid = got[0]["case_id"]
    assert _types(got, cid) == ["CaseCreated", "AutomationApplied", "PriorityChanged", "Assigned"]
    assert next(e for e in got if e["type"] == "Assigned")["actor"]["id"] == "automation:critical-is-p1"
    cm.at(t0 + 15 * MIN)
    got = cm.events(f"{run_id}/", 7)
    assert _types(got, cid)[4:] == ["SlaBreached", "AutomationApplied", "CommentAdded"]
    breach = next(e for e in got if e["type"] == "SlaBreached")
    assert (breach["sla"], breach["due_at"]) == ("first_response", got[0]["occurred_at"] + 15 * MIN)
    stack = cm.stack
    stack.poll(lambda: stack.pg("case-management", "SELECT type FROM timeline WHERE case_id = $1 ORDER BY version",
                                cid), lambda r: len(r) == 7, what="timeline")
    assert _metric(cm.worker.metrics_port, "casestream_sla_breaches_total") >= 1


def test_config_reload_takes_effect_and_bad_config_is_refused(pagers, run_id):
    pg, _ = pagers
    port = pg.worker.metrics_port
    pg.file.write_text(ONCALL.replace("escalation_policy: default", "escalation_policy: other"))
    pg.worker.proc.send_signal(signal.SIGHUP)
    pg.stack.poll(lambda: _metric(port, 'casestream_config_reloads_total{result="ok"'), lambda n: n >= 1,
                  what="the reload")
    pg.send([{"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": f"{run_id}/x", "summary": "x"}])
    got = pg.events(f"{run_id}/", 2)
    assert next(e for e in got if e["type"] == "EscalationStepStarted")["escalation_policy_id"] == "other"
    # an invalid edit is refused; the running config stays
    pg.file.write_text(ONCALL.replace("escalation_policy: default", "escalation_policy: nope"))
    pg.stack.poll(lambda: _metric(port, 'casestream_config_reloads_total{result="error"'), lambda n: n >= 1,
                  what="the refused reload")
    assert "nope" in pg.worker.log_path.read_text()
    pg.send([{"event_id": f"{run_id}-2", "action": "trigger", "dedup_key": f"{run_id}/y", "summary": "y"}])
    got = pg.events(f"{run_id}/y", 2)
    assert next(e for e in got if e["type"] == "EscalationStepStarted")["escalation_policy_id"] == "other"
    pg.file.write_text(ONCALL)  # back to the original for the other tests
    pg.worker.proc.send_signal(signal.SIGHUP)
    pg.model.oncall = load_oncall(pg.tenant, pg.file)
    pg.stack.poll(lambda: _metric(port, 'casestream_config_reloads_total{result="ok"'), lambda n: n >= 2,
                  what="the reload back")


def test_responder_names_and_emails_never_reach_elasticsearch(pagers, run_id):
    pg, _ = pagers
    stack = pg.stack
    pg.send([{"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": f"{run_id}/{i}", "summary": "pii"}
             for i in range(3)])
    pg.at(pg.now + 16 * MIN)                               # every step: all three people are responders
    got = pg.events(f"{run_id}/", len(pg.expected(f"{run_id}/")))
    ids = sorted({e["case_id"] for e in got})
    stack.poll(lambda: stack.es("POST", f"/{stack.index('on-call')}/_mget", {"ids": ids})["docs"],
               lambda docs: all(d.get("found") and len(d["_source"]["responder_users"]) == 3 for d in docs),
               what="documents with every responder")
    # PostgreSQL keeps the full record ...
    # (each projection runs at its own pace: wait for PostgreSQL too)
    stack.poll(lambda: stack.pg("on-call", "SELECT responders::text AS r FROM cases WHERE case_id = ANY($1::text[])",
                                ids),
               lambda rows: len(rows) == len(ids) and all("Cat Pagerson" in r["r"] and "cat.pagerson@example.com"
                                                          in r["r"] for r in rows),
               what="full responder records in PostgreSQL")
    # ... no document of any index holds a name or an e-mail address
    stack.es("POST", "/_refresh")
    everything = stack.es("POST", "/_search", {"query": {"match_all": {}}, "size": 10000})
    text = orjson.dumps(everything).decode()
    assert everything["hits"]["hits"] and all(d["_source"].get("responder_users") is not None
                                              for d in everything["hits"]["hits"]
                                              if d["_source"].get("tenant") == "on-call")
    for secret in ("Pagerson", "pagerson@example.com", "Ann Casey", "ann.casey@example.com"):
        assert secret not in text, secret


def test_timers_fire_exactly_once_after_sigkill(fresh_stack, tmp_path, run_id):
    stack = fresh_stack
    start = (int(time.time() * 1000) // MIN) * MIN
    pg = Pager(stack, "on-call", ONCALL, tmp_path, start)
    worker = pg.start(instance_id=f"timers-{run_id}")
    n = 40
    pg.send([{"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": f"{run_id}/{i}", "summary": "t"}
             for i in range(n)])
    pg.events(f"{run_id}/", n * 4)                          # step 1 everywhere; timers pending
    pg.at(start + 5 * MIN)                                  # step 2 due everywhere ...
    stack.read("on-call", "domain-events", lambda r: r.get("type") == "EscalationStepStarted"
               and r.get("step_index") == 1 and r.get("dedup_key", "").startswith(f"{run_id}/"), count=3)
    worker.kill()                                           # ... killed while they fire
    pg.at(start + 15 * MIN)                                 # and step 3 comes due while it is down
    pg.start(instance_id=worker.instance_id, data_dir=worker.data_dir)
    want = pg.expected(f"{run_id}/")
    got = pg.events(f"{run_id}/", len(want))
    assert sorted({(e["case_id"], e["version"]) for e in got}) == want
    # exactly once: one event id per (case, version), one step start per step and case
    by_pair: dict = {}
    for e in got:
        by_pair.setdefault((e["case_id"], e["version"]), set()).add(e["event_id"])
    assert all(len(v) == 1 for v in by_pair.values())
    steps = {(e["case_id"], e["step_index"]) for e in got if e["type"] == "EscalationStepStarted"}
    assert len(steps) == n * 3
    assert len({e["event_id"] for e in got if e["type"] == "EscalationStepStarted"}) == n * 3
