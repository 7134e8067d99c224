"""Relay subscriptions: config validation (file:line) and routing on the case after each event."""

from __future__ import annotations

import pytest

from helpers import OC, T0, intake
from streams.config import ConfigError, load_topics
from streams.domain.relay import route_events
from streams.oncall_config import load_oncall
from streams.stage.memory import MemoryStage


def load(tmp_path, text):
    p = tmp_path / "on-call.yaml"
    p.write_text(text)
    return load_oncall(OC, p)


SUBS = """\
subscriptions:
  - id: crit
    format: json
    match: {severity: critical, status: [TRIGGERED, ACKNOWLEDGED]}
  - id: status
    event_types: [StatusChanged]
"""


def test_subscriptions_load(tmp_path):
    cfg = load(tmp_path, SUBS)
    crit, status = cfg.subscriptions
    assert (crit.id, crit.format, crit.event_types) == ("crit", "json", ())
    assert crit.match == {"severity": ("critical",), "status": ("TRIGGERED", "ACKNOWLEDGED")}
    assert (status.format, status.event_types, status.match) == ("avro", ("StatusChanged",), {})
    assert load_topics("on-call").relay("crit").name == "on-call.relay.crit"


@pytest.mark.parametrize("old,new,line,word", [
    ("id: crit", "id: Crit_1", 2, "topic name"),
    ("format: json", "format: xml", 3, "unknown format"),
    ("[StatusChanged]", "[StatusChange]", 6, "unknown event type"),
    ("severity: critical", "severity: fatal", 4, "unknown severity"),
    ("id: status", "id: crit", 5, "duplicate"),
])
def test_subscription_errors_name_the_line(tmp_path, old, new, line, word):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, SUBS.replace(old, new))
    assert f"on-call.yaml:{line}:" in str(exc.value) and word in str(exc.value)


def test_routing_uses_the_case_after_each_event(tmp_path):
    cfg = load(tmp_path, SUBS)
    mem = MemoryStage(OC)
    msgs = [{"event_id": "1", "action": "trigger", "dedup_key": "k", "summary": "s", "severity": "critical"},
            {"event_id": "2", "action": "acknowledge", "dedup_key": "k"},
            {"event_id": "3", "action": "resolve", "dedup_key": "k"}]
    routed = []
    for m in msgs:
        it = intake(OC, m, T0)
        entry = mem.entries.get("k")
        before = {cid: c for cid, c in (entry or {}).get("cases", {}).items()}
        d = mem.handle(it)
        routed += [(sub.id, e["type"], e.get("to_status")) for sub, e in
                   route_events(OC, cfg.subscriptions, before, d.events)]
    assert routed == [("crit", "CaseCreated", None),
                      ("crit", "StatusChanged", "ACKNOWLEDGED"), ("status", "StatusChanged", "ACKNOWLEDGED"),
                      ("status", "StatusChanged", "RESOLVED")]   # resolved: no longer matches crit's status


def test_no_subscriptions_no_routing():
    assert route_events(OC, (), {}, [{"case_id": "x"}]) == []



def test_the_readme_notification_config_loads(tmp_path, monkeypatch):
    from streams.config import PROJECT_ROOT

    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("## Notifications: webhooks and Slack", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("OPS_WEBHOOK_SECRET", "whsec_readme")
    cfg = load(tmp_path, block)
    assert cfg.endpoints["ops-webhook"].secret == "whsec_readme"
    assert [ep.name for ep in cfg.user_endpoints("u-bob")] == ["user:u-bob:webhook", "user:u-bob:slack"]
    assert cfg.notification_rules[0].endpoints == ("ops-webhook", "sre-slack")
    assert cfg.delivery.timeout == 5 and cfg.delivery.retry_window == 86400
    monkeypatch.delenv("OPS_WEBHOOK_SECRET")
    with pytest.raises(ConfigError, match="OPS_WEBHOOK_SECRET is not set"):
        load(tmp_path, block)
