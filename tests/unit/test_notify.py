"""Which deliveries events ask for (streams/domain/notify.py), and outcomes recorded once."""

from __future__ import annotations

from helpers import OC, T0, intake
from streams.domain import cases as domain
from streams.domain import notify
from streams.oncall_config import load_oncall
from streams.stage.memory import MemoryStage

CFG = """\
users:
  u-ann: {name: Ann, email: ann@example.com, contact: {webhook: "https://hooks.example.com/ann"}}
escalation_policies:
  p: {steps: [{escalate_after_seconds: 300, targets: [{user: u-ann}]}]}
routing_rules:
  - {id: pages, match: {source: pager}, escalation_policy: p}
endpoints:
  ops: {type: webhook, url: "https://hooks.example.com/ops"}
  chat: {type: slack, url: "https://hooks.slack.com/services/x"}
notification_rules:
  - {id: critical, match: {severity: critical}, endpoints: [ops, chat]}
  - {id: also-ops, event_types: [CaseCreated], endpoints: [ops]}
"""


def setup(tmp_path):
    p = tmp_path / "on-call.yaml"
    p.write_text(CFG)
    cfg = load_oncall(OC, p)
    return cfg, MemoryStage(OC, cfg)


def run(mem, cfg, msg):
    entry = mem.entries.get(msg["dedup_key"])
    before = dict((entry or {}).get("cases", {}))
    d = mem.handle(intake(OC, msg, T0))
    return d, notify.deliveries(OC, cfg, before, d.events)


def test_rules_and_contacts(tmp_path):
    cfg, mem = setup(tmp_path)
    d, reqs = run(mem, cfg, {"event_id": "1", "action": "trigger", "dedup_key": "k", "summary": "s",
                             "severity": "critical", "source": "pager"})
    by_event = [(d.events[r["event_index"]]["type"], r["endpoint"]) for r in reqs]
    # CaseCreated: ops once (two rules), chat; the page's NotificationRequested: Ann's webhook
    # (and the critical rule, which matches every event of the case)
    assert ("CaseCreated", "ops") in by_event and ("CaseCreated", "chat") in by_event
    assert by_event.count(("CaseCreated", "ops")) == 1
    assert ("NotificationRequested", "user:u-ann:webhook") in by_event
    ids = [r["delivery_id"] for r in reqs]
    assert len(ids) == len(set(ids))
    note = next(r for r in reqs if r["endpoint"] == "user:u-ann:webhook")
    assert note["user_id"] == "u-ann" and note["notification_id"]
    assert note["case"]["summary"] == "s"


def test_shadow_pages_send_nothing(tmp_path):
    cfg, mem = setup(tmp_path)
    d, reqs = run(mem, cfg, {"event_id": "1", "action": "trigger", "dedup_key": "k", "summary": "s",
                             "severity": "critical", "source": "pager", "is_shadow": True})
    assert any(e["type"] == "NotificationRequested" and e["is_shadow"] for e in d.events)
    assert reqs == []


def test_outcomes_are_never_notified_and_recorded_once(tmp_path):
    cfg, mem = setup(tmp_path)
    d, reqs = run(mem, cfg, {"event_id": "1", "action": "trigger", "dedup_key": "k", "summary": "s",
                             "severity": "critical"})
    req = reqs[0]
    outcome = {"kind": "delivery", "outcome": "failed", "delivery_id": req["delivery_id"], "case_id": req["case_id"],
               "dedup_key": "k", "endpoint": req["endpoint"], "channel": req["channel"], "attempts": 2,
               "status_code": 410, "reason": "HTTP 410", "permanent": True, "at": T0 + 5000}
    entry = mem.entries["k"]
    dec = notify.decide_outcome(OC, outcome, entry)
    assert [e["type"] for e in dec.events] == ["NotificationFailed"]
    disabled = dict(outcome, outcome="disabled", consecutive_failures=5)
    dis = notify.decide_outcome(OC, disabled, dec.entry)
    assert [(e["type"], e["consecutive_failures"]) for e in dis.events] == [("EndpointDisabled", 5)]
    assert notify.deliveries(OC, cfg, dict(entry["cases"]), dec.events) == []
    remembered = domain.remember(dec.entry, notify.outcome_intake(OC, outcome).event_id, [])
    assert notify.decide_outcome(OC, outcome, remembered).duplicate


def test_endpoint_for(tmp_path):
    cfg, _ = setup(tmp_path)
    assert notify.endpoint_for(cfg, "ops").url.endswith("/ops")
    assert notify.endpoint_for(cfg, "user:u-ann:webhook").url.endswith("/ann")
    assert notify.endpoint_for(cfg, "user:u-ann:slack") is None
    assert notify.endpoint_for(cfg, "gone") is None
