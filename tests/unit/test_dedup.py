"""Dedup rules, idempotence, versions and the event-sourced fold."""

from __future__ import annotations

import copy
import uuid

import orjson
import pytest

from helpers import (
    ALICE, BOB, CM, OC, T0, TENANTS, World, ack, command, intake, only_event, resolve, set_status,
    trigger,
)
from streams.domain import cases as domain
from streams.domain.cases import (
    EVENT_TYPES, RECENT_LIMIT, SEEN_LIMIT, STATE_FIELDS, already_seen, apply, compact, decide,
    is_redelivery, lookup, new_entry, recorded_outputs, remember, replay, target_case,
)
from streams.domain.intake import (
    INVALID_TRANSITION, NO_OPEN_CASE, UNKNOWN_CASE, derive_id, make_case_id, routing_token,
)
from streams.stage.memory import MemoryStage

TENANT_NAMES = sorted(TENANTS)
ENVELOPE = ("event_id", "type", "tenant", "case_id", "dedup_key", "version", "occurred_at",
            "caused_by", "actor")


def scenario(w: World) -> list[domain.Decision]:
    """A case's life: trigger, repeat trigger, assign, comment, priority, ack, resolve."""
    return [
        w.send(trigger("db/disk", severity="error", priority="P3", source="nagios")),
        w.send(trigger("db/disk", summary="disk still full", severity="critical")),
        w.send(command("assign", dedup_key="db/disk", assignee=BOB)),
        w.send(command("comment", dedup_key="db/disk", text="looking")),
        w.send(command("set_priority", dedup_key="db/disk", priority="P1")),
        w.send(ack("db/disk")),
        w.send(resolve("db/disk")),
    ]


# --------------------------------------------------------------------------
# alerts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_trigger_without_open_case_creates_case(name):
    tenant = TENANTS[name]
    it = intake(tenant, trigger("svc/cpu", severity="warning", tags=["a"]))
    d = decide(tenant, it, None)
    e = only_event(d, "CaseCreated")
    expected_id = make_case_id(tenant, "svc/cpu", 1)
    assert expected_id == f"{tenant.case_id_prefix}-{routing_token('svc/cpu')}-1"
    assert e["case_id"] == expected_id
    assert e["status"] == tenant.default_status == {"case-management": "OPEN", "on-call": "TRIGGERED"}[name]
    assert e["version"] == 1
    assert e["dedup_key"] == "svc/cpu"
    assert e["case_type"] == tenant.case_type and e["work_type"] == tenant.work_type
    assert e["summary"] == "disk full on db-1"
    assert e["severity"] == "warning" and e["tags"] == ["a"]
    assert d.created == [expected_id]
    entry = d.entry
    assert (entry["dedup_key"], entry["seq"], entry["open_case_id"], entry["last_case_id"]) == (
        "svc/cpu", 1, expected_id, expected_id)
    assert entry["seen"] == [] and entry["recent"] == []  # decide does not remember; the caller does
    assert list(entry["cases"]) == [expected_id]
    case = d.cases[expected_id]
    assert case is entry["cases"][expected_id]
    assert set(case) == set(STATE_FIELDS)
    assert case["status"] == tenant.default_status
    assert case["occurrence_count"] == 1
    assert case["version"] == 1
    assert case["created_at"] == case["last_seen_at"] == it.timestamp


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_trigger_with_open_case_deduplicates(name):
    w = World(TENANTS[name])
    cid = w.open_case("k1")
    created = w.case(cid)
    later = T0 + 3_600_000
    e = only_event(w.send(trigger("k1", summary="again", severity="critical",
                                  timestamp="2026-11-24T11:00:00Z")), "AlertDeduplicated")
    assert e["case_id"] == cid
    assert e["occurrence_count"] == 2
    assert e["last_seen_at"] == later
    assert e["summary"] == "again" and e["severity"] == "critical"
    assert e["version"] == 2
    # an older trigger counts but does not move last_seen_at back
    e = only_event(w.send(trigger("k1", timestamp="2026-11-24T09:00:00Z")), "AlertDeduplicated")
    assert e["occurrence_count"] == 3
    assert e["last_seen_at"] == later
    case = w.case(cid)
    assert case["occurrence_count"] == 3
    assert case["last_seen_at"] == later
    assert case["created_at"] == created["created_at"]
    assert "custom_details" not in case  # stream state keeps no payloads (the summary, for notifications)
    # dedup does not rewrite the case summary (the full case is a fold of the events)
    assert replay(w.tenant, w.events_of(cid))["summary"] == "disk full on db-1"
    assert w.key("k1")["seq"] == 1
    assert len(w.cases) == 1


@pytest.mark.parametrize("name", TENANT_NAMES)
@pytest.mark.parametrize("action", [ack, resolve])
def test_action_without_open_case_is_rejected(name, action):
    tenant = TENANTS[name]
    it = intake(tenant, action("never-triggered"))
    d = decide(tenant, it, None)
    assert d.rejection is not None
    assert d.rejection.reason == NO_OPEN_CASE
    assert "never-triggered" in d.rejection.detail
    # a brand-new key: an empty entry, stored so that a redelivery is recognised
    assert d.entry is not None and d.entry["cases"] == {} and d.entry["open_case_id"] is None
    assert d.events == [] and d.cases == {} and d.created == []


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_trigger_after_final_status_opens_new_case(name):
    tenant = TENANTS[name]
    w = World(tenant)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    e = only_event(w.send(trigger("k1")), "CaseCreated")
    c2 = e["case_id"]
    assert c2 == make_case_id(tenant, "k1", 2)
    assert c2 != c1
    assert c2.rsplit("-", 1)[1] == "2"
    assert e["version"] == 1
    assert e["status"] == tenant.default_status
    ks = w.key("k1")
    assert (ks["seq"], ks["open_case_id"], ks["last_case_id"]) == (2, c2, c2)
    assert w.case(c1)["status"] == tenant.final_status
    assert w.case(c2)["occurrence_count"] == 1


# --------------------------------------------------------------------------
# idempotence
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_same_event_id_twice_is_duplicate_once_remembered(name):
    tenant = TENANTS[name]
    it = intake(tenant, trigger("k1", event_id="ev-1"))
    first = decide(tenant, it, None)
    assert not first.duplicate
    outputs = [["domain-events", e["case_id"], e] for e in first.events]
    ks = remember(first.entry, it.event_id, outputs)
    assert already_seen(ks, "ev-1")
    assert recorded_outputs(ks, "ev-1") == outputs
    assert recorded_outputs(ks, "other") is None

    again = decide(tenant, it, ks)
    assert again.duplicate is True
    assert again.events == [] and again.cases == {} and again.rejection is None
    assert again.entry is None and again.created == []

    # without remember() it is not a duplicate: decide is a pure function of its inputs
    not_remembered = decide(tenant, it, first.entry)
    assert not not_remembered.duplicate
    assert [e["type"] for e in not_remembered.events] == ["AlertDeduplicated"]
    not_remembered = decide(tenant, it, None)
    assert not not_remembered.duplicate
    assert not_remembered.events == first.events


def test_duplicate_through_world_has_no_second_effect():
    w = World(OC)
    w.send(trigger("k1", event_id="x-1"))
    w.send(trigger("k1", event_id="x-2"))
    entry_before = w.key("k1")
    case_before = w.case(entry_before["open_case_id"])
    d = w.send(trigger("k1", event_id="x-1"))
    assert d.duplicate is True
    assert d.events == [] and d.entry is None
    assert w.case(case_before["case_id"]) == case_before
    assert case_before["occurrence_count"] == 2
    assert w.key("k1") == entry_before  # nothing stored, not even "seen" again
    assert entry_before["seen"] == ["x-1", "x-2"]
    x2 = w.events[-1]
    assert x2["caused_by"] == "x-2" and x2["type"] == "AlertDeduplicated"
    # what x-2 produced, kept for a redelivery (the stored form: [kind, key, value] rows)
    assert recorded_outputs(entry_before, "x-2") == [["domain-events", x2["case_id"], x2]]


def test_command_by_case_id_duplicate_detected_via_key_entry():
    w = World(CM)
    cid = w.open_case("k1")
    msg = command("comment", case_id=cid, text="hello", event_id="c-1")
    only_event(w.send(msg), "CommentAdded")
    d = w.send(msg)
    assert d.duplicate is True
    assert w.case(cid)["comment_count"] == 1


def test_remember_bounds_seen_and_recent():
    ks = new_entry("k")
    n = SEEN_LIMIT + 10
    for i in range(n):
        ks = remember(ks, f"id-{i}", [["domain-events", "c", {"i": i}]])
    assert SEEN_LIMIT == 1024 and RECENT_LIMIT == 64
    assert len(ks["seen"]) == SEEN_LIMIT
    assert len(ks["recent"]) == RECENT_LIMIT
    assert ks["seen"][0] == f"id-{n - SEEN_LIMIT}"
    assert ks["seen"][-1] == f"id-{n - 1}"
    assert not already_seen(ks, "id-0")
    assert already_seen(ks, f"id-{n - SEEN_LIMIT}")
    assert recorded_outputs(ks, f"id-{n - 1}") == [["domain-events", "c", {"i": n - 1}]]
    assert recorded_outputs(ks, f"id-{n - RECENT_LIMIT}") is not None
    assert recorded_outputs(ks, f"id-{n - RECENT_LIMIT - 1}") is None  # seen, outputs dropped
    assert already_seen(ks, f"id-{n - RECENT_LIMIT - 1}")


def test_remember_does_not_mutate_input():
    ks = new_entry("k")
    ks2 = remember(ks, "a", [])
    assert ks == new_entry("k")
    assert ks2["seen"] == ["a"] and len(ks2["recent"]) == 1
    assert recorded_outputs(ks2, "a") == []
    assert recorded_outputs(ks, "a") is None


def test_decide_does_not_mutate_inputs():
    w = World(CM)
    cid = w.open_case("k1")
    entry = w.key("k1")
    entry0 = copy.deepcopy(entry)
    for msg in (trigger("k1", event_id="m1"), ack("k1", event_id="m2"), resolve("k1", event_id="m3"),
                set_status("CLOSED", case_id=cid, event_id="m4"),
                command("assign", case_id=cid, assignee=BOB, event_id="m5"),
                set_status("OPEN", case_id=cid, event_id="m6"), ack("k1", event_id="e1")):
        decide(CM, intake(CM, msg), entry)
    assert entry == entry0


# --------------------------------------------------------------------------
# event shape, versions, determinism
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_versions_gapless_from_one(name):
    w = World(TENANTS[name])
    ds = scenario(w)
    assert all(d.rejection is None and not d.noop for d in ds)
    assert [e["type"] for e in w.events] == [
        "CaseCreated", "AlertDeduplicated", "Assigned", "CommentAdded", "PriorityChanged",
        "StatusChanged", "StatusChanged"]
    assert [e["version"] for e in w.events] == [1, 2, 3, 4, 5, 6, 7]
    cid = w.events[0]["case_id"]
    assert {e["case_id"] for e in w.events} == {cid}
    assert w.case(cid)["version"] == 7


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_every_event_carries_envelope(name):
    tenant = TENANTS[name]
    w = World(tenant)
    ds = scenario(w)
    for n, d in enumerate(ds, start=1):
        for e in d.events:
            for f in ENVELOPE:
                assert f in e, (e["type"], f)
            assert e["type"] in EVENT_TYPES
            assert e["tenant"] == name
            assert e["caused_by"] == f"e{n}"
            assert e["occurred_at"] == T0 + n * 1000
            assert e["dedup_key"] == "db/disk"
            assert uuid.UUID(e["event_id"]).version == 5
    alert_actor = {"id": "monitor", "name": "nagios", "email": None}
    assert ds[0].events[0]["actor"] == alert_actor
    assert ds[2].events[0]["actor"] == ALICE
    status = [e for e in w.events if e["type"] == "StatusChanged"]
    assert [(e["from_status"], e["to_status"]) for e in status] == [
        (tenant.default_status, tenant.actions["acknowledge"]),
        (tenant.actions["acknowledge"], tenant.final_status)]
    created = w.events[0]
    assert created["dedup_key"] == "db/disk"
    assert created["priority"] == "P3" and created["source"] == "nagios"
    assert len({e["event_id"] for e in w.events}) == len(w.events)


def test_event_ids_are_deterministic():
    a, b = World(OC), World(OC)
    scenario(a)
    scenario(b)
    assert a.events == b.events
    assert [e["event_id"] for e in a.events] == [e["event_id"] for e in b.events]
    c = World(OC, prefix="other-")
    scenario(c)
    assert not {e["event_id"] for e in a.events} & {e["event_id"] for e in c.events}


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_command_unknown_case_id(name):
    tenant = TENANTS[name]
    w = World(tenant)
    w.open_case("k1")
    missing = make_case_id(tenant, "k1", 9)
    d = w.send(command("comment", case_id=missing, text="hi"))
    assert d.rejection is not None and d.rejection.reason == UNKNOWN_CASE
    assert missing in d.rejection.detail
    assert d.events == [] and d.cases == {} and d.entry is None  # no entry: nothing to remember


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_command_unknown_dedup_key(name):
    w = World(TENANTS[name])
    w.open_case("k1")
    d = w.send(command("assign", dedup_key="nope", assignee=BOB))
    assert d.rejection is not None and d.rejection.reason == UNKNOWN_CASE
    assert "'nope'" in d.rejection.detail
    assert d.events == [] and d.cases == {}


def test_assign_same_assignee_is_noop_and_unassign_emits():
    w = World(CM)
    cid = w.open_case("k1")
    e = only_event(w.send(command("assign", case_id=cid, assignee=BOB)), "Assigned")
    assert e["assignee"] == BOB and e["previous_assignee"] is None

    d = w.send(command("assign", case_id=cid, assignee={"id": BOB["id"], "name": "Robert"}))
    assert d.noop is True and d.events == [] and d.rejection is None

    e = only_event(w.send(command("assign", case_id=cid, assignee=ALICE)), "Assigned")
    assert e["assignee"] == ALICE and e["previous_assignee"] == BOB
    e = only_event(w.send(command("assign", case_id=cid, assignee=None)), "Assigned")
    assert e["assignee"] is None and e["previous_assignee"] == ALICE
    assert w.case(cid)["assignee"] is None

    d = w.send(command("assign", case_id=cid, assignee=None))
    assert d.noop is True and d.events == []


def test_set_priority_same_is_noop():
    w = World(OC)
    cid = w.open_case("k1", priority="P2")
    d = w.send(command("set_priority", case_id=cid, priority="P2"))
    assert d.noop is True and d.events == [] and d.rejection is None
    e = only_event(w.send(command("set_priority", case_id=cid, priority="P1")), "PriorityChanged")
    assert (e["from_priority"], e["to_priority"]) == ("P2", "P1")
    assert w.case(cid)["priority"] == "P1"


def test_set_priority_from_none():
    w = World(CM)
    cid = w.open_case("k1")
    e = only_event(w.send(command("set_priority", case_id=cid, priority="P4")), "PriorityChanged")
    assert (e["from_priority"], e["to_priority"]) == (None, "P4")


def test_comment_always_emits():
    w = World(CM)
    cid = w.open_case("k1")
    for i in range(3):
        e = only_event(w.send(command("comment", case_id=cid, text="same text")), "CommentAdded")
        assert e["text"] == "same text"
    only_event(w.send(set_status("CLOSED", case_id=cid)), "StatusChanged")
    only_event(w.send(command("comment", dedup_key="k1", text="after close")), "CommentAdded")
    assert w.case(cid)["comment_count"] == 4


# --------------------------------------------------------------------------
# apply / replay
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_replay_equals_decided_state(name):
    tenant = TENANTS[name]
    w = World(tenant)
    for d in scenario(w):
        for cid, state in d.cases.items():
            so_far = [e for e in w.events_of(cid) if e["version"] <= state["version"]]
            assert so_far[-1] is d.events[-1]
            assert compact(replay(tenant, so_far)) == state
    # a second case of the same key, and a second key
    w.send(trigger("db/disk"))
    w.send(trigger("other"))
    w.send(command("comment", dedup_key="other", text="x"))
    assert len(w.cases) == 3
    for cid in w.cases:
        assert compact(replay(tenant, w.events_of(cid))) == w.case(cid)
    final = w.case(w.events[0]["case_id"])
    assert final["status"] == tenant.final_status
    assert final["occurrence_count"] == 2
    assert final["assignee"] == BOB
    assert final["comment_count"] == 1
    assert final["priority"] == "P1"
    assert final["acknowledged_at"] == T0 + 6000
    assert final["resolved_at"] == T0 + 7000
    assert final["updated_at"] == T0 + 7000


def test_apply_rejects_version_gap_and_orphans():
    w = World(CM)
    cid = w.open_case("k1")
    e = only_event(w.send(command("comment", case_id=cid, text="x")), "CommentAdded")
    created = w.events[0]
    with pytest.raises(ValueError):
        apply(CM, None, e)
    with pytest.raises(ValueError):
        apply(CM, w.case(cid), created)
    with pytest.raises(ValueError):
        apply(CM, replay(CM, [created]), dict(e, version=3))


def test_redelivery_is_recognised_by_offset():
    ks = remember(new_entry("k"), "ev-1", [["domain-events", "c", {}]], 17)
    assert domain.is_redelivery(ks, "ev-1", 17) is True
    assert domain.is_redelivery(ks, "ev-1", 18) is False   # same id, other record: sent twice
    assert domain.is_redelivery(ks, "ev-1", None) is False
    assert domain.is_redelivery(ks, "ev-2", 17) is False


def test_domain_event_ids_unique_across_cases():
    w = World(CM)
    a = only_event(w.send(trigger("key-a", event_id="same")), "CaseCreated")
    b = only_event(w.send(trigger("key-b", event_id="same")), "CaseCreated")
    assert a["case_id"] != b["case_id"]
    assert a["event_id"] != b["event_id"]


def test_domain_event_id_derives_from_tenant_case_version_and_intake_id():
    w = World(CM)
    cid = w.open_case("k1")
    w.send(command("comment", case_id=cid, text="x", event_id="same"))
    for e in w.events:
        assert e["event_id"] == derive_id("domain", CM.name, e["case_id"], str(e["version"]), e["caused_by"])
    # the same client ids and keys in another tenant never give the same event ids
    a = only_event(World(CM).send(trigger("k", event_id="x")), "CaseCreated")
    b = only_event(World(OC).send(trigger("k", event_id="x")), "CaseCreated")
    assert a["event_id"] != b["event_id"]


def test_same_client_event_id_on_two_cases_of_one_key_is_a_duplicate():
    # 'seen' is per dedup key: a second message with that id is not applied to another case
    w = World(CM)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    c2 = w.open_case("k1")
    only_event(w.send(command("comment", case_id=c1, text="a", event_id="dup")), "CommentAdded")
    d = w.send(command("comment", case_id=c2, text="b", event_id="dup"))
    assert d.duplicate is True
    assert w.case(c2)["comment_count"] == 0


# --------------------------------------------------------------------------
# stream state: one entry per dedup key
# --------------------------------------------------------------------------


def test_new_entry_shape():
    assert new_entry("k") == {"dedup_key": "k", "seq": 0, "open_case_id": None, "last_case_id": None,
                              "cases": {}, "seen": [], "recent": []}
    assert new_entry("k") is not new_entry("k")


def test_compact_keeps_exactly_state_fields():
    full = {f: f"v-{f}" for f in STATE_FIELDS}
    full.update(custom_details={"big": "x" * 1000}, links=[])
    c = compact(full)
    assert list(c) == list(STATE_FIELDS)
    assert c == {f: f"v-{f}" for f in STATE_FIELDS}
    assert compact({}) == dict.fromkeys(STATE_FIELDS)


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_stored_cases_hold_only_state_fields(name):
    tenant = TENANTS[name]
    w = World(tenant)
    details = {"blob": "x" * 10_000, "nested": {"a": [1, 2]}}
    d = w.send(trigger("db/disk", custom_details=details, links=[{"href": "https://x"}], tags=["a"],
                       component="db", group="g", **{"class": "c"}))
    created = only_event(d, "CaseCreated")
    assert created["custom_details"] == details  # the event carries the payload ...
    cid = created["case_id"]
    for case in (d.cases[cid], w.case(cid)):     # ... stream state does not
        assert set(case) == set(STATE_FIELDS)
        for f in ("custom_details", "links", "responders"):  # payloads and names stay out
            assert f not in case
        # what routing and automation rules match on stays in
        assert (case["tags"], case["component"], case["group"], case["class"]) == (["a"], "db", "g", "c")
    scenario(w)  # every other event type
    assert w.cases
    for entry in w.entries.values():
        for case in entry["cases"].values():
            assert set(case) == set(STATE_FIELDS)
    # the decision state holds no payload; only the recorded outputs of recent inputs (re-sent verbatim
    # on a redelivery, bounded by RECENT_LIMIT / RECENT_BYTES) carry the CaseCreated event that has it
    state = {key: {k: v for k, v in entry.items() if k != "recent"} for key, entry in w.entries.items()}
    assert "x" * 10_000 not in orjson.dumps(state).decode()
    assert [kind for kind, _key, _value in recorded_outputs(w.key("db/disk"), created["caused_by"])] == \
        ["domain-events"]
    # and it keeps what decisions need
    case = w.case(cid)
    assert (case["case_id"], case["dedup_key"], case["tenant"]) == (cid, "db/disk", name)
    assert case["version"] == len(w.events_of(cid)) == 8  # the scenario went on with the same case


def test_entries_survive_a_json_round_trip():
    w = World(CM)
    scenario(w)
    w.send(trigger("db/disk"))
    for k, entry in w.entries.items():
        assert orjson.loads(orjson.dumps(entry)) == entry
        assert w.key(k) == entry


def test_decision_cases_are_the_changed_cases_as_stored():
    w = World(CM)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    c2 = w.open_case("k1")
    d = w.send(command("comment", case_id=c1, text="on the old one"))
    assert list(d.cases) == [c1]
    assert d.cases[c1] == w.case(c1) and d.cases[c1]["comment_count"] == 1
    assert set(d.entry["cases"]) == {c1, c2}
    changed = w.send(command("set_priority", case_id=c2, priority="P3"))
    assert list(changed.cases) == [c2]
    noop = w.send(command("set_priority", case_id=c2, priority="P3"))
    assert noop.noop is True and noop.cases == {} and noop.events == []


# --------------------------------------------------------------------------
# lookup and target_case
# --------------------------------------------------------------------------


def test_lookup_by_dedup_key_and_by_case_id_through_index():
    entries = {"k1": new_entry("k1")}
    index = {"CM-x": "k1"}
    calls = []

    def get_entry(k):
        calls.append(k)
        return entries.get(k)

    by_key = intake(CM, trigger("k1"))
    assert lookup(by_key, get_entry, index.get) is entries["k1"]
    assert lookup(intake(CM, trigger("k2")), get_entry, index.get) is None
    tok = routing_token("k1")
    cid = f"CM-{tok}-1"
    index[cid] = "k1"
    assert lookup(intake(CM, command("comment", case_id=cid, text="t")), get_entry, index.get) is entries["k1"]
    assert calls == ["k1", "k2", "k1"]
    # a case id missing from the index: the entry is not even read
    calls.clear()
    missing = intake(CM, command("comment", case_id=f"CM-{tok}-2", text="t"))
    assert lookup(missing, get_entry, index.get) is None
    assert calls == []
    # a command by dedup key reads the key's entry
    assert lookup(intake(CM, command("comment", dedup_key="k1", text="t")), get_entry, index.get) is entries["k1"]


def test_target_case():
    w = World(CM)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    entry = w.key("k1")  # no open case; last case c1
    alert = intake(CM, trigger("k1"))
    by_key = intake(CM, command("comment", dedup_key="k1", text="t"))
    by_id = intake(CM, command("comment", case_id=c1, text="t"))
    assert target_case(alert, entry) is None  # alerts only ever target the open case
    assert target_case(by_key, entry)["case_id"] == c1  # commands fall back to the last case
    assert target_case(by_id, entry)["case_id"] == c1
    assert target_case(alert, None) is None and target_case(by_key, None) is None
    c2 = w.open_case("k1")
    entry = w.key("k1")
    assert target_case(alert, entry)["case_id"] == c2
    assert target_case(by_key, entry)["case_id"] == c2
    assert target_case(by_id, entry)["case_id"] == c1
    other = intake(CM, command("comment", case_id=make_case_id(CM, "k1", 9), text="t"))
    assert target_case(other, entry) is None


# --------------------------------------------------------------------------
# MemoryStage: the whole apply stage over dicts
# --------------------------------------------------------------------------


def test_in_memory_index_maps_created_cases_to_their_key():
    mem = MemoryStage(CM)
    d = mem.handle(intake(CM, trigger("svc/a", event_id="1")))
    c1 = d.created[0]
    assert mem.index == {c1: "svc/a"}
    mem.handle(intake(CM, trigger("svc/a", event_id="2")))          # dedup: no index write
    mem.handle(intake(CM, resolve("svc/a", event_id="3")))
    c2 = mem.handle(intake(CM, trigger("svc/a", event_id="4"))).created[0]
    c3 = mem.handle(intake(CM, trigger("svc/b", event_id="5"))).created[0]
    mem.handle(intake(CM, ack("nope", event_id="6")))               # rejected, brand-new key: remembered
    assert mem.index == {c1: "svc/a", c2: "svc/a", c3: "svc/b"}
    assert sorted(mem.entries) == ["nope", "svc/a", "svc/b"] and mem.entries["nope"]["cases"] == {}
    assert mem.entries["svc/a"]["seen"] == ["1", "2", "3", "4"]
    assert (mem.entries["svc/a"]["seq"], mem.entries["svc/a"]["open_case_id"]) == (2, c2)


def test_in_memory_command_by_case_id_goes_through_the_index():
    mem = MemoryStage(OC)
    cid = mem.handle(intake(OC, trigger("svc/a", event_id="1"))).created[0]
    d = mem.handle(intake(OC, command("assign", case_id=cid, assignee=BOB, event_id="2")))
    e = only_event(d, "Assigned")
    assert e["case_id"] == cid and e["dedup_key"] == "svc/a"
    assert mem.entries["svc/a"]["cases"][cid]["assignee"] == BOB
    assert mem.entries["svc/a"]["seen"] == ["1", "2"]
    # a well-formed id of the same key that was never created: unknown
    d = mem.handle(intake(OC, command("assign", case_id=make_case_id(OC, "svc/a", 2), assignee=BOB,
                                      event_id="3")))
    assert d.rejection.reason == UNKNOWN_CASE and d.entry is None
    # without the index the case is unknown, even though its key's entry exists
    del mem.index[cid]
    d = mem.handle(intake(OC, command("comment", case_id=cid, text="t", event_id="4")))
    assert d.rejection.reason == UNKNOWN_CASE and d.entry is None


def test_in_memory_remembers_offset_and_is_redelivery_only_for_same_offset():
    mem = MemoryStage(CM)
    it = intake(CM, trigger("k1", event_id="ev"))
    created = mem.handle(it, offset=41).events[0]
    entry = mem.entries["k1"]
    assert entry["recent"] == [["ev", [["domain-events", created["case_id"], created]], 41]]
    assert is_redelivery(entry, "ev", 41) is True
    assert is_redelivery(entry, "ev", 42) is False   # same id, another record: sent twice
    assert is_redelivery(entry, "ev", None) is False
    assert is_redelivery(entry, "other", 41) is False
    d = mem.handle(it, offset=42)
    assert d.duplicate is True and mem.entries["k1"] is entry  # no write at all
    # without an offset nothing is ever a redelivery
    mem.handle(intake(CM, trigger("k1", event_id="ev2")))
    assert is_redelivery(mem.entries["k1"], "ev2", None) is False
    # entries written before offsets were recorded ([id, outputs])
    old = dict(new_entry("k"), seen=["a"], recent=[["a", []]])
    assert is_redelivery(old, "a", 0) is False
    assert recorded_outputs(old, "a") == []


def test_is_redelivery_uses_the_latest_record_of_an_id():
    e = remember(remember(new_entry("k"), "a", [1], 5), "a", [2], 9)
    assert recorded_outputs(e, "a") == [2]
    assert is_redelivery(e, "a", 9) is True
    assert is_redelivery(e, "a", 5) is False


# --------------------------------------------------------------------------
# rejections are remembered when the key has an entry
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_rejection_for_known_key_is_remembered_then_duplicate(name):
    tenant = TENANTS[name]
    w = World(tenant)
    cid = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    before = w.key("k1")
    msg = ack("k1", event_id="late-ack")
    d = w.send(msg, offset=7)
    assert d.rejection is not None and d.rejection.reason == NO_OPEN_CASE
    assert d.entry is not None and d.entry["dedup_key"] == "k1"
    assert d.events == [] and d.created == []
    after = w.key("k1")
    assert after["seen"] == before["seen"] + ["late-ack"]
    (kind, key, record), = recorded_outputs(after, "late-ack")  # its dead letter, re-sent on a redelivery
    assert (kind, key, record["reason"], record["event_id"]) == ("dlq", "k1", NO_OPEN_CASE, "late-ack")
    assert after["recent"][-1] == ["late-ack", [[kind, key, record]], 7]
    assert {k: v for k, v in after.items() if k not in ("seen", "recent", "applied")} == \
        {k: v for k, v in before.items() if k not in ("seen", "recent", "applied")}
    assert after["applied"] == before["applied"] + 1  # one more input applied: a later state of the key
    assert is_redelivery(after, "late-ack", 7)
    again = w.send(msg, offset=8)
    assert again.duplicate is True and again.rejection is None
    # invalid transition on a known case: remembered too
    not_allowed = {"case-management": "IN_PROGRESS", "on-call": "TRIGGERED"}[name]  # from the final status
    bad = set_status(not_allowed, case_id=cid, event_id="bad")
    d = w.send(bad)
    assert d.rejection is not None and d.rejection.reason == INVALID_TRANSITION
    assert w.send(bad).duplicate is True


@pytest.mark.parametrize("msg", [ack("fresh", event_id="x"), resolve("fresh", event_id="x"),
                                 command("comment", dedup_key="fresh", text="t", event_id="x")],
                         ids=["ack", "resolve", "command"])
def test_rejection_for_brand_new_key_is_remembered(msg):
    """Else a crash redelivering it after a later trigger was stored would apply it to that case."""
    w = World(OC)
    d = w.send(msg)
    assert d.rejection is not None and d.rejection.reason in (NO_OPEN_CASE, UNKNOWN_CASE)
    assert w.send(msg).duplicate
    assert w.entries["fresh"]["cases"] == {} and w.index == {}
    created = w.send(trigger("fresh", event_id="t"))
    assert [e["type"] for e in created.events] == ["CaseCreated"]
    assert w.send(msg).duplicate  # redelivered after the trigger: still no effect


def test_noop_is_remembered_then_duplicate():
    w = World(CM)
    w.open_case("k1")
    only_event(w.send(ack("k1")), "StatusChanged")
    msg = ack("k1", event_id="second-ack")
    d = w.send(msg)
    assert d.noop is True and d.entry is not None
    assert "second-ack" in w.key("k1")["seen"]
    assert w.send(msg).duplicate is True


# --------------------------------------------------------------------------
# MAX_CASES_PER_KEY: oldest closed cases leave stream state
# --------------------------------------------------------------------------


def cycle(w: World, key: str, n: int) -> list[str]:
    """``n`` cases of ``key``, each resolved except the last."""
    ids = []
    for i in range(n):
        ids.append(w.open_case(key))
        if i < n - 1:
            only_event(w.send(resolve(key)), "StatusChanged")
    return ids


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_eviction_keeps_newest_open_and_latest(monkeypatch, name):
    monkeypatch.setattr(domain, "MAX_CASES_PER_KEY", 3)
    tenant = TENANTS[name]
    w = World(tenant)
    ids = cycle(w, "k1", 6)
    entry = w.key("k1")
    assert entry["seq"] == 6
    assert list(entry["cases"]) == ids[-3:]
    assert entry["open_case_id"] == entry["last_case_id"] == ids[-1]
    # the index is write-once: evicted ids still map to the key
    assert all(w.index[c] == "k1" for c in ids)
    # another key is not affected
    assert len(cycle(w, "k2", 2)) == 2 and len(w.key("k2")["cases"]) == 2
    # latest case resolved: still kept (it is the last one), and a new case still evicts the oldest
    only_event(w.send(resolve("k1")), "StatusChanged")
    c7 = w.open_case("k1")
    assert list(w.key("k1")["cases"]) == ids[-2:] + [c7]


def test_eviction_keeps_a_reopened_case_open(monkeypatch):
    monkeypatch.setattr(domain, "MAX_CASES_PER_KEY", 2)
    w = World(CM)
    c1, c2 = cycle(w, "k1", 2)
    only_event(w.send(resolve("k1")), "StatusChanged")
    only_event(w.send(set_status("OPEN", case_id=c1)), "StatusChanged")  # reopen the oldest
    entry = w.key("k1")
    assert (entry["open_case_id"], entry["last_case_id"]) == (c1, c2)
    assert only_event(w.send(trigger("k1")), "AlertDeduplicated")["case_id"] == c1
    assert list(w.key("k1")["cases"]) == [c1, c2]
    only_event(w.send(resolve("k1")), "StatusChanged")
    c3 = w.open_case("k1")
    assert list(w.key("k1")["cases"]) == [c2, c3]  # c1 was the oldest by creation


def test_evict_never_drops_open_or_last_case(monkeypatch):
    monkeypatch.setattr(domain, "MAX_CASES_PER_KEY", 1)
    a, b, c = (make_case_id(OC, "k", n) for n in (1, 2, 3))
    entry = dict(new_entry("k"), open_case_id=a, last_case_id=c, cases={
        a: {"case_id": a, "created_at": 1}, b: {"case_id": b, "created_at": 2},
        c: {"case_id": c, "created_at": 3}})
    domain._evict(entry)
    assert sorted(entry["cases"]) == sorted([a, c])  # over the limit rather than losing them


def test_eviction_does_not_mutate_the_input_entry(monkeypatch):
    monkeypatch.setattr(domain, "MAX_CASES_PER_KEY", 2)
    w = World(OC)
    cycle(w, "k1", 2)
    only_event(w.send(resolve("k1")), "StatusChanged")
    entry = w.key("k1")
    entry0 = copy.deepcopy(entry)
    d = decide(OC, intake(OC, trigger("k1", event_id="new")), entry)
    assert len(d.entry["cases"]) == 2 and len(entry["cases"]) == 2
    assert entry == entry0


@pytest.mark.parametrize("name", TENANT_NAMES)
def test_command_on_evicted_case_is_unknown_case_naming_the_limit(monkeypatch, name):
    monkeypatch.setattr(domain, "MAX_CASES_PER_KEY", 2)
    tenant = TENANTS[name]
    w = World(tenant)
    ids = cycle(w, "k1", 4)
    evicted, kept = ids[0], ids[-2]
    assert w.case(evicted) is None and w.case(kept) is not None
    msg = command("comment", case_id=evicted, text="too late", event_id="late")
    d = w.send(msg)
    assert d.rejection is not None and d.rejection.reason == UNKNOWN_CASE
    assert evicted in d.rejection.detail
    assert "last 2 cases" in d.rejection.detail
    assert d.events == [] and d.cases == {}
    # the key has an entry: the rejection is remembered
    assert d.entry is not None and "late" in w.key("k1")["seen"]
    assert w.send(msg).duplicate is True
    # kept cases still take commands
    only_event(w.send(command("comment", case_id=kept, text="ok")), "CommentAdded")
    # an id that was never created does not blame the limit
    d = w.send(command("comment", case_id=make_case_id(tenant, "k1", 99), text="x"))
    assert d.rejection.reason == UNKNOWN_CASE and "last 2 cases" not in d.rejection.detail


def test_eviction_keeps_the_last_cases_even_with_backdated_timestamps(monkeypatch):
    monkeypatch.setattr(domain, "MAX_CASES_PER_KEY", 2)
    w = World(CM)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    c2 = w.open_case("k1", timestamp="2020-01-01T00:00:00Z")  # a late-arriving, backdated alert
    only_event(w.send(resolve("k1")), "StatusChanged")
    c3 = w.open_case("k1")
    kept = set(w.key("k1")["cases"])
    assert kept == {c2, c3}, f"kept {sorted(kept)}, not the last two (the oldest is {c1})"


def test_the_apply_agent_flushes_before_a_state_forgets_unsent_outputs():
    """A busy key: more inputs than RECENT_LIMIT since the last flush (in one batch or several)."""
    from streams.stage.apply import UnflushedOutputs
    from streams.domain.cases import RECENT_LIMIT

    u = UnflushedOutputs(RECENT_LIMIT)
    assert not u.add({"a": RECENT_LIMIT, "b": 3})          # every output still re-sendable from the state
    assert u.add({"a": 1})                                  # the next one would push an unsent one out
    u.clear()
    assert not u.add({"a": RECENT_LIMIT})
    assert UnflushedOutputs(RECENT_LIMIT).add({"a": 500})   # one batch of 500 inputs of one key


def test_remember_keeps_recent_outputs_within_a_byte_budget():
    """Large outputs: fewer inputs keep theirs (the newest always), so the entry stays one writable record."""
    from streams.domain.cases import RECENT_BYTES

    big = [["domain-events", "c", {"custom_details": {"pad": "z" * (RECENT_BYTES // 3)}}]]
    ks = new_entry("k")
    for i in range(5):
        ks = remember(ks, f"big-{i}", big)
    assert [item[0] for item in ks["recent"]] == ["big-3", "big-4"] and already_seen(ks, "big-0")
    assert len(orjson.dumps(ks["recent"])) <= RECENT_BYTES
    huge = [["domain-events", "c", {"custom_details": {"pad": "z" * RECENT_BYTES}}]]
    assert [item[0] for item in remember(ks, "huge", huge)["recent"]] == ["huge"]
    assert [item[0] for item in remember(ks, "small", [])["recent"]] == ["big-3", "big-4", "small"]


def test_the_apply_agent_flushes_before_large_outputs_push_unsent_ones_out():
    """A state that keeps the outputs of fewer inputs than were applied since the last flush: flush first."""
    from streams.stage.apply import UnflushedOutputs
    from streams.domain.cases import RECENT_LIMIT

    u = UnflushedOutputs(RECENT_LIMIT)
    assert not u.add({"a": 2, "b": 1}, {"a": 2, "b": 64})
    assert u.add({"a": 1}, {"a": 2})                    # three unsent inputs, two kept: the first would be lost
    u.clear()
    assert not u.add({"a": 1}, {"a": 1}) and u.kept == {"a": 1}
