"""streams.dlq: the replay plan of each kind of dead letter, originals, filters."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from agents.intake import dead_letter, route_message
from streams import dlq
from streams.cli import build_parser
from streams.messages import message_key
from streams.config import load_topics
from streams.domain.intake import (
    EVENT_ID_HEADER, RECORD_ID_PENDING, Intake, Rejection, derive_id, intake_partition_key, parse,
    record_event_id, routing_token,
)
from streams.domain.monitors import translate

from helpers import OC, T0

FAMILY = load_topics("on-call")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "monitors"


def record(reason: str, topic: str, raw: bytes | None, *, at: int = T0, partition: int = 0, offset: int = 7) -> dict:
    """A dead letter exactly as the agents write it."""
    return dict(dead_letter(Rejection(reason, "why"), topic, partition, offset, raw), dead_lettered_at=at)


def gateway_record(kind: str, body: bytes, at: int = T0) -> dict:
    """A rate-limited gateway request, as streams/gateway.py dead-letters it."""
    return {"reason": "rate_limited", "detail": "rate limit of integration int_x exceeded",
            "source": {"topic": f"gateway:{kind}", "partition": -1, "offset": -1},
            "original": body.decode("utf-8", errors="replace"), "original_encoding": "utf-8", "dead_lettered_at": at}


def only(p: dlq.Plan) -> dlq.Publish:
    assert p.skip is None, p.skip
    assert len(p.publish) == 1
    return p.publish[0]


ACK = orjson.dumps({"action": "acknowledge", "dedup_key": "db/lag", "timestamp": "2026-11-24T10:00:00Z"})


# -- sources -------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["invalid_json", "invalid_event", "too_large"])
def test_route_rejections_go_back_to_intake_unchanged(reason):
    raw = b'{"action": "trigger", "summary": 5}' if reason != "invalid_json" else b"{not json"
    pub = only(dlq.plan(record(reason, FAMILY.name("intake"), raw), OC, FAMILY))
    assert pub.role == "intake" and pub.value == raw
    assert pub.key is None  # still invalid: no dedup key, as `casestream send` would send it


@pytest.mark.parametrize("reason", ["no_open_case", "invalid_transition", "unknown_case", "processing_error"])
def test_apply_rejections_go_back_to_intake_keyed_by_dedup_key(reason):
    pub = only(dlq.plan(record(reason, FAMILY.name("intake-routed"), ACK), OC, FAMILY))
    assert (pub.role, pub.key, pub.value) == ("intake", routing_token("db/lag").encode(), ACK)
    assert pub.key == message_key(ACK, OC)[0]


def test_a_replay_is_a_new_attempt_with_an_id_derived_from_the_rejected_one():
    """The bytes go back unchanged; the header carries an id derived from the rejected record's, so the
    worker decides the message again (its rejection was remembered under the original id) and a second
    replay of the same dead letter is the same attempt."""
    topic = FAMILY.name("intake")
    kind, _key, envelope = route_message(OC, topic, 2, 41, T0, None, ACK)
    first_id = envelope["intake"]["event_id"]
    assert first_id == record_event_id(topic, 2, 41)
    rejected = dict(dead_letter(Rejection("no_open_case", "why"), topic, 2, 41, ACK, first_id), dead_lettered_at=T0)
    pub = only(dlq.plan(rejected, OC, FAMILY))
    replay_id = derive_id("replay", first_id)
    assert pub.value == ACK and pub.headers == ((EVENT_ID_HEADER, replay_id.encode()),)
    assert only(dlq.plan(rejected, OC, FAMILY)) == pub                    # replaying again: the same attempt
    _k, _key, again = route_message(OC, topic, 5, 900, T0 + 60_000, pub.key, pub.value, list(pub.headers))
    assert again["intake"]["event_id"] == replay_id
    # a second send of the same bytes (no header) is a second event of its own
    _k, _key, other = route_message(OC, topic, 5, 901, T0 + 60_000, pub.key, pub.value)
    assert other["intake"]["event_id"] not in (first_id, replay_id)


def test_the_replay_id_wins_over_an_explicit_event_id():
    raw = orjson.dumps({"action": "acknowledge", "dedup_key": "db/lag", "event_id": "mon-7"})
    pub = only(dlq.plan(record("no_open_case", FAMILY.name("intake-routed"), raw), OC, FAMILY))
    assert pub.headers == ((EVENT_ID_HEADER, derive_id("replay", "mon-7").encode()),)
    _k, _key, env = route_message(OC, FAMILY.name("intake"), 0, 1, T0, pub.key, pub.value, list(pub.headers))
    assert env["intake"]["event_id"] == derive_id("replay", "mon-7")


def test_a_dead_letter_written_before_it_kept_the_id_replays_from_the_id_of_its_bytes():
    pub = only(dlq.plan(record("no_open_case", FAMILY.name("intake-routed"), ACK), OC, FAMILY))
    assert pub.headers == ((EVENT_ID_HEADER, derive_id("replay", derive_id("intake", ACK)).encode()),)


def test_a_command_by_case_id_is_keyed_by_the_case_id():
    raw = orjson.dumps({"command": "comment", "case_id": f"PG-{routing_token('k')}-1", "text": "hi",
                        "actor": {"id": "u", "name": "U", "email": "u@example.com"}})
    pub = only(dlq.plan(record("unknown_case", FAMILY.name("intake-routed"), raw), OC, FAMILY))
    assert pub.key == routing_token("k").encode()  # the partition of the alerts of its dedup key


def test_a_processing_error_that_kept_the_whole_routed_envelope_replays_its_intake_message():
    _kind, _key, envelope = route_message(OC, FAMILY.name("intake"), 0, 3, T0, None, ACK)
    pub = only(dlq.plan(record("processing_error", FAMILY.name("intake-routed"), orjson.dumps(envelope)),
                        OC, FAMILY))
    assert pub.value == ACK and pub.key == routing_token("db/lag").encode()


def test_a_timer_goes_back_to_timers_keyed_by_its_routing_token():
    timer = orjson.dumps({"timer_id": "t-1", "kind": "escalation", "case_id": f"PG-{routing_token('db/lag')}-1",
                          "dedup_key": "db/lag", "due_at": T0})
    pub = only(dlq.plan(record("processing_error", FAMILY.name("timers"), timer), OC, FAMILY))
    assert (pub.role, pub.key, pub.value) == ("timers", routing_token("db/lag").encode(), timer)


@pytest.mark.parametrize("raw, why", [(b"[1, 2]", "no 'dedup_key'"), (b"\xff\x00", "not JSON")])
def test_something_that_is_not_a_timer_is_skipped(raw, why):
    p = dlq.plan(record("processing_error", FAMILY.name("timers"), raw), OC, FAMILY)
    assert not p.publish and why in p.skip


def test_a_dead_letter_without_original_is_skipped():
    p = dlq.plan(record("invalid_json", FAMILY.name("intake"), None), OC, FAMILY)
    assert not p.publish and "no original" in p.skip


def test_an_unknown_source_topic_is_skipped():
    p = dlq.plan(record("invalid_json", "somewhere.else", b"{}"), OC, FAMILY)
    assert not p.publish and "somewhere.else" in p.skip
    assert "undecodable" in dlq.decode_value(b"nope") and dlq.plan(dlq.decode_value(b"nope"), OC, FAMILY).skip


# -- base64 originals ----------------------------------------------------------------


def test_a_base64_original_is_published_as_its_bytes():
    raw = b'\xff{"action": "trigger"}'
    rec = record("invalid_json", FAMILY.name("intake"), raw)
    assert rec["original_encoding"] == "base64"
    assert dlq.original_bytes(rec) == raw
    assert only(dlq.plan(rec, OC, FAMILY)).value == raw
    assert dlq.original_text(rec) == '\\xff{"action": "trigger"}'


def test_an_original_that_is_not_base64_is_skipped():
    rec = dict(record("invalid_json", FAMILY.name("intake"), b"x"), original="**", original_encoding="base64")
    with pytest.raises(ValueError):
        dlq.original_bytes(rec)
    assert "base64" in dlq.plan(rec, OC, FAMILY).skip


# -- gateway translations ------------------------------------------------------------


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize("kind, name", [("alertmanager", "alertmanager_firing.json"),
                                        ("grafana", "grafana_alerting.json"),
                                        ("datadog", "datadog_triggered.json"),
                                        ("pagerduty", "pagerduty_trigger.json")])
def test_a_rate_limited_body_is_translated_as_the_gateway_would_have_published_it(kind, name):
    body = _fixture(name)
    p = dlq.plan(gateway_record(kind, body), OC, FAMILY)
    expected = [orjson.dumps(m) for m in translate(kind, json.loads(body))]
    assert p.skip is None and [x.value for x in p.publish] == expected
    for x in p.publish:
        parsed = parse(x.value, OC, T0, RECORD_ID_PENDING)
        assert isinstance(parsed, Intake) and x.role == "intake" and x.key == intake_partition_key(parsed, OC)
    # deterministic: a second replay publishes the very same bytes (same event ids), and messages
    # without an id of their own get one per dead letter and position
    assert dlq.plan(gateway_record(kind, body, at=T0 + 1), OC, FAMILY) == p
    at_ref = dlq.plan(gateway_record(kind, body), OC, FAMILY, None, "3:14")
    assert at_ref == dlq.plan(gateway_record(kind, body), OC, FAMILY, None, "3:14")
    other_ref = dlq.plan(gateway_record(kind, body), OC, FAMILY, None, "3:15")
    for x, y in zip(at_ref.publish, other_ref.publish):
        if "event_id" in orjson.loads(x.value):   # the translator's own id stays: no header
            assert x.headers == y.headers == ()
        else:
            assert x.headers and x.headers != y.headers


def test_pagerduty_routing_keys_are_not_republished():
    body = json.loads(_fixture("pagerduty_trigger.json"))
    body["routing_key"] = "cs_on-call_secret"
    p = dlq.plan(gateway_record("pagerduty", orjson.dumps(body)), OC, FAMILY)
    assert b"cs_on-call_secret" not in only(p).value


def test_canonical_events_bodies_become_one_message_each():
    body = orjson.dumps([{"action": "trigger", "dedup_key": "a", "summary": "A"},
                         {"action": "resolve", "dedup_key": "b"}])
    p = dlq.plan(gateway_record("events", body), OC, FAMILY)
    assert [(x.role, x.key) for x in p.publish] == [("intake", routing_token("a").encode()),
                                                    ("intake", routing_token("b").encode())]


def test_gateway_options_are_passed_to_the_translation():
    body = json.loads(_fixture("alertmanager_firing.json"))
    per_alert = dlq.plan(gateway_record("alertmanager", orjson.dumps(body)), OC, FAMILY)
    grouped = dlq.plan(gateway_record("alertmanager", orjson.dumps(body)), OC, FAMILY, {"dedup_by": "group"})
    assert len(grouped.publish) == 1 and grouped.publish[0].key == routing_token(body["groupKey"]).encode()
    assert len(per_alert.publish) == len(body["alerts"])


@pytest.mark.parametrize("kind, body, why", [
    ("datadog", b"not json", "not JSON"),
    ("pagerduty", b'{"event_action": "trigger"}', "does not translate"),
    ("events", b"5", "does not translate"),
    ("nagios", b"{}", "cannot translate"),
])
def test_a_gateway_body_that_does_not_translate_is_skipped(kind, body, why):
    p = dlq.plan(gateway_record(kind, body), OC, FAMILY)
    assert not p.publish and why in p.skip


def test_a_datadog_null_transition_is_skipped():
    body = json.loads(_fixture("datadog_triggered.json"))
    body["transition"] = "Null"
    p = dlq.plan(gateway_record("datadog", orjson.dumps(body)), OC, FAMILY)
    assert not p.publish and "no intake message" in p.skip


# -- filters, order, references ------------------------------------------------------


def _dl(reason: str, at: int, raw: bytes | None = ACK, partition: int = 0, offset: int = 0) -> dlq.DeadLetter:
    return dlq.DeadLetter(partition, offset, record(reason, FAMILY.name("intake-routed"), raw, at=at))


def test_filters():
    a, b, c = _dl("no_open_case", T0), _dl("invalid_json", T0 + 10, b"\xffrun-42"), _dl("processing_error", T0 + 20)
    assert [d for d in (a, b, c) if dlq.Filters()(d)] == [a, b, c]
    assert [d for d in (a, b, c) if dlq.Filters(frozenset({"no_open_case", "invalid_json"}))(d)] == [a, b]
    assert [d for d in (a, b, c) if dlq.Filters(since_ms=T0 + 10)(d)] == [b, c]
    assert [d for d in (a, b, c) if dlq.Filters(match="run-42")(d)] == [b]  # matched in the decoded base64 original
    assert [d for d in (a, b, c) if dlq.Filters(frozenset({"invalid_json"}), match="db/lag")(d)] == []
    assert not dlq.Filters(match="x")(_dl("invalid_json", T0, None))
    with pytest.raises(ValueError, match="unknown reason"):
        dlq.Filters(frozenset({"nope"}))


def test_newest_last_orders_by_time_then_position_and_keeps_the_newest():
    d = [_dl("x", T0 + 5, partition=1, offset=0), _dl("x", T0, partition=2, offset=9), _dl("x", T0, partition=0,
                                                                                          offset=3)]
    assert [x.ref for x in dlq.newest_last(d)] == ["0:3", "2:9", "1:0"]
    assert [x.ref for x in dlq.newest_last(d, 2)] == ["2:9", "1:0"]
    assert [x.ref for x in dlq.newest_last(d, 0)] == ["0:3", "2:9", "1:0"]


def test_as_json_is_the_record_plus_its_position():
    d = _dl("no_open_case", T0, partition=3, offset=42)
    assert d.as_json() == dict(d.record, dlq_partition=3, dlq_offset=42)


def test_refs_times_and_sources():
    assert dlq.parse_ref("3:42") == (3, 42)
    for bad in ("3", "a:1", "1:-2", ""):
        with pytest.raises(ValueError, match="PARTITION:OFFSET"):
            dlq.parse_ref(bad)
    assert dlq.parse_time("2026-11-24T10:00:00Z") == T0
    assert dlq.parse_time("2026-11-24T11:00:00+01:00") == T0
    for bad in ("yesterday", "2026-11-24T10:00:00"):
        with pytest.raises(ValueError):
            dlq.parse_time(bad)
    assert dlq.utc(T0) == "2026-11-24T10:00:00.000Z"
    assert dlq.describe_source({"topic": "gateway:datadog", "partition": -1, "offset": -1}) == "gateway:datadog"
    assert dlq.describe_source({"topic": "on-call.intake", "partition": 2, "offset": 5}) == "on-call.intake:2@5"


def test_the_report_counts_what_is_published_and_skipped():
    items = [dlq.Item(_dl("no_open_case", T0), dlq.plan(_dl("no_open_case", T0).record, OC, FAMILY)),
             dlq.Item(_dl("invalid_json", T0, None), dlq.plan(_dl("invalid_json", T0, None).record, OC, FAMILY))]
    report = dlq.ReplayReport("on-call", dry_run=True, read=5, items=items)
    out = report.as_json(FAMILY)
    assert out["by_topic"] == {"on-call.intake": 1} and out["messages"] == 1 and out["skipped"] == 1
    assert out["items"][0]["published"] == [{"topic": "on-call.intake", "key": routing_token("db/lag"),
                                             "bytes": len(ACK)}]
    assert out["skip_reasons"] == {"no original was kept (null)": 1}


def test_cli_parser():
    args = build_parser().parse_args(["dlq", "replay", "--tenant", "on-call", "--reason", "no_open_case",
                                      "--reason", "processing_error", "--match", "abc", "--dry-run"])
    assert args.reason == ["no_open_case", "processing_error"] and args.match == "abc" and args.dry_run
    args = build_parser().parse_args(["dlq", "list", "--tenant", "on-call"])
    assert args.limit == 100 and args.reason is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "list", "--tenant", "on-call", "--reason", "nope"])


@pytest.mark.parametrize("argv", [["dlq", "replay", "--tenant", "on-call"],
                                  ["dlq", "replay", "--tenant", "on-call", "--all", "--reason", "too_large"],
                                  ["dlq", "list", "--tenant", "on-call", "--since", "yesterday"],
                                  ["dlq", "show", "--tenant", "on-call", "nope"]])
def test_cli_usage_errors_exit_2_before_touching_kafka(argv, capsys):
    from streams.cli import main

    assert main(argv) == 2
    assert "casestream:" in capsys.readouterr().err


def test_a_replay_publishes_each_distinct_message_once():
    """A dead letter replayed and rejected again is in the DLQ twice: it is published once."""
    first, again = _dl("no_open_case", T0, partition=0, offset=1), _dl("no_open_case", T0 + 9, partition=5, offset=2)
    other = _dl("no_open_case", T0 + 10, raw=ACK.replace(b"db/lag", b"db/cpu"))
    both = orjson.dumps([{"action": "trigger", "dedup_key": "db/lag", "summary": "A"},
                         {"action": "trigger", "dedup_key": "db/cpu", "summary": "B"}])
    gw1 = dlq.DeadLetter(1, 1, gateway_record("events", both))
    gw2 = dlq.DeadLetter(1, 2, gateway_record("events", orjson.dumps([{"action": "trigger", "dedup_key": "db/lag",
                                                                       "summary": "A"}, {"action": "trigger",
                                                                       "dedup_key": "db/io", "summary": "C"}])))
    items = dlq.once([dlq.Item(d, dlq.plan(d.record, OC, FAMILY, None, d.ref))
                      for d in (first, again, other, gw1, gw2)])
    # two rate-limited requests with one identical event are two sends: both go
    assert [len(i.plan.publish) for i in items] == [1, 0, 1, 2, 2]
    assert items[1].plan.skip == "the same message as dead letter 0:1 (published once)"
    assert items[4].plan.publish[1].key == routing_token("db/io").encode()


def test_a_failed_notification_is_replayed_as_a_retry_of_the_same_delivery():
    request = {"kind": "request", "delivery_id": "d-1", "endpoint": "ops", "channel": "webhook", "case_id": "PG-x-1",
               "dedup_key": "k", "event": {"type": "CaseCreated"}}
    p = only(dlq.plan(record("notification_failed", FAMILY.name("notifications"), orjson.dumps(request)), OC, FAMILY))
    assert (p.role, p.key) == ("notifications", b"d-1")
    assert orjson.loads(p.value) == dict(request, kind="retry")
    skipped = dlq.plan(record("notification_failed", FAMILY.name("notifications"), b'{"no": "id"}'), OC, FAMILY)
    assert not skipped.publish and "delivery_id" in skipped.skip


def test_a_notifications_record_that_failed_processing_is_replayed_unchanged():
    raw = orjson.dumps({"kind": "request", "delivery_id": "d-2", "endpoint": "ops"})
    p = only(dlq.plan(record("processing_error", FAMILY.name("notifications"), raw), OC, FAMILY))
    assert (p.role, p.key, p.value) == ("notifications", b"d-2", raw)
