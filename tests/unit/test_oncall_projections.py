"""The on-call properties in the projections: the search document (an
allowlist, people by id only) and the PostgreSQL case row (full records)."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest

from helpers import ALICE, BOB, CAROL, OC, TENANTS, World, emit, oncall_scenario
from sinks.elasticsearch import MAPPING, document, state_from_document
from sinks.postgres import CASE_COLUMNS, case_row, migrations
from streams.domain import case_schema
from streams.domain.cases import ONCALL_DEFAULTS, apply, replay

SECRETS = ("Alice Doe", "alice@example.com", "Bob Roe", "bob@example.com")
# the document fields this change added (an index created before lacks them)
ONCALL_DOC_FIELDS = {"escalation_policy_id": "keyword", "escalation_policy_step_id": "keyword",
                     "escalation_policy_retry_count": "long", "escalation_active": "boolean",
                     "is_shadow": "boolean", "targets": "keyword", "responder_users": "keyword",
                     "responders_added_at": "date", "time_to_first_acknowledge": "long", "sla_breaches": "keyword"}


def scenario(tenant=OC) -> tuple[World, list[dict], dict]:
    """The on-call scenario's events and the folded state of its page."""
    w = World(tenant)
    events = oncall_scenario(w)
    cid = events[0]["case_id"]
    evs = [e for e in events if e["case_id"] == cid]
    return w, evs, replay(tenant, evs)


@pytest.fixture(params=sorted(TENANTS))
def page(request):
    return scenario(TENANTS[request.param])


def test_document_is_an_allowlist_without_names_or_emails(page):
    _, _, case = page
    assert case["responders"] == [ALICE, CAROL, BOB]  # the state has the full records ...
    doc = document(case)
    flat = orjson.dumps(doc).decode()
    for secret in SECRETS:  # ... the document has none of them
        assert secret not in flat
    assert "responders" not in doc and "name" not in flat and "email" not in flat
    assert doc["responder_users"] == ["u-alice", "u-carol", "u-bob"]
    assert doc["targets"] == ["user:u-alice", "schedule:sch-primary", "team:team-db"]
    assert (doc["escalation_policy_id"], doc["escalation_policy_step_id"], doc["escalation_policy_retry_count"],
            doc["escalation_active"], doc["is_shadow"], doc["sla_breaches"]) == (
        "ep-db", "ep-db-s1", 0, False, False, ["resolution"])
    assert doc["responders_added_at"] == case["responders_added_at"]
    assert doc["time_to_first_acknowledge"] == case["acknowledged_at"] - case["created_at"] > 0


def test_document_fields_are_all_mapped(page):
    """The mapping is strict: a document field it does not know is rejected."""
    assert set(document(page[2])) == set(MAPPING["properties"])
    assert {f: MAPPING["properties"][f]["type"] for f in ONCALL_DOC_FIELDS} == ONCALL_DOC_FIELDS
    assert MAPPING["properties"]["responders_added_at"]["format"] == "epoch_millis"


def test_document_of_a_case_without_policy_has_the_defaults():
    w = World(OC)
    cid = w.open_case("plain")
    doc = document(replay(OC, w.events_of(cid)))
    assert (doc["escalation_policy_id"], doc["escalation_policy_retry_count"], doc["escalation_active"],
            doc["is_shadow"], doc["targets"], doc["responder_users"], doc["sla_breaches"],
            doc["responders_added_at"], doc["time_to_first_acknowledge"]) == (
        None, 0, False, False, [], [], [], None, None)


def test_state_from_document_round_trip_and_later_events(page):
    w, evs, case = page
    state = state_from_document(orjson.loads(orjson.dumps(document(case))))  # as stored and read back
    assert state["targets"] == case["targets"]
    assert state["responders"] == [{"id": p["id"], "name": None, "email": None} for p in case["responders"]]
    for f in ("responder_users", "escalation_policy_id", "escalation_policy_step_id", "escalation_active",
              "is_shadow", "sla_breaches", "responders_added_at", "time_to_first_acknowledge", "version"):
        assert state[f] == case[f], f
    # later events fold onto the rebuilt state as onto the real one
    cid = case["case_id"]
    dana = {"id": "u-dana", "name": "Dana Poe", "email": "dana@example.com"}
    later = [emit(w, cid, "RespondersAdded", escalation_policy_step_id="ep-db-s2", responders=[BOB, dana]),
             emit(w, cid, "EscalationStepStarted", escalation_policy_id="ep-db", escalation_policy_step_id="ep-db-s2",
                  step_index=1, escalation_policy_retry_count=1, urgency="high", is_shadow=False,
                  targets=[{"kind": "team", "id": "team:with:colons"}], next_escalation_at=None),
             emit(w, cid, "SlaBreached", sla="first_response", priority="P2", due_at=case["created_at"])]
    full, rebuilt = case, state
    for e in later:
        full, rebuilt = apply(OC, full, e), apply(OC, rebuilt, e)
    assert document(rebuilt) == document(full)
    assert rebuilt["responder_users"] == ["u-alice", "u-carol", "u-bob", "u-dana"]
    assert rebuilt["responders"][-1] == dana  # a new responder's record, as the event carries it
    assert document(rebuilt)["targets"] == ["team:team:with:colons"]
    assert state_from_document(document(rebuilt))["targets"] == [{"kind": "team", "id": "team:with:colons"}]
    assert "Dana Poe" not in orjson.dumps(document(rebuilt)).decode()


def test_state_from_a_document_indexed_before_the_oncall_fields():
    w = World(OC)
    cid = w.open_case("old")
    w.send({"action": "acknowledge", "dedup_key": "old"})
    case = replay(OC, w.events_of(cid))
    old_doc = {k: v for k, v in document(case).items() if k not in ONCALL_DOC_FIELDS}
    state = state_from_document(old_doc)
    e = emit(w, cid, "RespondersAdded", escalation_policy_step_id=None, responders=[ALICE])
    after = apply(OC, state, e)
    assert after["responder_users"] == ["u-alice"]
    assert document(after) == document(apply(OC, case, e))  # as if the case had been indexed with them
    assert document(after)["time_to_first_acknowledge"] == 1000


# --------------------------------------------------------------------------
# PostgreSQL case rows
# --------------------------------------------------------------------------


def _row(case: dict) -> dict:
    return dict(zip(CASE_COLUMNS, case_row(case)))


def test_case_row_has_the_oncall_columns_with_full_responders(page):
    _, _, case = page
    row = _row(case)
    assert orjson.loads(row["responders"]) == [ALICE, CAROL, BOB]  # names and emails kept
    assert row["responder_users"] == ["u-alice", "u-carol", "u-bob"]
    assert orjson.loads(row["targets"]) == case["targets"]
    assert (row["escalation_policy_id"], row["escalation_policy_step_id"], row["escalation_policy_retry_count"],
            row["escalation_active"], row["is_shadow"], row["sla_breaches"]) == (
        "ep-db", "ep-db-s1", 0, False, False, ["resolution"])
    assert row["responders_added_at"] == datetime.fromtimestamp(case["responders_added_at"] / 1000, timezone.utc)
    assert row["time_to_first_acknowledge_ms"] == case["acknowledged_at"] - case["created_at"]


def test_case_row_of_an_old_state_fills_not_null_defaults():
    w = World(OC)
    cid = w.open_case("old")
    w.send({"action": "acknowledge", "dedup_key": "old"})
    state = {k: v for k, v in replay(OC, w.events_of(cid)).items()
             if k not in ONCALL_DEFAULTS}  # folded before the on-call fields existed
    row = _row(state)
    assert (row["escalation_policy_retry_count"], row["escalation_active"], row["is_shadow"], row["targets"],
            row["responders"], row["responder_users"], row["sla_breaches"]) == (0, False, False, "[]", "[]", [], [])
    assert row["time_to_first_acknowledge_ms"] == state["acknowledged_at"] - state["created_at"] == 1000


def test_oncall_migration_is_a_new_version():
    found = migrations()
    assert [(v, name) for v, name, _ in found][:2] == [(1, "0001_projection.sql"), (2, "0002_oncall.sql")]
    sql = dict((name, text) for _, name, text in found)["0002_oncall.sql"]
    for col in (f.column_name for f in case_schema.FIELDS if f.postgres and f.oncall):
        assert f"ADD COLUMN {col} " in sql, col
