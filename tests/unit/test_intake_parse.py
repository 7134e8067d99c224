"""streams.domain.intake.parse: validation, normalization, routing."""

from __future__ import annotations

import uuid

import orjson
import pytest

from helpers import ALICE, CM, OC, T0, TENANTS, command, intake, parse_msg, raw, rejection, trigger
from streams.domain.intake import (
    RECORD_ID_PENDING, assigned_dedup_key, intake_partition_key, record_event_id,
    INVALID_EVENT, INVALID_JSON, MAX_DEPTH, MAX_MESSAGE_BYTES, TOO_LARGE, Intake, Rejection, make_case_id,
    parse, routing_key, routing_token, token_from_case_id,
)


def nested(levels: int, leaf):
    """``levels`` nested objects around ``leaf``."""
    v = leaf
    for _ in range(levels):
        v = {"d": v}
    return v


# --------------------------------------------------------------------------
# JSON level
# --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"{", b"not json", b'{"action": "trigger",}', b"\xff\xfe", b""])
def test_invalid_json(data):
    r = parse(data, CM, T0)
    assert isinstance(r, Rejection)
    assert r.reason == INVALID_JSON


def test_null_raw_is_invalid_json():
    r = parse(None, CM, T0)
    assert isinstance(r, Rejection) and r.reason == INVALID_JSON


def test_too_large():
    assert MAX_MESSAGE_BYTES == 512 * 1024
    msg = trigger("k", custom_details={"pad": ""})
    base = len(raw(msg))
    msg["custom_details"]["pad"] = "x" * (MAX_MESSAGE_BYTES - base)
    at_limit = raw(msg)
    assert len(at_limit) == MAX_MESSAGE_BYTES
    assert isinstance(parse(at_limit, CM, T0), Intake)
    msg["custom_details"]["pad"] += "x"
    r = parse(raw(msg), CM, T0)
    assert isinstance(r, Rejection) and r.reason == TOO_LARGE
    assert str(MAX_MESSAGE_BYTES + 1) in r.detail
    # checked before parsing: oversized garbage is too_large, not invalid_json
    r = parse(b"{" * (MAX_MESSAGE_BYTES + 1), CM, T0)
    assert r.reason == TOO_LARGE


def test_nesting_65_deep_is_invalid_json():
    assert MAX_DEPTH == 64
    # the message object is level 1, custom_details level 2, ... 65 objects in all
    msg = trigger("k", custom_details=nested(63, {}))
    r = parse_msg(CM, msg)
    assert isinstance(r, Rejection)
    assert r.reason == INVALID_JSON
    assert "64" in r.detail


def test_nesting_64_deep_is_accepted():
    msg = trigger("k", custom_details=nested(62, {}))  # 64 objects in all
    it = intake(CM, msg)
    depth, v = 2, it.fields["custom_details"]
    while v:
        v = v["d"]
        depth += 1
    assert depth == 64


def test_array_nesting_65_deep_is_invalid_json():
    data = b"[" * 65 + b"]" * 65
    r = parse(data, CM, T0)
    assert r.reason == INVALID_JSON


def arrays(levels: int, leaf):
    """``levels`` nested arrays around ``leaf``."""
    v = leaf
    for _ in range(levels):
        v = [v]
    return v


def test_scalars_add_no_depth_in_arrays():
    # message (1) + custom_details (2) + 62 arrays = 64 containers, a scalar innermost: accepted
    assert isinstance(parse_msg(CM, trigger("k", custom_details={"a": arrays(62, 1)})), Intake)
    assert isinstance(parse_msg(CM, trigger("k", custom_details={"a": arrays(62, "s")})), Intake)
    # 65 containers: rejected
    r = parse_msg(CM, trigger("k", custom_details={"a": arrays(63, 1)}))
    assert isinstance(r, Rejection) and r.reason == INVALID_JSON
    # bare arrays: 65 holding a scalar are too deep; 64 are fine as JSON (but not an object)
    r = parse(b"[" * 65 + b"1" + b"]" * 65, CM, T0)
    assert isinstance(r, Rejection) and r.reason == INVALID_JSON
    r = parse(b"[" * 64 + b"1" + b"]" * 64, CM, T0)
    assert isinstance(r, Rejection) and r.reason == INVALID_EVENT


@pytest.mark.parametrize("data", [b"[]", b"[1, 2]", b'"trigger"', b"42", b"null", b"true"])
def test_non_object_json_is_invalid_event(data):
    r = parse(data, CM, T0)
    assert isinstance(r, Rejection)
    assert r.reason == INVALID_EVENT
    assert "object" in r.detail


def test_object_without_action_or_command():
    r = rejection(CM, {"summary": "x", "dedup_key": "k"})
    assert r.reason == INVALID_EVENT
    assert "'action'" in r.detail and "'command'" in r.detail


# --------------------------------------------------------------------------
# field validation: every case names the field
# --------------------------------------------------------------------------

CMD = {"actor": ALICE, "case_id": "CM-0123456789abcdef0123-1"}

INVALID = [
    ("unknown action", CM, {"action": "explode", "dedup_key": "k", "summary": "s"}, "'action'"),
    ("unknown command", CM, {"command": "delete", **CMD}, "'command'"),
    ("unknown status cm", CM, {"command": "set_status", "status": "ACKNOWLEDGED", **CMD}, "'status'"),
    ("unknown status oc", OC, {"command": "set_status", "status": "IN_PROGRESS",
                               "actor": ALICE, "dedup_key": "k"}, "'status'"),
    ("missing status", CM, {"command": "set_status", **CMD}, "'status'"),
    ("bad severity", CM, trigger("k", severity="fatal"), "'severity'"),
    ("bad priority alert", CM, trigger("k", priority="P0"), "'priority'"),
    ("bad priority command", CM, {"command": "set_priority", "priority": "urgent", **CMD}, "'priority'"),
    ("missing priority command", CM, {"command": "set_priority", **CMD}, "'priority'"),
    ("bad urgency", OC, trigger("k", urgency="medium"), "'urgency'"),
    ("summary too long", CM, trigger("k", summary="s" * 1025), "'summary'"),
    ("summary not string", CM, trigger("k", summary=12), "'summary'"),
    ("dedup_key too long", CM, trigger("k" * 256), "'dedup_key'"),
    ("dedup_key empty", CM, trigger(" "), "'dedup_key'"),
    ("missing summary on trigger", CM, {"action": "trigger", "dedup_key": "k"}, "'summary'"),
    ("blank summary on trigger", CM, trigger("k", summary="  "), "'summary'"),
    ("missing dedup_key on acknowledge", CM, {"action": "acknowledge"}, "'dedup_key'"),
    ("missing dedup_key on resolve", OC, {"action": "resolve"}, "'dedup_key'"),
    ("tags not a list", CM, trigger("k", tags="a,b"), "'tags'"),
    ("tags not strings", CM, trigger("k", tags=["a", 1]), "'tags'"),
    ("custom_details not object", CM, trigger("k", custom_details=[1, 2]), "'custom_details'"),
    ("custom_details string", CM, trigger("k", custom_details="{}"), "'custom_details'"),
    ("timestamp without timezone", CM, trigger("k", timestamp="2026-11-24T10:00:00"), "'timestamp'"),
    ("timestamp not rfc3339", CM, trigger("k", timestamp="yesterday"), "'timestamp'"),
    ("timestamp number", CM, trigger("k", timestamp=1795514400000), "'timestamp'"),
    ("both action and command", CM, {"action": "trigger", "command": "comment", "summary": "s",
                                     "dedup_key": "k", "text": "t", "actor": ALICE}, "'action'"),
    ("command without actor", CM, {"command": "comment", "text": "t", "case_id": CMD["case_id"]}, "'actor'"),
    ("command with null actor", CM, {"command": "comment", "text": "t", "actor": None,
                                     "dedup_key": "k"}, "'actor'"),
    ("actor without id", CM, {"command": "comment", "text": "t", "actor": {"name": "x"},
                              "dedup_key": "k"}, "'actor.id'"),
    ("command with case_id and dedup_key", CM, {"command": "comment", "text": "t", "dedup_key": "k", **CMD},
     "'case_id' or 'dedup_key'"),
    ("command with neither", CM, {"command": "comment", "text": "t", "actor": ALICE},
     "'case_id' or 'dedup_key'"),
    ("comment without text", CM, {"command": "comment", **CMD}, "'text'"),
    ("assign without assignee", CM, {"command": "assign", **CMD}, "'assignee'"),
    ("links not list", CM, trigger("k", links={"href": "x"}), "'links'"),
    ("link without href", CM, trigger("k", links=[{"text": "x"}]), "'links[0]'"),
    ("empty event_id", CM, trigger("k", event_id=" "), "'event_id'"),
    ("empty case_id in command", CM, {"command": "comment", "text": "t", "actor": ALICE, "case_id": ""},
     "'case_id'"),
    ("blank case_id in command", CM, {"command": "comment", "text": "t", "actor": ALICE, "case_id": "  "},
     "'case_id'"),
    ("empty dedup_key in command", CM, {"command": "comment", "text": "t", "actor": ALICE, "dedup_key": ""},
     "'dedup_key'"),
    ("blank dedup_key in command", OC, {"command": "set_priority", "priority": "P1", "actor": ALICE,
                                        "dedup_key": " "}, "'dedup_key'"),
    ("empty dedup_key in alert", CM, trigger(""), "'dedup_key'"),
]


@pytest.mark.parametrize("tenant,msg,field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_event_names_field(tenant, msg, field):
    r = rejection(tenant, msg)
    assert r.reason == INVALID_EVENT
    assert field in r.detail, r.detail


def test_both_action_and_command_names_both():
    r = rejection(CM, {"action": "trigger", "command": "comment", "summary": "s", "dedup_key": "k",
                       "text": "t", "actor": ALICE})
    assert "'action'" in r.detail and "'command'" in r.detail


@pytest.mark.parametrize("name,status", [("case-management", "IN_PROGRESS"), ("on-call", "ACKNOWLEDGED")])
def test_known_status_per_tenant_accepted(name, status):
    it = intake(TENANTS[name], command("set_status", dedup_key="k", status=status))
    assert it.fields == {"status": status}


def test_limits_are_inclusive():
    it = intake(CM, trigger("k" * 255, summary="s" * 1024))
    assert len(it.dedup_key) == 255 and len(it.fields["summary"]) == 1024


# --------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------


# The identity rules (README "Event identity"): one test per row.


def test_without_event_id_the_record_is_the_identity():
    data = b'{"action": "trigger", "dedup_key": "k", "summary": "s"}'
    first = parse(data, CM, T0, record_event_id("cm.intake", 3, 10))
    redelivered = parse(data, CM, T0 + 99_000, record_event_id("cm.intake", 3, 10))  # a crash before the commit
    sent_again = parse(data, CM, T0, record_event_id("cm.intake", 3, 11))           # the same bytes, sent again
    assert first.event_id == redelivered.event_id != sent_again.event_id
    assert uuid.UUID(first.event_id).version == 5
    assert record_event_id("cm.intake", 3, 10) not in {record_event_id("cm.intake", 4, 10),
                                                        record_event_id("oc.intake", 3, 10)}


def test_outside_a_record_the_id_is_provisional_from_the_bytes():
    data = b'{"action": "trigger", "dedup_key": "k", "summary": "s"}'
    assert parse(data, CM, T0).event_id == parse(data, CM, T0 + 99_000).event_id  # validation, tools
    assert parse(data, CM, T0, RECORD_ID_PENDING).event_id == RECORD_ID_PENDING


def test_an_explicit_event_id_wins_over_the_record():
    data = b'{"action": "trigger", "dedup_key": "k", "summary": "s", "event_id": "mon-42"}'
    assert parse(data, CM, T0, record_event_id("cm.intake", 0, 1)).event_id == "mon-42"
    assert parse(data, CM, T0, record_event_id("cm.intake", 0, 2)).event_id == "mon-42"  # a re-send dedupes


def test_a_trigger_without_dedup_key_is_keyed_by_its_record():
    data = b'{"action": "trigger", "summary": "s"}'
    a = parse(data, OC, T0, record_event_id("oc.intake", 0, 5))
    b = parse(data, OC, T0, record_event_id("oc.intake", 0, 6))
    assert a.dedup_key == a.event_id and b.dedup_key == b.event_id and a.dedup_key != b.dedup_key
    pending = parse(data, OC, T0, RECORD_ID_PENDING)
    assert intake_partition_key(pending, OC) is None  # any partition: it is its own alert
    assert assigned_dedup_key(pending, "oc.intake", 0, 5) == a.dedup_key


def test_alerts_and_commands_of_one_case_share_a_partition_key():
    alert = parse(b'{"action": "acknowledge", "dedup_key": "db/lag"}', OC, T0)
    cid = f"{OC.case_id_prefix}-{routing_token('db/lag')}-1"
    command = parse(orjson.dumps({"command": "comment", "case_id": cid, "text": "hi",
                                  "actor": {"id": "u", "name": None, "email": None}}), OC, T0)
    assert intake_partition_key(alert, OC) == intake_partition_key(command, OC) == routing_token("db/lag").encode()
    foreign = parse(orjson.dumps({"command": "comment", "case_id": "CM-abc-1", "text": "hi",
                                  "actor": {"id": "u", "name": None, "email": None}}), OC, T0)
    assert intake_partition_key(foreign, OC) is None


def test_given_event_id_is_kept():
    assert intake(CM, trigger("k", event_id="my-id")).event_id == "my-id"


def test_trigger_without_dedup_key_gets_event_id():
    it = intake(OC, trigger(None))
    assert it.dedup_key == it.event_id
    assert uuid.UUID(it.dedup_key)
    it2 = intake(OC, trigger(None, event_id="abc"))
    assert it2.dedup_key == "abc"


def test_timestamp_defaults_to_received_ms():
    assert intake(CM, trigger("k"), received_ms=123_456).timestamp == 123_456
    assert intake(CM, command("comment", dedup_key="k", text="t"), received_ms=42).timestamp == 42


@pytest.mark.parametrize("ts,ms", [
    ("2026-11-24T10:00:00Z", 1_795_514_400_000),
    ("2026-11-24T10:00:00+00:00", 1_795_514_400_000),
    ("2026-11-24T12:00:00+02:00", 1_795_514_400_000),
    ("2026-11-24T05:30:00-04:30", 1_795_514_400_000),
    ("2026-11-24T10:00:00.250Z", 1_795_514_400_250),
    ("1970-01-01T00:00:00Z", 0),
])
def test_rfc3339_to_epoch_ms(ts, ms):
    assert intake(CM, trigger("k", timestamp=ts)).timestamp == ms


@pytest.mark.parametrize("ts,ms", [
    ("2004-03-15T07:55:47.472Z", 1_079_337_347_472),
    ("2038-08-15T15:00:50.430Z", 2_165_497_250_430),
])
def test_rfc3339_millis_exact(ts, ms):
    assert intake(CM, trigger("k", timestamp=ts)).timestamp == ms


def test_urgency_default_per_tenant():
    assert intake(OC, trigger("k")).fields["urgency"] == "high"
    assert intake(OC, trigger("k", urgency="low")).fields["urgency"] == "low"
    assert intake(CM, trigger("k")).fields["urgency"] is None
    assert intake(CM, trigger("k", urgency="low")).fields["urgency"] == "low"
    assert intake(OC, {"action": "acknowledge", "dedup_key": "k"}).fields["urgency"] is None


def test_alert_normalized_fields():
    it = intake(OC, trigger("k", source="prom", severity="critical", tags=["a", "b", "a"],
                            links=[{"href": "https://x", "text": "X"}, {"href": "https://y"}],
                            custom_details={"n": {"m": [1, 2.5, None, True]}}, **{"class": "http"}))
    assert it.kind == "alert" and it.op == "trigger" and it.case_id is None
    assert it.actor == {"id": "monitor", "name": "prom", "email": None}
    assert it.fields["tags"] == ["a", "b"]
    assert it.fields["links"] == [{"href": "https://x", "text": "X"}, {"href": "https://y", "text": None}]
    assert it.fields["custom_details"] == {"n": {"m": [1, 2.5, None, True]}}
    assert it.fields["class"] == "http"
    assert it.fields["severity"] == "critical"
    assert Intake.from_dict(orjson.loads(orjson.dumps(it.to_dict()))) == it


def test_command_normalized_fields():
    it = intake(CM, command("assign", dedup_key="k", actor={"id": "u1"}, assignee=None))
    assert it.kind == "command" and it.op == "assign"
    assert it.actor == {"id": "u1", "name": None, "email": None}
    assert it.fields == {"assignee": None}
    assert it.dedup_key == "k" and it.case_id is None


# --------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------


def test_routing_token_shape():
    tok = routing_token("prod/api/HighErrorRate")
    assert len(tok) == 20 and int(tok, 16) >= 0 and tok == tok.lower()
    assert routing_token("prod/api/HighErrorRate") == tok
    assert routing_token("prod/api/HighErrorRatE") != tok


@pytest.mark.parametrize("tenant", [CM, OC], ids=["case-management", "on-call"])
def test_routing_key_for_alert(tenant):
    for msg in (trigger("svc/x"), {"action": "resolve", "dedup_key": "svc/x"}):
        it = intake(tenant, msg)
        assert routing_key(it, tenant) == routing_token("svc/x")
    it = intake(tenant, trigger(None))
    assert routing_key(it, tenant) == routing_token(it.event_id)


@pytest.mark.parametrize("tenant", [CM, OC], ids=["case-management", "on-call"])
def test_routing_key_for_command(tenant):
    cid = make_case_id(tenant, "svc/x", 3)
    it = intake(tenant, command("comment", case_id=cid, text="t"))
    assert routing_key(it, tenant) == routing_token("svc/x")
    assert routing_key(it, tenant) == cid.split("-")[1]
    it = intake(tenant, command("comment", dedup_key="svc/x", text="t"))
    assert routing_key(it, tenant) == routing_token("svc/x")


def test_routing_key_for_other_tenants_case_id_is_none():
    cid = make_case_id(OC, "svc/x", 1)
    it = intake(CM, command("comment", case_id=cid, text="t"))
    assert routing_key(it, CM) is None


def test_token_from_case_id():
    tok = routing_token("k")
    assert token_from_case_id(f"CM-{tok}-1", CM) == tok
    assert token_from_case_id(f"PG-{tok}-12", OC) == tok
    assert token_from_case_id(make_case_id(CM, "k", 7), CM) == tok


@pytest.mark.parametrize("case_id", [
    "PG-{tok}-1",          # the other tenant's prefix
    "CMX-{tok}-1",
    "cm-{tok}-1",
    "CM-{tok}",
    "CM-{tok}-1-2",
    "CM-{tok}-",
    "CM-{tok}-x",
    "CM-{short}-1",
    "CM-{tok}0-1",
    "CM-zz{tok18}-1",
    "",
    "CM",
    "CM--1",
    "CM-{tok}-0",          # sequence numbers start at 1
    "CM-{tok}-01",         # no leading zero
    "CM-{tok}-1 ",
    " CM-{tok}-1",
    "CM-{tok}-1\n",
])
def test_token_from_case_id_rejects(case_id):
    tok = routing_token("k")
    cid = case_id.format(tok=tok, short=tok[:19], tok18=tok[:18])
    assert token_from_case_id(cid, CM) is None


@pytest.mark.parametrize("case_id", [
    "CM-0x{tok18}-1",
    "CM-+{tok19}-1",
    "CM-{tok10}_{tok9}-1",
    "CM- {tok19}-1",
    "CM-{upper}-1",
    "CM-{tok}-\u00b2",
])
def test_token_from_case_id_rejects_malformed_tokens(case_id):
    tok = routing_token("k")
    cid = case_id.format(tok=tok, tok18=tok[:18], tok19=tok[:19], tok10=tok[:10], tok9=tok[:9],
                         upper=tok.upper())
    assert token_from_case_id(cid, CM) is None


# nesting far beyond the limit: orjson refuses it itself (its wording has changed over versions:
# "recursion limit", now "depth limit exceeded"); the answer must not depend on that wording
DEEP = 10_000


@pytest.mark.parametrize("data", [
    b"[" * DEEP + b"]" * DEEP,
    b'{"action": "trigger", "summary": "s", "d": ' + b'{"d": ' * DEEP + b"1" + b"}" * DEEP + b"}",
    b"[" * DEEP,                                              # never closed: still "too deep", not "unexpected end"
])
def test_nesting_10000_deep_is_too_deep_whatever_orjson_says(data):
    r = parse(data, CM, T0)
    assert isinstance(r, Rejection) and r.reason == INVALID_JSON
    assert r.detail == f"JSON nested deeper than {MAX_DEPTH} levels"


def test_brackets_inside_strings_add_no_depth():
    # an invalid message (trailing comma) with brackets only inside strings: "not valid JSON", not "too deep"
    data = b'{"summary": "' + b"[" * DEEP + b'\\"{{{", "x": 1,}'
    r = parse(data, CM, T0)
    assert isinstance(r, Rejection) and r.reason == INVALID_JSON and r.detail.startswith("not valid JSON")


def test_gateway_body_nesting_10000_deep_is_too_deep():
    from streams.gateway import Gateway

    body, why = Gateway._json(b"[" * DEEP + b"]" * DEEP)
    assert body is None and why == f"JSON nested deeper than {MAX_DEPTH} levels"
