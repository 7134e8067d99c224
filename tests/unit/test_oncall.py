"""On-call paging and automation over the case domain (streams/domain/oncall.py): policies run
through every step with a fast (simulated) clock, acknowledgement, acknowledgement timeout, resolve,
low urgency, shadow pages, SLAs, automation rules, timers delivered twice, config changes."""

from __future__ import annotations

import orjson
import pytest

from streams.domain import cases as domain
from streams.domain import oncall as paging
from streams.oncall_config import load_oncall
from streams.stage.memory import MemoryStage

from helpers import CM, OC, T0, intake

MIN = 60_000

ONCALL_YAML = """\
ack_timeout: 30m
users:
  u-alice: {name: Alice Example, email: alice@example.com}
  u-bob: {name: Bob Example, email: bob@example.com}
  u-carol: {name: Carol Example, email: carol@example.com}
teams:
  sre: [u-alice, u-bob, u-carol]
schedules:
  primary:
    time_zone: UTC
    layers:
      - {users: [u-alice, u-bob], rotation_start: "2026-11-23T00:00:00Z", shift_length: 1d}
escalation_policies:
  default:
    steps:
      - {escalate_after_seconds: 300, targets: [{schedule: primary}]}
      - {escalate_after_seconds: 600, targets: [{user: u-carol}]}
      - {escalate_after_seconds: 900, targets: [{team: sre}]}
    retries: 1
    resolve_page_on_policy_end: true
  rr:
    steps:
      - {escalate_after_seconds: 60, targets: [{team: sre}], assignment: round_robin}
    retries: 2
routing_rules:
  - id: db
    match: {source: db-1}
    escalation_policy: rr
  - id: info-low
    match: {severity: info}
    escalation_policy: default
    urgency: low
  - id: all
    match: {}
    escalation_policy: default
automation_rules:
  - id: noisy
    trigger: occurrence_count
    count: 3
    actions:
      - set_priority: P1
      - comment: noisy alert
"""

CM_YAML = """\
ack_timeout: off
users:
  u-alice: {name: Alice Example, email: alice@example.com}
teams:
  desk: [u-alice]
escalation_policies:
  case-escalation:
    steps:
      - {escalate_after_seconds: 600, targets: [{team: desk}]}
automation_rules:
  - id: critical-is-p1
    trigger: case_created
    conditions: {severity: critical}
    actions:
      - set_priority: P1
      - assign: u-alice
  - id: late-first-response
    trigger: sla_breached
    sla: first_response
    actions:
      - comment: first response SLA breached
      - page: case-escalation
  - id: closed
    trigger: status_changed
    to_status: CLOSED
    actions:
      - comment: closed
slas:
  P1: {first_response: 15m, resolution: 4h}
"""


def config(tmp_path, tenant, text):
    p = tmp_path / f"{tenant.name}.yaml"
    p.write_text(text)
    return load_oncall(tenant, p)


class Pager:
    """MemoryStage with on-call config and a simulated clock (ms)."""

    def __init__(self, tenant, cfg):
        self.tenant = tenant
        self.mem = MemoryStage(tenant, cfg)
        self.now = T0
        self.events: list[dict] = []
        self.n = 0

    def send(self, msg: dict) -> domain.Decision:
        self.n += 1
        msg = {"event_id": f"m{self.n}", **msg}
        d = self.mem.handle(intake(self.tenant, msg, self.now))
        self.events += d.events
        return d

    def at(self, ms: int) -> list[dict]:
        """Move the clock to ``ms`` and fire what is due."""
        self.now = ms
        ev = self.mem.advance(ms)
        self.events += ev
        return ev

    def types(self, events=None) -> list[str]:
        return [e["type"] for e in (self.events if events is None else events)]

    def case(self, cid: str) -> dict:
        return domain.replay(self.tenant, [e for e in self.events if e["case_id"] == cid])


def trig(key="k1", **kw):
    return {"action": "trigger", "dedup_key": key, "summary": "disk full", **kw}


@pytest.fixture
def oc(tmp_path):
    return config(tmp_path, OC, ONCALL_YAML)


def test_a_page_runs_every_step_then_retries_then_resolves(oc):
    p = Pager(OC, oc)
    d = p.send(trig())
    cid = d.events[0]["case_id"]
    assert p.types(d.events) == ["CaseCreated", "EscalationStepStarted", "RespondersAdded", "NotificationRequested"]
    step = d.events[1]
    assert (step["escalation_policy_id"], step["step_index"], step["escalation_policy_retry_count"]) == ("default", 0, 0)
    assert step["targets"] == [{"kind": "schedule", "id": "primary"}]
    assert step["next_escalation_at"] == T0 + 5 * MIN
    # 2026-11-24 is the second day of the daily rotation: Bob
    assert d.events[2]["responders"] == [{"id": "u-bob", "name": "Bob Example", "email": "bob@example.com"}]
    assert d.events[3]["user_id"] == "u-bob" and d.events[3]["is_shadow"] is False
    assert [t["kind"] for t in p.mem.pending()] == ["escalation"]

    assert p.at(T0 + 5 * MIN - 1) == []                       # not yet due
    ev = p.at(T0 + 5 * MIN)                                  # step 2: Carol
    assert p.types(ev) == ["EscalationStepStarted", "RespondersAdded", "NotificationRequested"]
    assert ev[0]["step_index"] == 1 and ev[0]["occurred_at"] == T0 + 5 * MIN and ev[2]["user_id"] == "u-carol"
    ev = p.at(T0 + 15 * MIN)                                 # step 3: the team, everyone
    assert [e["user_id"] for e in ev if e["type"] == "NotificationRequested"] == ["u-alice", "u-bob", "u-carol"]
    ev = p.at(T0 + 30 * MIN)                                 # retry 1 from step 1
    assert ev[0]["step_index"] == 0 and ev[0]["escalation_policy_retry_count"] == 1
    ev = p.at(T0 + 60 * MIN)                                 # steps 2, 3 of the retry, then the end
    assert p.types(ev)[-2:] == ["EscalationEnded", "StatusChanged"]
    assert ev[-2]["reason"] == "policy_end" and ev[-2]["resolves_page"] is True
    assert ev[-1]["to_status"] == "RESOLVED" and ev[-1]["reason"] == "policy_end"
    assert p.mem.pending() == []
    case = p.case(cid)
    assert case["status"] == "RESOLVED" and case["escalation_active"] is False
    assert case["responder_users"] == ["u-bob", "u-carol", "u-alice"]
    assert [e["version"] for e in p.events] == list(range(1, len(p.events) + 1))


def test_acknowledge_stops_escalation_and_timeout_retriggers(oc):
    p = Pager(OC, oc)
    cid = p.send(trig()).events[0]["case_id"]
    escalation_timer = p.mem.pending()[0]
    p.now = T0 + 2 * MIN
    d = p.send({"action": "acknowledge", "dedup_key": "k1"})
    assert p.types(d.events) == ["StatusChanged", "EscalationEnded"]
    assert d.events[1]["reason"] == "acknowledged"
    assert [t["kind"] for t in p.mem.pending()] == ["ack_timeout"]
    assert p.mem.pending()[0]["due_at"] == T0 + 32 * MIN
    case = p.case(cid)
    assert case["acknowledged_at"] == T0 + 2 * MIN and case["time_to_first_acknowledge"] == 2 * MIN

    # the cancelled escalation timer, delivered anyway, does nothing
    stale = p.mem.fire(escalation_timer)
    assert stale.noop and not stale.events

    ev = p.at(T0 + 32 * MIN)
    assert p.types(ev)[:3] == ["AcknowledgeTimedOut", "StatusChanged", "EscalationStepStarted"]
    assert ev[0]["timeout_seconds"] == 1800 and ev[0]["acknowledged_at"] == T0 + 2 * MIN
    assert (ev[1]["from_status"], ev[1]["to_status"], ev[1]["reason"]) == ("ACKNOWLEDGED", "TRIGGERED", "ack_timeout")
    assert ev[2]["step_index"] == 0 and ev[2]["next_escalation_at"] == T0 + 37 * MIN
    assert [t["kind"] for t in p.mem.pending()] == ["escalation"]
    # acknowledged again: acknowledged_at keeps the first acknowledgement
    p.now = T0 + 33 * MIN
    p.send({"action": "acknowledge", "dedup_key": "k1"})
    assert p.case(cid)["acknowledged_at"] == T0 + 2 * MIN


def test_resolve_stops_everything(oc):
    p = Pager(OC, oc)
    p.send(trig())
    d = p.send({"action": "resolve", "dedup_key": "k1"})
    assert p.types(d.events) == ["StatusChanged", "EscalationEnded"] and d.events[1]["reason"] == "resolved"
    assert p.mem.pending() == []
    assert p.at(T0 + 10 * 60 * MIN) == []


def test_low_urgency_notifies_step_one_only(oc):
    p = Pager(OC, oc)
    d = p.send(trig(severity="info"))
    assert p.types(d.events) == ["CaseCreated", "EscalationStepStarted", "RespondersAdded", "NotificationRequested"]
    assert d.events[1]["urgency"] == "low" and d.events[1]["next_escalation_at"] is None
    assert p.mem.pending() == []
    assert p.at(T0 + 24 * 60 * MIN) == []


def test_shadow_pages_run_the_policy_with_shadow_notifications(oc):
    p = Pager(OC, oc)
    d = p.send(trig(is_shadow=True))
    p.at(T0 + 15 * MIN)
    notes = [e for e in p.events if e["type"] == "NotificationRequested"]
    assert len(notes) == 1 + 1 + 3 and all(n["is_shadow"] for n in notes)
    assert d.events[1]["is_shadow"] is True
    assert p.case(d.events[0]["case_id"])["is_shadow"] is True


def test_round_robin_takes_turns_and_event_policy_wins(oc):
    p = Pager(OC, oc)
    p.send(trig(source="db-1"))
    p.at(T0 + 3 * MIN)
    users = [e["user_id"] for e in p.events if e["type"] == "NotificationRequested"]
    assert users == ["u-alice", "u-bob", "u-carol"]      # one per run of the step, in turn
    q = Pager(OC, oc)
    d = q.send(trig(source="db-1", escalation_policy_id="default"))
    assert d.events[1]["escalation_policy_id"] == "default"
    r = Pager(OC, oc)
    d = r.send(trig(escalation_policy_id="no-such-policy"))
    assert d.events[1]["escalation_policy_id"] == "default"  # unknown: routing rules decide


def test_a_timer_fires_once(oc):
    p = Pager(OC, oc)
    p.send(trig())
    t = p.mem.pending()[0]
    first = p.mem.fire(t)
    assert first.events
    again = p.mem.fire(t)
    assert again.duplicate and not again.events


def test_timers_are_deterministic(oc):
    def run():
        p = Pager(OC, oc)
        p.send(trig())
        p.at(T0 + 20 * MIN)
        return orjson.dumps(p.events)

    assert run() == run()


def test_occurrence_count_rule(oc):
    p = Pager(OC, oc)
    p.send(trig())
    p.send(trig())
    d = p.send(trig())
    assert p.types(d.events) == ["AlertDeduplicated", "AutomationApplied", "PriorityChanged", "CommentAdded"]
    assert d.events[1]["rule_id"] == "noisy" and d.events[1]["actions"] == ["set_priority:P1", "comment:noisy alert"]
    assert d.events[2]["actor"]["id"] == "automation:noisy"
    assert p.types(p.send(trig()).events) == ["AlertDeduplicated"]  # count 4: no rule


def test_policy_removed_from_config_ends_escalation(oc, tmp_path):
    p = Pager(OC, oc)
    p.send(trig())
    p.mem.oncall = config(tmp_path, OC, ONCALL_YAML.replace("escalation_policy: default", "escalation_policy: rr")
                          .replace("  default:\n", "  unused:\n"))
    ev = p.at(T0 + 5 * MIN)
    assert p.types(ev) == ["EscalationEnded"] and ev[0]["reason"] == "policy_removed"


def test_sla_breach_runs_automation(tmp_path):
    cfg = config(tmp_path, CM, CM_YAML)
    p = Pager(CM, cfg)
    d = p.send(trig(severity="critical"))
    cid = d.events[0]["case_id"]
    assert p.types(d.events) == ["CaseCreated", "AutomationApplied", "PriorityChanged", "Assigned"]
    assert d.events[3]["assignee"]["id"] == "u-alice"
    assert [(t["kind"], t["due_at"]) for t in p.mem.pending()] == [("sla", T0 + 15 * MIN)]
    ev = p.at(T0 + 15 * MIN)
    assert p.types(ev) == ["SlaBreached", "AutomationApplied", "CommentAdded", "EscalationStepStarted",
                           "RespondersAdded", "NotificationRequested"]
    assert ev[0]["sla"] == "first_response" and ev[0]["due_at"] == T0 + 15 * MIN and ev[0]["priority"] == "P1"
    assert sorted(t["kind"] for t in p.mem.pending()) == ["escalation", "sla"]
    assert [t["due_at"] for t in p.mem.pending() if t["kind"] == "sla"] == [T0 + 240 * MIN]
    # working the case stops the escalation and meets nothing late twice
    p.now = T0 + 20 * MIN
    d = p.send({"command": "set_status", "dedup_key": "k1", "status": "IN_PROGRESS",
                "actor": {"id": "u-alice"}})
    assert p.types(d.events) == ["StatusChanged", "EscalationEnded"]
    p.now = T0 + 30 * MIN
    d = p.send({"command": "set_status", "dedup_key": "k1", "status": "CLOSED", "actor": {"id": "u-alice"}})
    assert p.types(d.events) == ["StatusChanged", "AutomationApplied", "CommentAdded"]
    assert p.mem.pending() == []
    assert p.case(cid)["sla_breaches"] == ["first_response"]


def test_sla_follows_priority_changes(tmp_path):
    cfg = config(tmp_path, CM, CM_YAML)
    p = Pager(CM, cfg)
    p.send(trig())
    assert p.mem.pending() == []                          # no priority, no SLA
    p.now = T0 + MIN
    p.send({"command": "set_priority", "dedup_key": "k1", "priority": "P1", "actor": {"id": "u-alice"}})
    assert [t["due_at"] for t in p.mem.pending()] == [T0 + 15 * MIN]   # counted from creation
    p.send({"command": "set_priority", "dedup_key": "k1", "priority": "P3", "actor": {"id": "u-alice"}})
    assert p.mem.pending() == []


def test_without_config_nothing_follows():
    mem = MemoryStage(OC)
    d = mem.handle(intake(OC, {"event_id": "x", **trig()}, T0))
    assert [e["type"] for e in d.events] == ["CaseCreated"]
    assert "oncall" not in mem.entries["k1"]


def test_pending_timers_index(oc):
    p = Pager(OC, oc)
    p.send(trig())
    entry = p.mem.entries["k1"]
    timers = paging.pending_timers(entry)
    (tid, t), = timers.items()
    assert t == {"timer_id": tid, "case_id": t["case_id"], "kind": "escalation", "due_at": T0 + 5 * MIN,
                 "dedup_key": "k1"}
    assert paging.is_pending(entry, t)


def test_the_readme_worked_example_is_true(tmp_path):
    """The README's example config loads, and a page runs as the README says."""
    from datetime import datetime

    from streams.config import PROJECT_ROOT

    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("### A worked example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = config(tmp_path, OC, block)
    t0 = int(datetime.fromisoformat("2026-11-24T10:00:00+01:00").timestamp() * 1000)
    p = Pager(OC, cfg)
    p.now = t0
    d = p.send(trig())
    assert d.events[2]["responders"][0]["id"] == "u-bob"
    assert d.events[1]["next_escalation_at"] == t0 + 5 * MIN
    p.at(t0 + 60 * MIN)
    steps = [(e["occurred_at"] - t0) // MIN for e in p.events if e["type"] == "EscalationStepStarted"]
    assert steps == [0, 5, 15, 30, 35, 45]
    end = [e for e in p.events if e["type"] == "EscalationEnded"]
    assert len(end) == 1 and end[0]["reason"] == "policy_end" and (end[0]["occurred_at"] - t0) // MIN == 60
    q = Pager(OC, cfg)
    q.now = t0
    q.send(trig())
    q.now = t0 + 2 * MIN
    q.send({"action": "acknowledge", "dedup_key": "k1"})
    ev = q.at(t0 + 32 * MIN)
    assert q.types(ev)[:2] == ["AcknowledgeTimedOut", "StatusChanged"]
