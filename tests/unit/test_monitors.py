"""streams.domain.monitors: monitor webhooks -> canonical intake messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import orjson
import pytest

from streams.config import get_tenant
from streams.domain.intake import Intake, derive_id, parse, record_event_id
from streams.domain.monitors import (
    DATADOG_TEMPLATE, DEFAULT_SEVERITY, MAX_EVENTS, MONITOR_KINDS, PayloadError, translate,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "monitors"
ONCALL = get_tenant("on-call")
T0 = 1_795_514_400_000  # 2026-11-24T10:00:00Z

FIXTURE_KINDS = {
    "alertmanager_firing.json": "alertmanager",
    "alertmanager_resolved.json": "alertmanager",
    "grafana_alerting.json": "grafana",
    "grafana_ok.json": "grafana",
    "datadog_triggered.json": "datadog",
    "datadog_recovered.json": "datadog",
    "pagerduty_trigger.json": "pagerduty",
    "pagerduty_acknowledge.json": "pagerduty",
    "pagerduty_resolve.json": "pagerduty",
}


def load(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def valid(msgs: list[dict]) -> list[Intake]:
    """Every message passes intake.parse; the parsed intakes."""
    out = []
    for m in msgs:
        r = parse(orjson.dumps(m), ONCALL, T0)
        assert isinstance(r, Intake), f"{m!r} was rejected: {r!r}"
        out.append(r)
    return out


def run(kind: str, body, options=None) -> list[dict]:
    msgs = translate(kind, body, options)
    valid(msgs)
    return msgs


def errors_of(kind: str, body, options=None) -> list[dict]:
    with pytest.raises(PayloadError) as exc:
        translate(kind, body, options)
    assert exc.value.errors, "a PayloadError carries its field errors"
    for e in exc.value.errors:
        assert set(e) == {"field", "message"} and e["field"] and e["message"]
    return exc.value.errors


def fields(errors: list[dict]) -> list[str]:
    return [e["field"] for e in errors]


# --------------------------------------------------------------------------
# all fixtures
# --------------------------------------------------------------------------


def test_every_fixture_is_listed():
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(FIXTURE_KINDS)


@pytest.mark.parametrize("name", sorted(FIXTURE_KINDS))
def test_every_fixture_translates_to_valid_intake(name):
    msgs = translate(FIXTURE_KINDS[name], load(name))
    assert msgs
    for m, i in zip(msgs, valid(msgs)):
        assert i.kind == "alert" and i.op == m["action"]
        assert i.dedup_key == m["dedup_key"]
        if "event_id" in m:
            assert i.event_id == m["event_id"]
        if "timestamp" in m:  # the monitor's own time, not the receive time
            assert i.timestamp != T0


@pytest.mark.parametrize("name", sorted(FIXTURE_KINDS))
def test_same_notification_twice_is_identical(name):
    body = load(name)
    assert translate(FIXTURE_KINDS[name], body) == translate(FIXTURE_KINDS[name], copy.deepcopy(body))


def test_unknown_kind():
    with pytest.raises(ValueError) as exc:
        translate("nagios", {})
    assert not isinstance(exc.value, PayloadError)
    assert "nagios" in str(exc.value)


@pytest.mark.parametrize("options", [{"dedup_by": "fingerprint"}, {"group": True}])
def test_invalid_options(options):
    with pytest.raises(ValueError) as exc:
        translate("alertmanager", load("alertmanager_firing.json"), options)
    assert not isinstance(exc.value, PayloadError)


def test_kinds():
    assert MONITOR_KINDS == ("pagerduty", "alertmanager", "grafana", "datadog", "events")


def test_payload_error_shape():
    e = PayloadError([{"field": "payload.summary", "message": "is missing or blank"}])
    assert isinstance(e, ValueError)
    assert e.errors == [{"field": "payload.summary", "message": "is missing or blank"}]
    assert "payload.summary" in str(e)


# --------------------------------------------------------------------------
# Alertmanager
# --------------------------------------------------------------------------

AM_KEYS = ["5c8d4a1e9b7f3026", "a3f29c07d41e8b65", "0e7b6c2d9f134a88"]
AM_GROUP_KEY = '{}/{team="payments"}:{cluster="prod-eu-west-1", namespace="payments"}'


def test_alertmanager_firing_group():
    body = load("alertmanager_firing.json")
    msgs = run("alertmanager", body)
    assert [m["action"] for m in msgs] == ["trigger"] * 3
    assert [m["dedup_key"] for m in msgs] == AM_KEYS
    assert [m["severity"] for m in msgs] == ["critical", "warning", "warning"]
    assert [m["summary"] for m in msgs] == ["payments-api 5xx error rate is 5.3%", "Pod is crash looping.",
                                            "Pod is crash looping."]
    assert [m["timestamp"] for m in msgs] == ["2026-11-24T09:57:31.482Z", "2026-11-24T09:58:02.117Z",
                                              "2026-11-24T09:58:02.117Z"]
    assert [m["event_id"] for m in msgs] == [
        derive_id("alertmanager", a["fingerprint"], "firing", a["startsAt"]) for a in body["alerts"]]
    assert len(set(m["event_id"] for m in msgs)) == 3

    first, second = msgs[0], msgs[1]
    # no instance label: source falls back to the job
    assert (first["source"], first["component"], first["group"], first["class"]) == (
        "payments-api", "payments-api", "prod-eu-west-1", "PaymentsApiHighErrorRate")
    assert (second["source"], second["component"], second["group"], second["class"]) == (
        "10.42.7.19:8080", "kube-state-metrics", "prod-eu-west-1", "KubePodCrashLooping")
    assert first["links"] == [
        {"href": body["alerts"][0]["generatorURL"], "text": "Source"},
        {"href": "https://alertmanager.prod-eu-west-1.example.com", "text": "Alertmanager"},
        {"href": "https://runbooks.example.com/payments/payments-api-high-error-rate", "text": "Runbook"},
    ]
    assert first["tags"] == ["alertname:PaymentsApiHighErrorRate", "severity:critical", "cluster:prod-eu-west-1",
                             "namespace:payments", "job:payments-api", "service:payments-api", "team:payments"]
    assert first["custom_details"] == {
        "labels": body["alerts"][0]["labels"], "annotations": body["alerts"][0]["annotations"],
        "receiver": "casestream-payments", "group_key": AM_GROUP_KEY,
    }
    assert "priority" not in first and "urgency" not in first


def test_alertmanager_resolved_group():
    firing = run("alertmanager", load("alertmanager_firing.json"))
    body = load("alertmanager_resolved.json")
    msgs = run("alertmanager", body)
    assert [m["action"] for m in msgs] == ["resolve"] * 3
    # firing then resolved of the same alert: the same dedup key
    assert [m["dedup_key"] for m in msgs] == [m["dedup_key"] for m in firing] == AM_KEYS
    assert [m["timestamp"] for m in msgs] == ["2026-11-24T10:21:31.482Z", "2026-11-24T10:16:02.117Z",
                                              "2026-11-24T10:18:32.117Z"]
    assert [m["event_id"] for m in msgs] == [
        derive_id("alertmanager", a["fingerprint"], "resolved", a["startsAt"], a["endsAt"]) for a in body["alerts"]]
    assert not set(m["event_id"] for m in msgs) & set(m["event_id"] for m in firing)


def test_alertmanager_new_firing_period_is_a_new_event():
    body = load("alertmanager_firing.json")
    again = copy.deepcopy(body)
    again["alerts"][0]["startsAt"] = "2026-11-24T11:30:00Z"
    a, b = translate("alertmanager", body)[0], translate("alertmanager", again)[0]
    assert a["dedup_key"] == b["dedup_key"] and a["event_id"] != b["event_id"]


def test_alertmanager_group_mode():
    firing = run("alertmanager", load("alertmanager_firing.json"), {"dedup_by": "group"})
    resolved = run("alertmanager", load("alertmanager_resolved.json"), {"dedup_by": "group"})
    assert len(firing) == len(resolved) == 1
    f, r = firing[0], resolved[0]
    assert (f["action"], r["action"]) == ("trigger", "resolve")
    assert f["dedup_key"] == r["dedup_key"] == AM_GROUP_KEY
    assert f["severity"] == "critical"  # the worst of the firing alerts
    assert f["summary"] == "[FIRING:3] prod-eu-west-1 payments"
    assert r["summary"] == "[RESOLVED:3] prod-eu-west-1 payments"
    assert f["timestamp"] == "2026-11-24T09:57:31.482Z"  # the earliest startsAt
    assert r["timestamp"] == "2026-11-24T10:21:31.482Z"  # the latest endsAt
    assert (f["source"], f["group"]) == ("alertmanager", "prod-eu-west-1")  # from commonLabels
    assert [a["fingerprint"] for a in f["custom_details"]["alerts"]] == AM_KEYS
    assert f["custom_details"]["group_labels"] == {"cluster": "prod-eu-west-1", "namespace": "payments"}
    assert f["links"][0] == {"href": "https://alertmanager.prod-eu-west-1.example.com", "text": "Alertmanager"}
    assert f["event_id"] != r["event_id"]
    # idempotent
    assert run("alertmanager", load("alertmanager_firing.json"), {"dedup_by": "group"}) == firing


def test_alertmanager_group_mode_partly_resolved_is_a_trigger_with_a_new_event_id():
    body = load("alertmanager_firing.json")
    before = translate("alertmanager", body, {"dedup_by": "group"})[0]
    body["alerts"][0]["status"] = "resolved"
    body["alerts"][0]["endsAt"] = "2026-11-24T10:05:00Z"
    [m] = run("alertmanager", body, {"dedup_by": "group"})
    assert m["action"] == "trigger" and m["dedup_key"] == AM_GROUP_KEY
    assert m["severity"] == "warning"  # only the still-firing alerts count
    assert m["event_id"] != before["event_id"]


def test_alertmanager_group_mode_needs_a_group_key():
    body = load("alertmanager_firing.json")
    del body["groupKey"]
    assert fields(errors_of("alertmanager", body, {"dedup_by": "group"})) == ["groupKey"]
    assert len(translate("alertmanager", body)) == 3  # per alert, it is not needed


def test_alertmanager_long_group_key_is_hashed():
    body = load("alertmanager_firing.json")
    body["groupKey"] = "{}:{" + ", ".join(f'label{i}="{"v" * 20}"' for i in range(20)) + "}"
    [m] = run("alertmanager", body, {"dedup_by": "group"})
    assert m["dedup_key"].startswith("sha256:") and len(m["dedup_key"]) == 71
    assert translate("alertmanager", body, {"dedup_by": "group"})[0]["dedup_key"] == m["dedup_key"]


@pytest.mark.parametrize("label, expected", [
    ("critical", "critical"), ("page", "critical"), ("P1", "critical"), ("CRITICAL", "critical"),
    ("error", "error"), ("high", "error"), ("major", "error"),
    ("warning", "warning"), ("warn", "warning"), ("medium", "warning"), ("minor", "warning"),
    ("info", "info"), ("informational", "info"), ("low", "info"), ("none", "info"),
    (" Warning ", "warning"), ("sev-unknown", DEFAULT_SEVERITY), ("", DEFAULT_SEVERITY), (None, DEFAULT_SEVERITY),
])
def test_severity_mapping(label, expected):
    assert DEFAULT_SEVERITY == "error"
    body = load("alertmanager_firing.json")
    labels = body["alerts"][0]["labels"]
    if label is None:
        del labels["severity"]
    else:
        labels["severity"] = label
    assert run("alertmanager", body)[0]["severity"] == expected
    assert run("grafana", body)[0]["severity"] == expected


def test_alertmanager_summary_fallbacks():
    body = load("alertmanager_firing.json")
    ann, labels = body["alerts"][0]["annotations"], body["alerts"][0]["labels"]
    del ann["summary"]
    assert run("alertmanager", body)[0]["summary"] == ann["description"]
    del ann["description"]
    assert run("alertmanager", body)[0]["summary"] == "PaymentsApiHighErrorRate"
    del labels["alertname"]
    assert run("alertmanager", body)[0]["summary"] == "alertmanager alert 5c8d4a1e9b7f3026"
    ann["summary"] = "x" * 5000
    assert run("alertmanager", body)[0]["summary"] == "x" * 1024


def test_alertmanager_label_fallbacks():
    body = load("alertmanager_firing.json")
    labels = body["alerts"][0]["labels"]
    for name in ("job", "cluster"):
        del labels[name]
    m = run("alertmanager", body)[0]
    assert (m["source"], m["component"], m["group"]) == ("alertmanager", "payments-api", "payments")
    labels["instance"] = "i" * 300
    assert run("alertmanager", body)[0]["source"] == "i" * 255


def test_alertmanager_zero_ends_at_is_ignored():
    body = load("alertmanager_resolved.json")
    body["alerts"][0]["endsAt"] = "0001-01-01T00:00:00Z"
    msgs = translate("alertmanager", body)
    assert "timestamp" not in msgs[0]
    assert valid(msgs)[0].timestamp == T0  # the receive time


def test_alertmanager_alert_without_fingerprint_gets_a_stable_key():
    body = load("alertmanager_firing.json")
    del body["alerts"][0]["fingerprint"]
    m = run("alertmanager", body)[0]
    assert m["dedup_key"].startswith("labels-") and len(m["dedup_key"]) == 23
    shuffled = copy.deepcopy(body)
    shuffled["alerts"][0]["labels"] = dict(reversed(list(body["alerts"][0]["labels"].items())))
    assert translate("alertmanager", shuffled)[0]["dedup_key"] == m["dedup_key"]


def test_alertmanager_empty_alerts():
    body = load("alertmanager_firing.json")
    body["alerts"] = []
    assert translate("alertmanager", body) == []
    assert translate("alertmanager", body, {"dedup_by": "group"}) == []


def test_alertmanager_truncated_alerts_are_noted():
    body = load("alertmanager_firing.json")
    body["truncatedAlerts"] = 7
    assert run("alertmanager", body)[0]["custom_details"]["truncated_alerts"] == 7


@pytest.mark.parametrize("body, expected", [
    ([], ["body"]),
    ("firing", ["body"]),
    ({"version": "4", "status": "firing"}, ["alerts"]),
    ({"alerts": {"status": "firing"}}, ["alerts"]),
    ({"alerts": ["firing"]}, ["alerts[0]"]),
])
def test_alertmanager_malformed_shape(body, expected):
    assert fields(errors_of("alertmanager", body)) == expected


def test_alertmanager_malformed_alerts_report_every_field():
    body = load("alertmanager_firing.json")
    del body["alerts"][0]["labels"]
    body["alerts"][1]["labels"]["pod"] = 42
    body["alerts"][1]["startsAt"] = "yesterday"
    del body["alerts"][2]["status"]
    body["alerts"].append({"status": "pending", "labels": {"alertname": "X"}, "annotations": ["nope"]})
    errors = errors_of("alertmanager", body)
    assert fields(errors) == ["alerts[0].labels", "alerts[1].labels", "alerts[1].startsAt", "alerts[2].status",
                              "alerts[3].annotations", "alerts[3].status"]
    assert errors[0]["message"] == "is missing"
    assert "'firing' or 'resolved'" in errors[5]["message"]


# --------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------

GRAFANA_KEYS = ["7f1c3e9a2b5d8046", "c2a94d0e6b71f583"]


def test_grafana_alerting():
    body = load("grafana_alerting.json")
    msgs = run("grafana", body)
    assert [m["action"] for m in msgs] == ["trigger", "trigger"]
    assert [m["dedup_key"] for m in msgs] == GRAFANA_KEYS
    assert [m["severity"] for m in msgs] == ["critical", "critical"]
    assert [m["summary"] for m in msgs] == ["Disk /var/lib/postgresql on pg-primary-1 is 93.4% full",
                                            "Disk /var/lib/postgresql on pg-replica-2 is 91.8% full"]
    assert [m["timestamp"] for m in msgs] == ["2026-11-24T09:55:00+01:00", "2026-11-24T09:56:00+01:00"]
    assert [m["event_id"] for m in msgs] == [
        derive_id("grafana", a["fingerprint"], "firing", a["startsAt"]) for a in body["alerts"]]
    m, a = msgs[0], body["alerts"][0]
    assert (m["source"], m["component"], m["group"], m["class"]) == (
        "pg-primary-1.prod.internal:9100", "node", "Infrastructure", "High disk usage")
    assert [link["text"] for link in m["links"]] == ["Source", "Dashboard", "Panel", "Silence", "Grafana", "Runbook"]
    assert m["links"][1]["href"] == a["dashboardURL"]
    assert m["custom_details"]["values"] == {"A": 93.41, "C": 1}
    assert m["custom_details"]["value_string"] == a["valueString"]
    assert m["custom_details"]["org_id"] == 1
    assert m["tags"] == ["alertname:High disk usage", "severity:critical", "job:node", "team:dba",
                         "grafana_folder:Infrastructure"]


def test_grafana_ok():
    alerting = translate("grafana", load("grafana_alerting.json"))
    body = load("grafana_ok.json")
    msgs = run("grafana", body)
    assert [m["action"] for m in msgs] == ["resolve", "resolve"]
    assert [m["dedup_key"] for m in msgs] == [m["dedup_key"] for m in alerting] == GRAFANA_KEYS
    assert [m["timestamp"] for m in msgs] == ["2026-11-24T10:41:00+01:00"] * 2
    assert [m["event_id"] for m in msgs] == [
        derive_id("grafana", a["fingerprint"], "resolved", a["startsAt"], a["endsAt"]) for a in body["alerts"]]


def test_grafana_and_alertmanager_event_ids_differ():
    body = load("grafana_alerting.json")
    assert translate("grafana", body)[0]["event_id"] != translate("alertmanager", body)[0]["event_id"]


def test_grafana_without_instance_or_job_is_sourced_grafana():
    body = load("grafana_alerting.json")
    for label in ("instance", "job"):
        del body["alerts"][0]["labels"][label]
    m = run("grafana", body)[0]
    assert m["source"] == "grafana" and "component" not in m


def test_grafana_image_and_no_data():
    body = load("grafana_alerting.json")
    a = body["alerts"][0]
    a["imageURL"] = "https://grafana.example.com/public/img/attachments/7Lq2bQ.png"
    a["labels"]["alertname"] = "DatasourceNoData"
    m = run("grafana", body)[0]
    assert {"href": a["imageURL"], "text": "Image"} in m["links"]
    assert "no_data" in m["tags"]


def test_grafana_group_mode_uses_the_title():
    [m] = run("grafana", load("grafana_alerting.json"), {"dedup_by": "group"})
    assert m["summary"] == "[FIRING:2] High disk usage Infrastructure (node /var/lib/postgresql critical dba)"
    assert m["dedup_key"] == load("grafana_alerting.json")["groupKey"]
    assert m["custom_details"]["message"].startswith("**Firing**")
    [r] = run("grafana", load("grafana_ok.json"), {"dedup_by": "group"})
    assert r["action"] == "resolve" and r["dedup_key"] == m["dedup_key"]


def test_grafana_malformed():
    body = load("grafana_alerting.json")
    body["alerts"][0]["values"] = [93.41]
    body["alerts"][1]["status"] = "alerting"
    body["alerts"][1]["dashboardURL"] = 7
    assert fields(errors_of("grafana", body)) == ["alerts[0].values", "alerts[1].status", "alerts[1].dashboardURL"]


# --------------------------------------------------------------------------
# Datadog
# --------------------------------------------------------------------------

DD_CYCLE_KEY = "7813254905120593921"


def dd(**overrides) -> dict:
    body = load("datadog_triggered.json")
    body.update(overrides)
    return body


def test_datadog_template_uses_the_documented_variables():
    values = set(DATADOG_TEMPLATE.values())
    for var in ("$ID", "$ALERT_ID", "$ALERT_TRANSITION", "$AGGREG_KEY", "$ALERT_CYCLE_KEY", "$ALERT_PRIORITY",
                "$ALERT_TYPE", "$EVENT_TITLE", "$EVENT_MSG", "$TAGS", "$HOSTNAME", "$LINK", "$DATE"):
        assert var in values
    assert set(load("datadog_triggered.json")) == set(DATADOG_TEMPLATE)
    json.dumps(DATADOG_TEMPLATE)  # pasteable JSON


def test_datadog_triggered():
    body = load("datadog_triggered.json")
    [m] = run("datadog", body)
    assert m["action"] == "trigger"
    assert m["dedup_key"] == DD_CYCLE_KEY
    assert m["event_id"] == derive_id("datadog", "7813254906126438417")
    assert m["severity"] == "critical"  # error + P1
    assert m["priority"] == "P1"
    assert m["summary"] == "[P1] [Triggered on {host:checkout-web-03}] Checkout 5xx rate is high"
    assert m["timestamp"] == "2026-11-24T10:01:00Z"
    assert m["source"] == "checkout-web-03"
    assert m["tags"] == ["env:prod", "host:checkout-web-03", "monitor", "priority:p1", "service:checkout",
                         "team:payments"]
    assert m["links"] == [{"href": "https://app.datadoghq.com/event/event?id=7813254906126438417",
                           "text": "Datadog"}]
    d = m["custom_details"]
    assert d["message"] == body["message"]
    assert (d["alert_id"], d["transition"], d["hostname"]) == ("146758943", "Triggered", "checkout-web-03")
    assert d["alert_query"] == body["alert_query"]


def test_datadog_recovered():
    [t] = translate("datadog", load("datadog_triggered.json"))
    [m] = run("datadog", load("datadog_recovered.json"))
    assert m["action"] == "resolve"
    assert m["dedup_key"] == t["dedup_key"] == DD_CYCLE_KEY
    assert m["event_id"] == derive_id("datadog", "7813301128546139905") != t["event_id"]
    assert m["timestamp"] == "2026-11-24T10:24:00Z"
    assert "severity" not in m


@pytest.mark.parametrize("transition, action, severity, no_data", [
    ("Triggered", "trigger", "critical", False),
    ("Re-Triggered", "trigger", "critical", False),
    ("Renotify", "trigger", "critical", False),
    ("Warn", "trigger", "warning", False),
    ("Re-Warn", "trigger", "warning", False),
    ("No Data", "trigger", "warning", True),
    ("Re-No Data", "trigger", "warning", True),
    ("Recovered", "resolve", None, False),
    ("recovered", "resolve", None, False),
])
def test_datadog_transitions(transition, action, severity, no_data):
    [m] = run("datadog", dd(transition=transition))
    assert m["action"] == action
    assert m.get("severity") == severity
    assert ("no_data" in m["tags"]) == no_data
    assert m["dedup_key"] == DD_CYCLE_KEY


def test_datadog_null_transition_is_no_message():
    assert translate("datadog", dd(transition="Null")) == []


@pytest.mark.parametrize("transition, message", [("Exploded", "is invalid"), ("", "is missing or blank")])
def test_datadog_bad_transition(transition, message):
    [e] = errors_of("datadog", dd(transition=transition))
    assert e["field"] == "transition" and e["message"].startswith(message)


def test_datadog_renotify_counts_an_occurrence_but_a_retry_is_idempotent():
    [t] = translate("datadog", dd())
    [again] = translate("datadog", dd())  # Datadog retrying the same notification
    [renotify] = translate("datadog", dd(transition="Renotify", id="7813290011223344556", date="1795516260000"))
    assert again["event_id"] == t["event_id"]
    assert renotify["event_id"] != t["event_id"] and renotify["dedup_key"] == t["dedup_key"]


@pytest.mark.parametrize("alert_type, priority, severity", [
    ("error", "P1", "critical"), ("error", "P2", "error"), ("error", "", "error"),
    ("warning", "P1", "warning"), ("info", "P3", "info"), ("success", "P3", "info"),
    ("", "P2", "error"), ("$ALERT_TYPE", "P1", "critical"), ("bogus", "P4", "error"),
])
def test_datadog_severity(alert_type, priority, severity):
    [m] = run("datadog", dd(alert_type=alert_type, priority=priority))
    assert m["severity"] == severity


@pytest.mark.parametrize("value, expected", [("P3", "P3"), ("p5", "P5"), ("", None), ("$ALERT_PRIORITY", None),
                                             ("P9", None), ("high", None)])
def test_datadog_priority(value, expected):
    [m] = run("datadog", dd(priority=value))
    assert m.get("priority") == expected


def test_datadog_dedup_key_fallbacks():
    [m] = run("datadog", dd(alert_cycle_key=""))
    assert m["dedup_key"] == "c4f16e1d4a9b3e20d7f85a6b913c02ef"
    [m] = run("datadog", dd(alert_cycle_key="", aggreg_key=""))
    assert m["dedup_key"] == "datadog-146758943"
    [e] = errors_of("datadog", dd(alert_cycle_key="", aggreg_key="", alert_id=""))
    assert e["field"] == "alert_id"


def test_datadog_unsubstituted_variables_count_as_empty():
    body = dd(id="$ID", alert_cycle_key="$ALERT_CYCLE_KEY", priority="$ALERT_PRIORITY", tags="$TAGS",
              hostname="$HOSTNAME", link="$LINK", message="$EVENT_MSG", title="$EVENT_TITLE",
              alert_title="$ALERT_TITLE")
    [m] = run("datadog", body)
    assert m["dedup_key"] == "c4f16e1d4a9b3e20d7f85a6b913c02ef"  # $AGGREG_KEY
    assert m["event_id"] == derive_id("datadog", "146758943", "Triggered", "1795514460000")
    assert m["summary"] == "Datadog monitor 146758943"
    assert m["source"] == "datadog"
    assert m["severity"] == "error"  # no P1 any more
    assert "priority" not in m
    assert m["tags"] == [] and m["links"] == []
    assert "message" not in m["custom_details"] and "id" not in m["custom_details"]
    # the template itself, never substituted: nothing to go on
    assert fields(errors_of("datadog", dict(DATADOG_TEMPLATE))) == ["transition", "alert_id"]
    # a literal $DATE: no timestamp (the receive time is used)
    [m] = run("datadog", dd(date="$DATE"))
    assert "timestamp" not in m


def test_datadog_template_fields_may_be_left_out():
    body = {"alert_id": "146758943", "transition": "Triggered", "title": "Checkout 5xx rate is high"}
    [m] = run("datadog", body)
    assert (m["dedup_key"], m["source"], m["severity"]) == ("datadog-146758943", "datadog", "error")
    assert m["event_id"] == derive_id("datadog", "146758943", "Triggered", "")


@pytest.mark.parametrize("date, expected", [
    ("1795514460000", "2026-11-24T10:01:00Z"),
    ("1795514460", "2026-11-24T10:01:00Z"),
    ("1795514460123", "2026-11-24T10:01:00.123Z"),
    (1795514460000, "2026-11-24T10:01:00Z"),
    ("1795514460.5", "2026-11-24T10:01:00.500Z"),
    ("2026-11-24T11:01:00+01:00", "2026-11-24T11:01:00+01:00"),
])
def test_datadog_dates(date, expected):
    [m] = run("datadog", dd(date=date))
    assert m["timestamp"] == expected


@pytest.mark.parametrize("date", ["999999999999999", "last tuesday", "24/11/2026"])
def test_datadog_bad_dates(date):
    [e] = errors_of("datadog", dd(date=date))
    assert e["field"] == "date"


def test_datadog_tags_are_trimmed_deduplicated_and_bounded():
    [m] = run("datadog", dd(tags=" env:prod , ,team:payments,env:prod,"))
    assert m["tags"] == ["env:prod", "team:payments"]
    many = ",".join(f"tag{i}:v" for i in range(100))
    [m] = run("datadog", dd(tags=many, transition="No Data"))
    assert len(m["tags"]) == 64 and m["tags"][0] == "no_data"
    [m] = run("datadog", dd(tags=["a:1", "b:2"]))
    assert m["tags"] == ["a:1", "b:2"]


def test_datadog_long_title_is_truncated():
    [m] = run("datadog", dd(title="t" * 3000))
    assert m["summary"] == "t" * 1024


def test_datadog_malformed():
    assert fields(errors_of("datadog", [dd()])) == ["body"]
    errors = errors_of("datadog", dd(tags={"env": "prod"}, title={"x": 1}, date="last tuesday"))
    assert fields(errors) == ["title", "tags", "date"]


# --------------------------------------------------------------------------
# PagerDuty Events API v2
# --------------------------------------------------------------------------

PD_KEY = "pg-primary-1/replication/lag"


def test_pagerduty_trigger():
    body = load("pagerduty_trigger.json")
    [m] = run("pagerduty", body)
    assert m == {
        "action": "trigger",
        "dedup_key": PD_KEY,
        "summary": "PostgreSQL replication lag on pg-replica-2 is 312s (threshold 60s)",
        "source": "pg-replica-2.prod.internal",
        "severity": "critical",
        "timestamp": "2026-11-24T09:59:42.512Z",
        "component": "postgresql",
        "group": "payments-db",
        "class": "replication lag",
        "custom_details": {**body["payload"]["custom_details"], "images": body["images"]},
        "links": [
            {"href": "https://runbooks.example.com/db/postgres-replication-lag",
             "text": "Runbook: PostgreSQL replication lag"},
            {"href": "https://monitor.example.com/checks/pg-replica-2/replication", "text": "pg_monitor"},
        ],
    }
    # the routing key is a secret: copied nowhere
    assert body["routing_key"] not in orjson.dumps(m).decode()


@pytest.mark.parametrize("name, action", [("pagerduty_acknowledge.json", "acknowledge"),
                                          ("pagerduty_resolve.json", "resolve")])
def test_pagerduty_acknowledge_and_resolve(name, action):
    assert run("pagerduty", load(name)) == [{"action": action, "dedup_key": PD_KEY}]


def test_pagerduty_trigger_without_dedup_key_is_its_own_alert():
    """No key from the body: two identical triggers are two incidents, as in PagerDuty; the Kafka
    record defines the key (streams.domain.intake.record_event_id), the gateway returns it."""
    body = load("pagerduty_trigger.json")
    del body["dedup_key"]
    [m] = run("pagerduty", body)
    assert "dedup_key" not in m and "event_id" not in m
    body["dedup_key"] = "   "  # blank: none either
    assert "dedup_key" not in translate("pagerduty", body)[0]
    r = parse(orjson.dumps(m), ONCALL, T0, record_event_id("on-call.intake", 1, 2))
    assert r.dedup_key == r.event_id == record_event_id("on-call.intake", 1, 2)


def test_pagerduty_trigger_with_a_huge_integer():
    body = load("pagerduty_trigger.json")
    body["payload"]["custom_details"]["wal_lsn"] = 2 ** 70  # a lenient JSON decoder could produce this
    [m] = translate("pagerduty", body)
    assert m["custom_details"]["wal_lsn"] == 2 ** 70


def test_pagerduty_minimal_trigger():
    body = {"routing_key": "R0123456789abcdef0123456789abcde", "event_action": "trigger",
            "payload": {"summary": "disk full", "source": "db-1", "severity": "warning"}}
    [m] = run("pagerduty", body)
    assert set(m) == {"action", "summary", "source", "severity"}  # no dedup_key: its record's


def test_pagerduty_custom_details_of_any_json_value_are_wrapped():
    body = load("pagerduty_trigger.json")
    del body["images"]
    body["payload"]["custom_details"] = "replica is 312s behind"
    assert run("pagerduty", body)[0]["custom_details"] == {"details": "replica is 312s behind"}
    body["payload"]["custom_details"] = [1, 2]
    assert run("pagerduty", body)[0]["custom_details"] == {"details": [1, 2]}


@pytest.mark.parametrize("ts, expected", [
    ("2026-11-24T09:59:42.512+0000", "2026-11-24T09:59:42.512Z"),
    ("2026-11-24T10:59:42+01:00", "2026-11-24T10:59:42+01:00"),
    ("2026-11-24T09:59:42.512", "2026-11-24T09:59:42.512Z"),  # no offset: UTC
    ("2026-11-24T09:59:42.123456Z", "2026-11-24T09:59:42.123456Z"),
])
def test_pagerduty_timestamps(ts, expected):
    body = load("pagerduty_trigger.json")
    body["payload"]["timestamp"] = ts
    assert run("pagerduty", body)[0]["timestamp"] == expected


def _pd_trigger(**payload_overrides):
    body = load("pagerduty_trigger.json")
    for k, v in payload_overrides.items():
        if v is ...:
            del body["payload"][k]
        else:
            body["payload"][k] = v
    return body


@pytest.mark.parametrize("body, field, message", [
    (_pd_trigger(summary=...), "payload.summary", "is missing or blank"),
    (_pd_trigger(summary="   "), "payload.summary", "is missing or blank"),
    (_pd_trigger(summary="s" * 1025), "payload.summary", "is too long (maximum is 1024 characters"),
    (_pd_trigger(severity="fatal"), "payload.severity", "is invalid (must be one of the following"),
    (_pd_trigger(severity=...), "payload.severity", "is missing or blank"),
    (_pd_trigger(source=...), "payload.source", "is missing or blank"),
    (_pd_trigger(timestamp="yesterday"), "payload.timestamp", "is invalid"),
    (_pd_trigger(component=["db"]), "payload.component", "must be a string"),
    ({**load("pagerduty_trigger.json"), "dedup_key": "k" * 256}, "dedup_key", "is too long (maximum is 255"),
    ({**load("pagerduty_trigger.json"), "event_action": "escalate"}, "event_action", "is invalid"),
    ({**load("pagerduty_trigger.json"), "event_action": None}, "event_action", "is missing or blank"),
    ({k: v for k, v in load("pagerduty_trigger.json").items() if k != "payload"}, "payload",
     "is missing or blank"),
    ({k: v for k, v in load("pagerduty_acknowledge.json").items() if k != "dedup_key"}, "dedup_key",
     "is missing or blank"),
    ({**load("pagerduty_resolve.json"), "dedup_key": ""}, "dedup_key", "is missing or blank"),
    ({**load("pagerduty_trigger.json"), "links": [{"text": "no href"}]}, "links[0].href", "is missing or blank"),
    ({**load("pagerduty_trigger.json"), "images": [{"alt": "no src"}]}, "images[0].src", "is missing or blank"),
    ("not an object", "body", "must be a JSON object"),
])
def test_pagerduty_validation_errors(body, field, message):
    [e] = errors_of("pagerduty", body)
    assert e["field"] == field
    assert e["message"].startswith(message), e["message"]


def test_pagerduty_errors_are_all_collected():
    body = _pd_trigger(summary=..., source=..., severity="fatal", timestamp="soon")
    body["dedup_key"] = "k" * 256
    body["links"] = "https://example.com"
    assert fields(errors_of("pagerduty", body)) == [
        "dedup_key", "payload.summary", "payload.source", "payload.severity", "payload.timestamp", "links"]


def test_pagerduty_payload_is_ignored_for_acknowledge():
    body = {**load("pagerduty_acknowledge.json"), "payload": {"summary": ""}}
    assert translate("pagerduty", body) == [{"action": "acknowledge", "dedup_key": PD_KEY}]


# --------------------------------------------------------------------------
# canonical events
# --------------------------------------------------------------------------


def test_events_single_object_passes_through():
    event = {"action": "trigger", "dedup_key": "k", "summary": "s", "severity": "info"}
    out = translate("events", event)
    assert out == [event]
    valid(out)


def test_events_list_passes_through():
    events = [{"action": "trigger", "dedup_key": f"k{i}", "summary": "s"} for i in range(MAX_EVENTS)]
    assert translate("events", events) == events
    assert translate("events", []) == []


def test_events_list_over_the_limit():
    events = [{"action": "trigger", "dedup_key": f"k{i}", "summary": "s"} for i in range(MAX_EVENTS + 1)]
    [e] = errors_of("events", events)
    assert e["field"] == "body" and "1000" in e["message"]


def test_events_elements_must_be_objects():
    events = [{"action": "trigger"}, {"action": "trigger"}, {"action": "trigger"}, "trigger", None]
    assert fields(errors_of("events", events)) == ["[3]", "[4]"]
    assert fields(errors_of("events", "trigger")) == ["body"]
