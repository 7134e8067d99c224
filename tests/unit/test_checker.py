"""The fault suite's checker (tests/reliability/checker.py) fails on bad histories, passes good ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from helpers import OC, T0  # noqa: E402
from sinks.elasticsearch import document  # noqa: E402
from streams.domain import cases as domain  # noqa: E402
from streams.domain.notify import decide_outcome  # noqa: E402
from streams.domain.webhook import webhook_body  # noqa: E402
from streams.oncall_config import load_oncall  # noqa: E402
from tests.reliability.checker import DOUBLED, INFO, LOST, OK, Hit, History, check, run_model  # noqa: E402

MIN = 60_000
CFG = """\
ack_timeout: off
users:
  u-ann: {name: Ann, email: ann@example.com}
escalation_policies:
  p: {steps: [{escalate_after_seconds: 300, targets: [{user: u-ann}]}], retries: 1}
routing_rules:
  - {id: pages, match: {source: pager}, escalation_policy: p}
endpoints:
  hook: {type: webhook, url: "https://hooks.example.com/x"}
notification_rules:
  - {id: new, event_types: [CaseCreated], match: {source: notify}, endpoints: [hook]}
subscriptions:
  - {id: all, format: json}
"""


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "on-call.yaml"
    p.write_text(CFG)
    return load_oncall(OC, p)


def trig(i, key, source):
    return {"event_id": f"e{i}", "action": "trigger", "dedup_key": key, "summary": "s", "source": source}


def good_history(cfg) -> History:
    """Two pages whose escalation steps fire, two cases notified once, as a correct run shows them."""
    h = History()
    h.send([trig(1, "k/p1", "pager"), trig(2, "k/p2", "pager"), trig(3, "k/n1", "notify"),
            trig(4, "k/n2", "notify"), trig(5, "k/p1", "pager")], T0)
    h.clock(T0 + 6 * MIN)
    model = run_model(h, OC, cfg)
    events = list(model.events)
    # what the delivery agent reports, recorded by the apply stage after the case's own events
    for did, r in model.deliveries.items():
        entry = model.mem.entries[r["dedup_key"]]
        d = decide_outcome(OC, {"kind": "delivery", "outcome": "delivered", "delivery_id": did,
                                "case_id": r["case_id"], "dedup_key": r["dedup_key"], "endpoint": "hook",
                                "channel": "webhook", "attempts": 1, "status_code": 200, "at": T0 + MIN}, entry)
        events += d.events
        created = next(e for e in model.events if e["case_id"] == r["case_id"])
        h.hits.append(Hit(did, webhook_body(created, None, OC.name, delivery_id=did)))
    h.events = events + events[:4]                        # redelivered records: repeats, harmless
    h.relay["all"] = [e for e in model.events] + model.events[:2]
    states = {}
    for e in events:
        states[e["case_id"]] = domain.apply(OC, states.get(e["case_id"]), e)
    h.pg_states, h.replay_pg_states = dict(states), dict(states)
    h.es_docs = {cid: document(s) for cid, s in states.items()}
    h.replay_es_docs = dict(h.es_docs)
    h.pg_timeline = {(e["case_id"], e["version"], e["event_id"]) for e in events}
    h.replay_pg_timeline = set(h.pg_timeline)
    return h


def test_a_correct_history_passes(cfg):
    h = good_history(cfg)
    v = check(h, OC, cfg)
    assert v.ok, str(v)
    assert v.stats["log_repeats"] == 4 and v.stats["deliveries"] == 2 and v.stats["delivery_repeats"] == 0
    # two pages: created, step 1 (3 events), the retry at +5 min (3 more), one dedup; two notified cases
    assert v.stats["model_events"] == 2 * 7 + 1 + 2


def test_a_lost_event_is_found(cfg):
    h = good_history(cfg)
    drop = next(e for e in h.events if e["type"] == "EscalationStepStarted" and e["step_index"] == 0)
    h.events = [e for e in h.events if e["event_id"] != drop["event_id"]]
    v = check(h, OC, cfg)
    assert not v.ok and [k for k, items in v.anomalies.items() if items] >= ["lost"]
    assert v.anomalies["lost"][0][0] == (drop["case_id"], drop["version"])
    assert v.anomalies["gap"]


def test_one_version_with_two_event_ids_is_a_conflict(cfg):
    h = good_history(cfg)
    e = dict(h.events[1], event_id="some-other-id")
    h.events.append(e)
    v = check(h, OC, cfg)
    assert v.anomalies["conflict"] and v.anomalies["conflict"][0][0] == (e["case_id"], e["version"])


def test_a_timer_fired_twice_is_unexpected(cfg):
    h = good_history(cfg)
    step = next(e for e in h.events if e["type"] == "EscalationStepStarted"
                and e["escalation_policy_retry_count"] == 1)
    last = max(e["version"] for e in h.events if e["case_id"] == step["case_id"])
    h.events.append(dict(step, version=last + 1, event_id="again"))
    v = check(h, OC, cfg)
    assert v.anomalies["unexpected"] and not v.ok


def test_an_event_the_model_did_not_make_diverges(cfg):
    h = good_history(cfg)
    i = next(i for i, e in enumerate(h.events) if e["type"] == "AlertDeduplicated")
    h.events = [dict(e, occurrence_count=3) if j == i else e for j, e in enumerate(h.events)]
    h.events = [e for e in h.events if not (e["type"] == "AlertDeduplicated" and e.get("occurrence_count") == 2)]
    v = check(h, OC, cfg)
    assert v.anomalies["diverged"][0][3] == ["occurrence_count"]


def test_deliveries_lost_doubled_or_changed(cfg):
    h = good_history(cfg)
    first = h.hits[0]
    h.hits = h.hits[1:] + [Hit(h.hits[1].delivery_id, h.hits[1].body)]      # one never made, one made twice
    v = check(h, OC, cfg)
    assert v.anomalies["delivery_lost"][0][0] == first.delivery_id
    assert v.stats["delivery_repeats"] == 1 and not v.anomalies["delivery_differs"]
    h.hits.append(Hit(h.hits[0].delivery_id, b"{}"))                         # same id, another effect
    assert check(h, OC, cfg).anomalies["delivery_differs"]


def test_an_outcome_recorded_twice_is_found(cfg):
    h = good_history(cfg)
    outcome = next(e for e in h.events if e["type"] == "NotificationDelivered")
    h.events.append(dict(outcome, version=outcome["version"] + 1, event_id="twice"))
    v = check(h, OC, cfg)
    assert v.anomalies["outcome_not_once"] and not v.ok


def test_indeterminate_sends_follow_the_log(cfg):
    h = good_history(cfg)
    h.send([trig(9, "k/x", "other")], T0 + 6 * MIN, status=INFO)     # failed send, never in the log
    assert check(h, OC, cfg).ok
    h.send([trig(10, "k/y", "other")], T0 + 6 * MIN, status=OK)      # acknowledged but never applied
    v = check(h, OC, cfg)
    assert v.anomalies["lost"] and v.anomalies["lost"][0][2] == "e10"


def test_relay_and_projections_are_checked(cfg):
    h = good_history(cfg)
    gone = h.relay["all"][-1]["event_id"]
    h.relay["all"] = [e for e in h.relay["all"] if e["event_id"] != gone]      # never relayed
    some = sorted(h.pg_states)[0]
    h.replay_pg_states = dict(h.replay_pg_states, **{some: dict(h.pg_states[some], status="RESOLVED")})
    h.es_docs = dict(h.es_docs, **{some: {"version": 1}})
    v = check(h, OC, cfg)
    assert v.anomalies["relay_lost"] and v.anomalies["replay_pg"][0][:2] == (1, some) and v.anomalies["projection_es"]
    h = good_history(cfg)
    h.relay["all"] = list(reversed(h.relay["all"]))                            # per-case order broken
    assert check(h, OC, cfg).anomalies["relay_order"]


# -- the report's three counts: lost, doubled, divergent ---------------------------------------------

def counts(v) -> tuple[int, int, int]:
    return v.lost, v.doubled, v.divergent


def test_the_counts_of_a_correct_history_are_zero_raw_repeats_included(cfg):
    h = good_history(cfg)
    h.hits.append(h.hits[0])                              # a delivery made again: a raw repeat
    v = check(h, OC, cfg)
    assert counts(v) == (0, 0, 0) and v.stats["delivery_repeats"] == 1 and v.stats["log_repeats"] == 4


def test_an_input_with_no_effect_is_lost(cfg):
    h = good_history(cfg)
    dedup = next(e for e in h.events if e["type"] == "AlertDeduplicated")      # trigger e5 on k/p1
    h.events = [e for e in h.events if e["event_id"] != dedup["event_id"]]
    v = check(h, OC, cfg)
    assert v.tally[LOST] == {("input", "e5")} and v.doubled == 0
    assert dedup["case_id"] in v.tally["divergent"]        # its case's state differs from the oracle's too


def test_an_input_applied_twice_is_doubled_not_lost(cfg):
    h = good_history(cfg)
    dedup = next(e for e in h.events if e["type"] == "AlertDeduplicated")
    last = max(e["version"] for e in h.events if e["case_id"] == dedup["case_id"])
    h.events.append(dict(dedup, version=last + 1, event_id="again", occurrence_count=3))
    v = check(h, OC, cfg)
    assert v.tally[DOUBLED] == {("effect", dedup["case_id"], "e5", "AlertDeduplicated")} and v.lost == 0


def test_two_event_ids_for_one_version_and_an_outcome_recorded_twice_are_doubled(cfg):
    h = good_history(cfg)
    h.events.append(dict(h.events[1], event_id="some-other-id"))
    assert counts(check(h, OC, cfg))[:2] == (0, 1)
    h = good_history(cfg)
    outcome = next(e for e in h.events if e["type"] == "NotificationDelivered")
    h.events.append(dict(outcome, version=outcome["version"] + 1, event_id="twice"))
    v = check(h, OC, cfg)
    assert ("outcome", outcome["delivery_id"]) in v.tally[DOUBLED] and v.lost == 0


def test_a_delivery_never_made_is_lost(cfg):
    h = good_history(cfg)
    h.hits = h.hits[1:]
    v = check(h, OC, cfg)
    assert v.lost == 1 and v.doubled == 0


def test_a_projection_or_relay_topic_off_the_oracle_is_divergent(cfg):
    h = good_history(cfg)
    some = sorted(h.pg_states)[0]
    h.pg_states = dict(h.pg_states, **{some: dict(h.pg_states[some], summary="other")})
    assert counts(check(h, OC, cfg)) == (0, 0, 1)
    h = good_history(cfg)
    h.es_docs = dict(h.es_docs, **{some: dict(h.es_docs[some], severity="info")})     # same version, other content
    v = check(h, OC, cfg)
    assert counts(v) == (0, 0, 1) and v.anomalies["projection_es"]
    h = good_history(cfg)
    h.replay_pg_rows = {"cases": {some: {"case_id": some, "status": "RESOLVED"}}}
    h.pg_rows = {"cases": {some: {"case_id": some, "status": "TRIGGERED"}}}
    assert counts(check(h, OC, cfg)) == (0, 0, 1)
    h = good_history(cfg)
    case = h.relay["all"][0]["case_id"]
    h.relay["all"] = [e for e in h.relay["all"] if e["case_id"] != case or e["version"] != 1] + \
        [e for e in h.relay["all"] if e["case_id"] == case and e["version"] == 1]     # version 1 last
    assert counts(check(h, OC, cfg)) == (0, 0, 1)


def test_dead_letters_expected_missing_or_unexpected(cfg):
    h = good_history(cfg)
    h.send([{"event_id": "e20", "action": "resolve", "dedup_key": "k/none"}], T0 + 6 * MIN)   # nothing open
    h.dead_letters = [{"reason": "no_open_case", "event_id": "e20", "original": "..."}] * 2  # a repeat: reported
    v = check(h, OC, cfg)
    assert counts(v) == (0, 0, 0) and v.stats["dead_letter_repeats"] == 1
    h.dead_letters = []
    assert counts(check(h, OC, cfg)) == (1, 0, 0)
    h.dead_letters = [{"reason": "no_open_case", "event_id": "e20"}, {"reason": "invalid_event", "event_id": "x"}]
    assert counts(check(h, OC, cfg)) == (0, 0, 1)


def test_a_message_without_event_id_is_known_by_its_record(cfg):
    same = {"action": "trigger", "dedup_key": "k/r", "summary": "s", "source": "other"}
    h = History()
    h.send([same, same], T0, record_ids=["rec-1", "rec-2"])     # the same bytes twice: two events
    model = run_model(h, OC, cfg)
    assert [(e["type"], e["caused_by"]) for e in model.events] == [("CaseCreated", "rec-1"),
                                                                   ("AlertDeduplicated", "rec-2")]
