"""The case schema, written once (streams/domain/case_schema.py), and the event types, listed once
(streams/domain/event_types.py): what is derived from them is what was written out by hand before
(the literals below are the hand-written values they replaced), and the lists agree with
schemas/avro/ and the PostgreSQL migrations."""

from __future__ import annotations

import re

import orjson
import pytest

from helpers import TENANTS, World, command, oncall_scenario
from sinks.elasticsearch import MAPPING, STORED_STATE, document, stored_state
from sinks.postgres import CASE_COLUMNS, migrations
from streams.config import PROJECT_ROOT
from streams.domain import case_schema, event_types
from streams.domain.cases import EVENT_TYPES, ONCALL_DEFAULTS, STATE_FIELDS, apply, compact, replay

# --------------------------------------------------------------------------
# the values as they were written out by hand
# --------------------------------------------------------------------------

KEYWORD = {"type": "keyword"}
DATE = {"type": "date", "format": "epoch_millis"}
ES_PROPERTIES = {
    "case_id": KEYWORD, "tenant": KEYWORD, "dedup_key": KEYWORD, "status": KEYWORD,
    "case_type": KEYWORD, "work_type": KEYWORD, "severity": KEYWORD, "priority": KEYWORD,
    "urgency": KEYWORD, "source": KEYWORD, "project": KEYWORD, "component": KEYWORD,
    "group": KEYWORD, "class": KEYWORD, "tags": KEYWORD, "assignee_id": KEYWORD,
    "summary": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 1024}}},
    "created_at": DATE, "updated_at": DATE, "last_seen_at": DATE, "status_changed_at": DATE,
    "acknowledged_at": DATE, "resolved_at": DATE,
    "occurrence_count": {"type": "long"}, "comment_count": {"type": "long"}, "version": {"type": "long"},
    "time_to_acknowledge_seconds": {"type": "double"}, "time_to_resolve_seconds": {"type": "double"},
    "escalation_policy_id": KEYWORD, "escalation_policy_step_id": KEYWORD,
    "escalation_policy_retry_count": {"type": "long"}, "escalation_active": {"type": "boolean"},
    "is_shadow": {"type": "boolean"}, "targets": KEYWORD, "responder_users": KEYWORD,
    "responders_added_at": DATE, "time_to_first_acknowledge": {"type": "long"}, "sla_breaches": KEYWORD,
}
ES_FIELDS = ("case_id", "tenant", "dedup_key", "status", "case_type", "work_type", "severity", "priority",
             "urgency", "source", "project", "component", "group", "class", "tags", "summary", "created_at",
             "updated_at", "last_seen_at", "status_changed_at", "acknowledged_at", "resolved_at",
             "occurrence_count", "comment_count", "version",
             "escalation_policy_id", "escalation_policy_step_id", "responders_added_at")
PG_COLUMNS = (
    "case_id", "tenant", "dedup_key", "status", "case_type", "work_type", "summary", "source", "severity",
    "priority", "urgency", "project", "component", "group", "class", "tags", "links", "custom_details",
    "assignee", "occurrence_count", "comment_count", "created_at", "updated_at", "last_seen_at",
    "status_changed_at", "acknowledged_at", "resolved_at", "version",
    "escalation_policy_id", "escalation_policy_step_id", "escalation_policy_retry_count", "escalation_active",
    "is_shadow", "targets", "responder_users", "responders", "responders_added_at",
    "time_to_first_acknowledge_ms", "sla_breaches",
)
OLD_STATE_FIELDS = (
    "case_id", "tenant", "dedup_key", "status", "case_type", "work_type", "severity", "summary",
    "priority", "urgency", "source", "project", "component", "group", "class", "tags",
    "created_at", "last_seen_at", "status_changed_at", "acknowledged_at", "resolved_at",
    "occurrence_count", "assignee", "comment_count", "version", "updated_at",
    "escalation_policy_id", "escalation_policy_step_id", "escalation_policy_retry_count",
    "escalation_active", "is_shadow", "responder_users", "sla_breaches")
OLD_CASE_FIELDS = ("summary", "source", "severity", "component", "group", "class", "custom_details",
                   "links", "project", "priority", "tags", "urgency")
OLD_ONCALL_DEFAULTS = {
    "escalation_policy_id": None, "escalation_policy_step_id": None, "escalation_policy_retry_count": 0,
    "escalation_active": False, "is_shadow": False, "targets": [], "responder_users": [], "responders": [],
    "responders_added_at": None, "time_to_first_acknowledge": None, "sla_breaches": [],
}
OLD_EVENT_TYPES = ("CaseCreated", "AlertDeduplicated", "StatusChanged", "Assigned", "CommentAdded",
                   "PriorityChanged", "EscalationStepStarted", "RespondersAdded", "NotificationRequested",
                   "EscalationEnded", "AcknowledgeTimedOut", "SlaBreached", "AutomationApplied",
                   "NotificationDelivered", "NotificationFailed", "EndpointDisabled")


def test_the_mapping_is_the_hand_written_one_and_the_stored_state():
    assert MAPPING == {"dynamic": "strict",
                       "properties": {**ES_PROPERTIES, STORED_STATE: {"type": "object", "enabled": False}}}


def test_the_document_allowlist_is_the_hand_written_one():
    computed = {"assignee_id", "time_to_acknowledge_seconds", "time_to_resolve_seconds"}
    extras = {"tags", "escalation_policy_retry_count", "escalation_active", "is_shadow", "targets",
              "responder_users", "sla_breaches", "time_to_first_acknowledge"}   # set apart, with a default
    w = World(TENANTS["on-call"])
    case = replay(w.tenant, w.events_of(w.open_case("k")))
    assert set(document(case)) == set(ES_FIELDS) | computed | extras | {STORED_STATE}
    assert {f.name for f in case_schema.SEARCH_FIELDS} == computed


def test_the_postgres_columns_are_the_hand_written_ones():
    assert sorted(CASE_COLUMNS) == sorted(PG_COLUMNS) and len(set(CASE_COLUMNS)) == len(CASE_COLUMNS)


def _migration_columns() -> tuple[set[str], set[str]]:
    sql = {name: text for _, name, text in migrations()}
    create = re.search(r"CREATE TABLE cases \((.*?)\n\);", sql["0001_projection.sql"], re.S).group(1)
    first = {line.split()[0].strip('"') for line in create.strip().splitlines()}
    added = set(re.findall(r"ADD COLUMN (\w+)", sql["0002_oncall.sql"]))
    return first, added


def test_the_postgres_columns_are_the_migrations_columns():
    first, added = _migration_columns()
    assert {f.column_name for f in case_schema.FIELDS if f.postgres and not f.oncall} == first
    assert {f.column_name for f in case_schema.FIELDS if f.postgres and f.oncall} == added


def test_state_fields_intake_fields_and_oncall_defaults_are_the_hand_written_ones():
    assert sorted(STATE_FIELDS) == sorted(OLD_STATE_FIELDS) and len(set(STATE_FIELDS)) == len(STATE_FIELDS)
    assert case_schema.INTAKE_FIELDS == OLD_CASE_FIELDS    # the order CaseCreated carries them in
    assert list(ONCALL_DEFAULTS.items()) == list(OLD_ONCALL_DEFAULTS.items())


def test_event_types_are_the_hand_written_ones():
    assert EVENT_TYPES == OLD_EVENT_TYPES


@pytest.mark.parametrize("tenant", sorted(TENANTS))
def test_a_new_case_is_what_apply_built_by_hand(tenant):
    t = TENANTS[tenant]
    w = World(t)
    created = w.events_of(w.open_case("k"))[0]
    at = created["occurred_at"]
    by_hand = {
        "case_id": created["case_id"], "tenant": created["tenant"], "dedup_key": created["dedup_key"],
        "status": created["status"], "case_type": created["case_type"], "work_type": created["work_type"],
        **{f: created.get(f) for f in OLD_CASE_FIELDS},
        "created_at": at, "last_seen_at": at, "status_changed_at": at,
        "acknowledged_at": None, "resolved_at": None,
        "occurrence_count": 1, "assignee": None, "comment_count": 0,
        **{k: (list(v) if isinstance(v, list) else v) for k, v in OLD_ONCALL_DEFAULTS.items()},
        "version": created["version"], "updated_at": at,
    }
    case = apply(t, None, created)
    assert list(case.items()) == list(by_hand.items())   # the same fields, in the same order
    assert case["targets"] is not ONCALL_DEFAULTS["targets"]   # a fresh list, not the default itself


# --------------------------------------------------------------------------
# personal data
# --------------------------------------------------------------------------


def test_personal_fields_are_in_no_index_mapping():
    personal = set(case_schema.PERSONAL_FIELDS)
    assert personal == {"assignee", "responders"}
    assert not personal & set(MAPPING["properties"])
    assert all(case_schema.BY_NAME[f].index is None for f in personal)
    assert all(case_schema.BY_NAME[f].type in (case_schema.PERSON, case_schema.PEOPLE) for f in personal)


@pytest.mark.parametrize("tenant", sorted(TENANTS))
def test_the_stored_state_has_no_names_no_emails_no_payloads(tenant):
    w = World(TENANTS[tenant])
    events = oncall_scenario(w)
    cid = events[0]["case_id"]
    d = w.send(command("assign", case_id=cid,
                       assignee={"id": "u-zed", "name": "Zed Private", "email": "zed@example.com"}))
    assert d.rejection is None and d.events
    case = replay(w.tenant, w.events_of(cid))
    assert case["assignee"]["name"] == "Zed Private" and case["responders"][0]["email"]
    state = document(case)[STORED_STATE]
    flat = orjson.dumps(state).decode()
    assert "@example.com" not in flat and "Private" not in flat and '"name"' not in flat
    assert state["assignee"] == {"id": "u-zed"}
    assert [p["id"] for p in state["responders"]] == case["responder_users"]
    assert not {f.name for f in case_schema.FIELDS if f.payload} & set(state)
    # later events fold onto the stored state as onto the full one
    assert document(stored_state(orjson.loads(orjson.dumps(document(case))))) == document(case)


# --------------------------------------------------------------------------
# event types
# --------------------------------------------------------------------------


def _avro_files() -> dict[str, list[str]]:
    """Event type -> its schema files in schemas/avro/ (named <type>.v<N>.avsc, record name = type)."""
    out: dict[str, list[str]] = {}
    for path in sorted((PROJECT_ROOT / "schemas" / "avro").glob("*.avsc")):
        m = re.fullmatch(r"(\w+)\.v(\d+)\.avsc", path.name)
        assert m, f"{path.name}: schema files are named <EventType>.v<N>.avsc"
        assert orjson.loads(path.read_bytes())["name"] == m.group(1), path.name
        out.setdefault(m.group(1), []).append(path.name)
    return out


def test_every_event_type_has_its_avro_schema_and_every_schema_its_type():
    files = _avro_files()
    assert sorted(files) == sorted(EVENT_TYPES)


def test_case_created_carries_every_field_a_trigger_sets():
    latest = max(_avro_files()[event_types.CREATED], key=lambda name: int(name.split(".v")[1].split(".")[0]))
    fields = {f["name"] for f in orjson.loads((PROJECT_ROOT / "schemas" / "avro" / latest).read_bytes())["fields"]}
    assert set(case_schema.INTAKE_FIELDS) <= fields
    assert {f.name for f in case_schema.FIELDS if f.init == case_schema.EVENT} <= fields


def test_every_event_type_folds_and_is_described():
    from test_codec import all_events

    for tenant in TENANTS.values():
        events = all_events(tenant)
        states: dict[str, dict | None] = {}
        for e in events:
            states[e["case_id"]] = apply(tenant, states.get(e["case_id"]), e)
            kind = event_types.BY_NAME[e["type"]]
            assert (event_types.describe(e) != "") == (kind.describe is not None), e["type"]
        assert {e["type"] for e in events} == set(EVENT_TYPES)
        assert all(set(compact(s)) == set(STATE_FIELDS) for s in states.values())


def test_an_unknown_event_type_is_refused():
    w = World(TENANTS["on-call"])
    created = w.events_of(w.open_case("k"))[0]
    case = apply(w.tenant, None, created)
    with pytest.raises(ValueError, match="unknown event type 'Nope'"):
        apply(w.tenant, case, dict(created, type="Nope", version=2))
    with pytest.raises(ValueError, match="Nope before CaseCreated"):
        apply(w.tenant, None, dict(created, type="Nope", version=2))
