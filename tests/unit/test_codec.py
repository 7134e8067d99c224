"""Avro codec (Confluent wire format) and schema compatibility."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest

import schemas
from helpers import ALICE, BOB, CAROL, CM, OC, TENANTS, World, ack, command, oncall_scenario, resolve, trigger
from schemas import SchemaError, decode, encode, load_registry
from schemas.compat import check_pair, check_registry
from streams.domain.cases import EVENT_TYPES, replay

SCHEMA_DIR = Path(schemas.__file__).resolve().parent
INDEX = json.loads((SCHEMA_DIR / "index.json").read_text())
INDEX_IDS = {e["type"]: e["id"] for e in INDEX["schemas"]}

DETAILS = {"error_rate": 0.071, "threshold": 0.05, "hosts": ["a", "b"], "nested": {"deep": {"x": [1, {"y": None}]}},
           "ok": False, "count": 12, "unicode": "Grüße \u2603"}


def all_events(tenant) -> list[dict]:
    """Realistic events of every type, produced by decide."""
    w = World(tenant)
    w.send(trigger("prod/api", source="prometheus", severity="critical", component="api-gateway",
                   group="prod", project="platform", priority="P2", custom_details=DETAILS,
                   links=[{"href": "https://grafana.example.com/d/api", "text": "API"},
                          {"href": "https://runbook.example.com"}],
                   tags=["team:platform", "env:prod"], **{"class": "http"}))
    w.send(trigger("prod/api", summary="still failing", severity="error"))
    w.send(command("assign", dedup_key="prod/api", assignee=BOB))
    w.send(command("assign", dedup_key="prod/api", assignee=None, actor={"id": "u-tool"}))
    w.send(command("comment", dedup_key="prod/api", text="looking into it\nline 2"))
    w.send(command("set_priority", dedup_key="prod/api", priority="P1"))
    w.send(ack("prod/api"))
    w.send(resolve("prod/api"))
    w.send(trigger(None))  # minimal trigger: generated key, no optional fields
    oncall_scenario(w)     # the on-call event types (escalation, responders, SLA, automation)
    return w.events


@pytest.fixture(scope="module", params=sorted(TENANTS))
def events(request):
    return all_events(TENANTS[request.param])


def test_scenario_covers_every_event_type(events):
    assert {e["type"] for e in events} == set(EVENT_TYPES)
    assigned = [e for e in events if e["type"] == "Assigned"]
    assert assigned[1]["assignee"] is None and assigned[1]["previous_assignee"] == BOB
    assert assigned[1]["actor"] == {"id": "u-tool", "name": None, "email": None}


ONCALL_TYPES = EVENT_TYPES[EVENT_TYPES.index("EscalationStepStarted"):EVENT_TYPES.index("AutomationApplied") + 1]
DELIVERY_TYPES = ("NotificationDelivered", "NotificationFailed", "EndpointDisabled")


def test_scenario_events_fold_per_case(events):
    """Every case's events are gapless from version 1 and fold with ``apply``."""
    tenant = TENANTS[events[0]["tenant"]]
    by_case: dict[str, list[dict]] = {}
    for e in events:
        by_case.setdefault(e["case_id"], []).append(e)
    for cid, evs in by_case.items():
        assert [e["version"] for e in evs] == list(range(1, len(evs) + 1)), cid
        assert replay(tenant, evs)["version"] == len(evs)
        assert replay(tenant, [decode(encode(e)) for e in evs]) == replay(tenant, evs)  # decoded events fold alike
    page = replay(tenant, by_case[next(e["case_id"] for e in events if e["type"] == "AutomationApplied")])
    assert page["responder_users"] == [ALICE["id"], CAROL["id"], BOB["id"]]
    assert page["responders"] == [ALICE, CAROL, BOB]
    assert page["targets"] == [{"kind": "user", "id": "u-alice"}, {"kind": "schedule", "id": "sch-primary"},
                               {"kind": "team", "id": "team-db"}]
    assert (page["escalation_policy_id"], page["escalation_policy_step_id"], page["escalation_active"],
            page["is_shadow"], page["sla_breaches"]) == ("ep-db", "ep-db-s1", False, False, ["resolution"])
    assert page["time_to_first_acknowledge"] == page["acknowledged_at"] - page["created_at"] > 0


def test_round_trip_every_event(events):
    for e in events:
        original = copy.deepcopy(e)
        data = encode(e)
        assert e == original  # encode does not mutate
        assert decode(data) == e, e["type"]


def test_round_trip_case_created_details(events):
    created = [e for e in events if e["type"] == "CaseCreated"]
    full = decode(encode(created[0]))
    assert full["custom_details"] == DETAILS
    assert full["links"] == [{"href": "https://grafana.example.com/d/api", "text": "API"},
                             {"href": "https://runbook.example.com", "text": None}]
    assert full["tags"] == ["team:platform", "env:prod"]
    assert full["class"] == "http"
    minimal = decode(encode(created[1]))
    assert minimal["custom_details"] == {} and minimal["links"] == [] and minimal["tags"] == []
    assert minimal["source"] is None and minimal["actor"] == {"id": "monitor", "name": None, "email": None}


def test_round_trip_null_actor():
    e = dict(all_events(CM)[4], actor=None)  # CommentAdded with no actor
    assert e["type"] == "CommentAdded"
    assert decode(encode(e)) == e


def test_custom_details_none_encodes_as_empty_object():
    e = dict(all_events(OC)[0], custom_details=None)
    assert decode(encode(e))["custom_details"] == {}


def test_wire_format_header(events):
    seen = set()
    for e in events:
        data = encode(e)
        assert data[0] == 0
        assert struct.unpack(">I", data[1:5])[0] == INDEX_IDS[e["type"]]
        assert int.from_bytes(data[1:5], "big") == INDEX_IDS[e["type"]]
        assert schemas.schema_id(data) == INDEX_IDS[e["type"]]
        seen.add(e["type"])
    assert seen == set(INDEX_IDS)


@pytest.mark.parametrize("ms", [1_079_337_347_472, 2_165_497_250_430])
def test_round_trip_timestamp_millis_exact(ms):
    e = dict(all_events(CM)[4], occurred_at=ms)
    assert decode(encode(e))["occurred_at"] == ms


def test_round_trip_timestamps_now():
    e = all_events(OC)[1]
    assert e["type"] == "AlertDeduplicated"
    for ms in (0, 1_795_514_400_001, 1_795_514_400_999, 1_800_000_000_123):
        d = decode(encode(dict(e, occurred_at=ms, last_seen_at=ms + 1)))
        assert (d["occurred_at"], d["last_seen_at"]) == (ms, ms + 1)


def _oncall(etype: str, n: int = 0) -> dict:
    return [e for e in all_events(OC) if e["type"] == etype][n]


def test_round_trip_nullable_timestamp():
    """``next_escalation_at`` is a union of null and timestamp-millis: an int or None in dicts."""
    step = _oncall("EscalationStepStarted")
    assert isinstance(step["next_escalation_at"], int)
    for ms in (None, 0, 1_795_514_400_001, 2_165_497_250_430):
        d = decode(encode(dict(step, next_escalation_at=ms)))
        assert d["next_escalation_at"] == ms and type(d["next_escalation_at"]) is type(ms)
    assert _oncall("EscalationStepStarted", 1)["next_escalation_at"] is None


def test_round_trip_oncall_payloads():
    step = decode(encode(_oncall("EscalationStepStarted")))
    assert step["targets"] == [{"kind": "user", "id": "u-alice"}, {"kind": "schedule", "id": "sch-primary"},
                               {"kind": "team", "id": "team-db"}]
    assert (step["step_index"], step["escalation_policy_retry_count"], step["urgency"], step["is_shadow"]) == (
        0, 0, "high", False)
    added = decode(encode(_oncall("RespondersAdded")))
    assert added["responders"] == [ALICE, CAROL]  # names and emails travel in the event
    manual = decode(encode(_oncall("RespondersAdded", 1)))
    assert manual["escalation_policy_step_id"] is None and manual["actor"] == ALICE
    auto = decode(encode(_oncall("NotificationRequested", 2)))
    assert (auto["reason"], auto["escalation_policy_id"], auto["urgency"]) == ("automation", None, None)
    ended = decode(encode(_oncall("EscalationEnded")))
    assert (ended["reason"], ended["resolves_page"]) == ("acknowledged", False)
    timed_out = decode(encode(_oncall("AcknowledgeTimedOut")))
    assert isinstance(timed_out["acknowledged_at"], int) and timed_out["timeout_seconds"] == 1800
    breached = decode(encode(_oncall("SlaBreached")))
    assert (breached["sla"], breached["priority"]) == ("resolution", "P2") and isinstance(breached["due_at"], int)
    assert decode(encode(_oncall("AutomationApplied")))["actions"] == ["set_priority:P1", "add_tag:db"]
    big = dict(_oncall("AcknowledgeTimedOut"), timeout_seconds=2**40)  # long, not int
    assert decode(encode(big))["timeout_seconds"] == 2**40


@pytest.mark.parametrize("etype", ["EscalationStepStarted", "RespondersAdded", "NotificationRequested"])
def test_encode_rejects_missing_required_payload(etype):
    e = _oncall(etype)
    required = next(k for k in ("user_id", "responders", "escalation_policy_id") if k in e)
    with pytest.raises(Exception):
        encode({k: v for k, v in e.items() if k != required})


def _body(events) -> bytes:
    return encode(events[0])


@pytest.mark.parametrize("mutate", [
    lambda b: b"\x01" + b[1:],                 # wrong magic
    lambda b: b"\xff" + b[1:],
    lambda b: b[:1] + struct.pack(">I", 999) + b[5:],   # unknown id
    lambda b: b[:1] + struct.pack(">I", 0) + b[5:],
    lambda b: b"",                              # too short
    lambda b: b"\x00",
    lambda b: b[:4],
], ids=["magic-1", "magic-ff", "id-999", "id-0", "empty", "one-byte", "four-bytes"])
def test_decode_rejects_bad_bytes(events, mutate):
    with pytest.raises(SchemaError):
        decode(mutate(_body(events)))


@pytest.mark.parametrize("cut", [5, 8], ids=["header-only", "truncated-body"])
def test_decode_truncated_body_raises_schema_error(events, cut):
    with pytest.raises(SchemaError):
        decode(_body(events)[:cut])


@pytest.mark.parametrize("etype", ["CaseDeleted", None, "casecreated"])
def test_encode_unknown_type(etype):
    e = dict(all_events(CM)[0], type=etype)
    with pytest.raises(SchemaError):
        encode(e)


# --------------------------------------------------------------------------
# schema files and compatibility
# --------------------------------------------------------------------------


def test_every_avsc_is_indexed_and_ids_unique():
    files = sorted(p.relative_to(SCHEMA_DIR).as_posix() for p in (SCHEMA_DIR / "avro").glob("*.avsc"))
    listed = [e["file"] for e in INDEX["schemas"]]
    assert files == sorted(listed)
    assert len(set(listed)) == len(listed)
    ids = [e["id"] for e in INDEX["schemas"]]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)
    pairs = [(e["type"], e["version"]) for e in INDEX["schemas"]]
    assert len(pairs) == len(set(pairs))
    for e in INDEX["schemas"]:
        raw = json.loads((SCHEMA_DIR / e["file"]).read_text())
        assert raw["name"] == e["type"]
        assert e["file"] == f"avro/{e['type']}.v{e['version']}.avsc"


def test_registry_covers_every_event_type():
    reg = schemas.registry()
    assert set(reg.latest) == set(EVENT_TYPES)
    assert {i: s.type for i, s in reg.by_id.items()} == {v: k for k, v in INDEX_IDS.items()}
    assert reg.latest["CaseCreated"].json_fields == ("custom_details",)
    assert set(reg.latest["AlertDeduplicated"].ts_fields) == {"occurred_at", "last_seen_at"}


@pytest.mark.parametrize("etype", ONCALL_TYPES)
def test_oncall_schemas_share_the_header_and_document_their_payload(etype):
    header = json.loads((SCHEMA_DIR / "avro/StatusChanged.v1.avsc").read_text())["fields"][:9]
    raw = schemas.registry().latest[etype].raw
    assert raw["namespace"] == "casestream.events" and raw["doc"]
    assert raw["fields"][:9] == header

    def documented(fields):
        for f in fields:
            assert f.get("doc"), f"{etype}.{f['name']} has no doc"
            t = f["type"]
            items = t.get("items") if isinstance(t, dict) and t.get("type") == "array" else None
            if isinstance(items, dict) and items.get("type") == "record":
                assert items.get("doc"), f"{etype}: record {items['name']} has no doc"
                documented(items["fields"])

    documented(raw["fields"][9:])
    for f in raw["fields"][9:]:  # nullable payload fields default to null
        if isinstance(f["type"], list):
            assert f["type"][0] == "null" and f["default"] is None


def test_index_ids_of_the_oncall_types():
    assert [INDEX_IDS[t] for t in ONCALL_TYPES] == list(range(7, 14))
    assert [INDEX_IDS[t] for t in DELIVERY_TYPES] == [14, 15, 16]
    assert set(schemas.registry().latest["EscalationStepStarted"].ts_fields) >= {"occurred_at"}
    assert set(schemas.registry().latest["AcknowledgeTimedOut"].ts_fields) == {"occurred_at", "acknowledged_at"}
    assert set(schemas.registry().latest["SlaBreached"].ts_fields) == {"occurred_at", "due_at"}


def test_checked_in_schemas_are_compatible():
    assert check_registry() == {}


BASE = {
    "type": "record", "name": "Thing", "namespace": "t",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "n", "type": "int"},
    ],
}


def evolve(*, add=None, change=None) -> dict:
    new = copy.deepcopy(BASE)
    if add:
        new["fields"].append(add)
    if change:
        for f in new["fields"]:
            if f["name"] == change[0]:
                f["type"] = change[1]
    return new


def test_check_pair_identical_is_compatible():
    assert check_pair(BASE, copy.deepcopy(BASE)) == []


def test_check_pair_flags_added_field_without_default():
    probs = check_pair(BASE, evolve(add={"name": "owner", "type": "string"}))
    assert probs
    assert any("owner" in p for p in probs)


def test_check_pair_flags_string_to_int():
    probs = check_pair(BASE, evolve(change=("id", "int")))
    assert probs
    assert any("'id'" in p for p in probs)


def test_check_pair_flags_nullable_to_required():
    assert check_pair(BASE, evolve(change=("note", "string")))


def test_check_pair_accepts_added_field_with_default():
    assert check_pair(BASE, evolve(add={"name": "owner", "type": ["null", "string"], "default": None})) == []
    assert check_pair(BASE, evolve(add={"name": "level", "type": "int", "default": 3})) == []


def test_check_pair_accepts_promotion():
    assert check_pair(BASE, evolve(change=("n", "long"))) == []
    assert check_pair(BASE, evolve(change=("n", "double"))) == []
    assert check_pair(BASE, evolve(change=("note", ["null", "string", "int"]))) == []


def test_check_pair_flags_real_schema_change():
    old = json.loads((SCHEMA_DIR / "avro/StatusChanged.v1.avsc").read_text())
    bad = copy.deepcopy(old)
    bad["fields"].append({"name": "ticket", "type": "string"})
    assert check_pair(old, bad)
    good = copy.deepcopy(old)
    good["fields"].append({"name": "ticket", "type": ["null", "string"], "default": None})
    assert check_pair(old, good) == []


def _registry_dir(tmp_path: Path, v2_field: dict) -> Path:
    (tmp_path / "avro").mkdir()
    v1 = json.loads((SCHEMA_DIR / "avro/CommentAdded.v1.avsc").read_text())
    v2 = copy.deepcopy(v1)
    v2["fields"].append(v2_field)
    (tmp_path / "avro/CommentAdded.v1.avsc").write_text(json.dumps(v1))
    (tmp_path / "avro/CommentAdded.v2.avsc").write_text(json.dumps(v2))
    (tmp_path / "index.json").write_text(json.dumps({"schemas": [
        {"id": 5, "type": "CommentAdded", "version": 1, "file": "avro/CommentAdded.v1.avsc"},
        {"id": 7, "type": "CommentAdded", "version": 2, "file": "avro/CommentAdded.v2.avsc"},
    ]}))
    return tmp_path


def test_check_registry_flags_incompatible_version(tmp_path):
    reg = load_registry(_registry_dir(tmp_path, {"name": "lang", "type": "string"}))
    assert reg.latest["CommentAdded"].version == 2
    bad = check_registry(reg)
    assert list(bad) == ["CommentAdded v1 -> v2"]
    assert any("lang" in p for p in bad["CommentAdded v1 -> v2"])


def test_check_registry_accepts_compatible_version(tmp_path):
    reg = load_registry(_registry_dir(tmp_path, {"name": "lang", "type": "string", "default": "en"}))
    assert check_registry(reg) == {}


def test_load_registry_rejects_duplicate_ids(tmp_path):
    d = _registry_dir(tmp_path, {"name": "lang", "type": "string", "default": "en"})
    idx = json.loads((d / "index.json").read_text())
    idx["schemas"][1]["id"] = 5
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(SchemaError):
        load_registry(d)
