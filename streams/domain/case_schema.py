"""The shape of a case, written once: every field of the folded case state. Pure.

``FIELDS`` lists each field of a case (what ``cases.apply`` folds), in the
order a case dict has them, with:

* ``type``: what its value is (``STR``, ``INT``, ``BOOL``, ``TIME`` epoch ms,
  ``STRS`` a list of strings, ``JSON`` free-form, ``PERSON``/``PEOPLE``
  ``{id, name, email}`` records, ``TARGETS`` ``{kind, id}`` records);
* ``init``: how ``CaseCreated`` sets it (``EVENT``: copied from the event,
  ``INTAKE``: a trigger's field the event carries, ``TIME``: the event time,
  ``DEFAULT``: ``default``);
* ``state``: kept in stream state (what decisions read; never payloads);
* ``index``: how the search index maps it (``KEYWORD``, ``TEXT``, ``DATE``,
  ``LONG``, ``DOUBLE``, ``BOOLEAN``; None: not searchable);
* ``postgres``/``column``: a column of PostgreSQL's ``cases`` table (and its
  name, when not the field's);
* ``personal``: names and e-mails: PostgreSQL only, never in the search
  index (its stored state keeps the people by id);
* ``payload``: free-form and up to 512 KiB: neither in stream state nor in
  the search index;
* ``oncall``: an on-call property (PostgreSQL migration 0002): a state
  folded before these existed lacks it, and :func:`with_defaults` fills it.

From the registry: :data:`STATE_FIELDS`, :data:`INTAKE_FIELDS`,
:data:`ONCALL_DEFAULTS`, :func:`new_case`, :func:`with_defaults` (the one
back-fill), :func:`index_state`; the search index's computed fields are
:data:`SEARCH_FIELDS`. The Elasticsearch mapping and document
(``sinks/elasticsearch.py``) and the PostgreSQL columns
(``sinks/postgres.py``) are derived from these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# value types
STR, INT, BOOL, TIME, STRS, JSON, PERSON, PEOPLE, TARGETS = (
    "str", "int", "bool", "time", "strs", "json", "person", "people", "targets")
# how CaseCreated sets a field
EVENT, INTAKE, DEFAULT = "event", "intake", "default"   # and TIME: the event time
# how the search index maps a field
KEYWORD, TEXT, DATE, LONG, DOUBLE, BOOLEAN = "keyword", "text", "date", "long", "double", "boolean"

# the search document's field holding the stored state (an object the index keeps, never searchable)
STORED_STATE = "state"


@dataclass(frozen=True)
class CaseField:
    name: str
    type: str
    init: str = DEFAULT
    default: object = None
    state: bool = False
    index: str | None = None
    postgres: bool = True
    column: str | None = None      # the PostgreSQL column, when not ``name``
    personal: bool = False
    payload: bool = False
    oncall: bool = False

    @property
    def column_name(self) -> str:
        return self.column or self.name

    def initial(self):
        """The default, a fresh copy of it for a list."""
        return list(self.default) if isinstance(self.default, list) else self.default


def _f(name: str, type: str, **kw) -> CaseField:
    return CaseField(name, type, **kw)


FIELDS: tuple[CaseField, ...] = (
    # what the case is
    _f("case_id", STR, init=EVENT, state=True, index=KEYWORD),
    _f("tenant", STR, init=EVENT, state=True, index=KEYWORD),
    _f("dedup_key", STR, init=EVENT, state=True, index=KEYWORD),
    _f("status", STR, init=EVENT, state=True, index=KEYWORD),
    _f("case_type", STR, init=EVENT, state=True, index=KEYWORD),
    _f("work_type", STR, init=EVENT, state=True, index=KEYWORD),
    # what the trigger said (CaseCreated carries these, in this order)
    _f("summary", STR, init=INTAKE, state=True, index=TEXT),
    _f("source", STR, init=INTAKE, state=True, index=KEYWORD),
    _f("severity", STR, init=INTAKE, state=True, index=KEYWORD),
    _f("component", STR, init=INTAKE, state=True, index=KEYWORD),
    _f("group", STR, init=INTAKE, state=True, index=KEYWORD),
    _f("class", STR, init=INTAKE, state=True, index=KEYWORD),
    _f("custom_details", JSON, init=INTAKE, payload=True),
    _f("links", JSON, init=INTAKE, payload=True),
    _f("project", STR, init=INTAKE, state=True, index=KEYWORD),
    _f("priority", STR, init=INTAKE, state=True, index=KEYWORD),
    _f("tags", STRS, init=INTAKE, state=True, index=KEYWORD),
    _f("urgency", STR, init=INTAKE, state=True, index=KEYWORD),
    # what happened since
    _f("created_at", TIME, init=TIME, state=True, index=DATE),
    _f("last_seen_at", TIME, init=TIME, state=True, index=DATE),
    _f("status_changed_at", TIME, init=TIME, state=True, index=DATE),
    _f("acknowledged_at", TIME, state=True, index=DATE),
    _f("resolved_at", TIME, state=True, index=DATE),
    _f("occurrence_count", INT, default=1, state=True, index=LONG),
    _f("assignee", PERSON, state=True, personal=True),   # searchable by id: assignee_id (SEARCH_FIELDS)
    _f("comment_count", INT, default=0, state=True, index=LONG),
    # on-call properties (the seed's OnCallProperties), folded from the escalation events
    _f("escalation_policy_id", STR, state=True, index=KEYWORD, oncall=True),
    _f("escalation_policy_step_id", STR, state=True, index=KEYWORD, oncall=True),
    _f("escalation_policy_retry_count", INT, default=0, state=True, index=LONG, oncall=True),
    _f("escalation_active", BOOL, default=False, state=True, index=BOOLEAN, oncall=True),
    _f("is_shadow", BOOL, default=False, state=True, index=BOOLEAN, oncall=True),
    _f("targets", TARGETS, default=[], index=KEYWORD, oncall=True),   # indexed as "kind:id"
    _f("responder_users", STRS, default=[], state=True, index=KEYWORD, oncall=True),
    _f("responders", PEOPLE, default=[], personal=True, oncall=True),  # searchable by id: responder_users
    _f("responders_added_at", TIME, index=DATE, oncall=True),
    _f("time_to_first_acknowledge", INT, index=LONG, column="time_to_first_acknowledge_ms", oncall=True),  # ms
    _f("sla_breaches", STRS, default=[], state=True, index=KEYWORD, oncall=True),
    # set by every event
    _f("version", INT, init=EVENT, state=True, index=LONG),
    _f("updated_at", TIME, init=TIME, state=True, index=DATE),
)
BY_NAME = {f.name: f for f in FIELDS}

# What stream state keeps of a case: what decisions need, never payloads (custom_details can be
# 512 KiB; the summary, ≤ 1 KiB, is kept for notifications; responder names stay out). The full case
# is the projections' job.
STATE_FIELDS = tuple(f.name for f in FIELDS if f.state)
# The fields a trigger sets, carried by CaseCreated.
INTAKE_FIELDS = tuple(f.name for f in FIELDS if f.init == INTAKE)
# The page's on-call properties and their values before any escalation (a case without a policy keeps them).
ONCALL_DEFAULTS = {f.name: f.default for f in FIELDS if f.oncall}
PERSONAL_FIELDS = tuple(f.name for f in FIELDS if f.personal)
_ONCALL = tuple(f for f in FIELDS if f.oncall)
_NOT_PAYLOAD = tuple(f for f in FIELDS if not f.payload)


def new_case(event: dict) -> dict:
    """The case a ``CaseCreated`` opens."""
    at = event["occurred_at"]
    case = {}
    for f in FIELDS:
        if f.init == EVENT:
            case[f.name] = event[f.name]
        elif f.init == INTAKE:
            case[f.name] = event.get(f.name)
        elif f.init == TIME:
            case[f.name] = at
        else:
            case[f.name] = f.initial()
    return case


def with_defaults(case: dict) -> dict:
    """``case`` with what a case folded before the on-call properties existed lacks: their
    defaults, and ``time_to_first_acknowledge`` as ``apply`` computes it at the first acknowledge."""
    out = dict(case)
    for f in _ONCALL:
        if out.get(f.name) is None:
            out[f.name] = f.initial()
    if out.get("time_to_first_acknowledge") is None and out.get("acknowledged_at") is not None \
            and out.get("created_at") is not None:
        out["time_to_first_acknowledge"] = out["acknowledged_at"] - out["created_at"]  # ms
    return out


def _by_id(f: CaseField, value):
    """A personal field's value with people by id only (no names, no e-mails)."""
    if value is None:
        return None
    if f.type == PERSON:
        return {"id": value.get("id")}
    return [{"id": p.get("id")} for p in value]


def index_state(case: dict) -> dict:
    """What the search index stores of a case to fold later events onto: every field but
    payloads, people by id only."""
    return {f.name: (_by_id(f, case.get(f.name)) if f.personal else case.get(f.name))
            for f in _NOT_PAYLOAD}


# --------------------------------------------------------------------------
# the search index's computed fields (never part of a case)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchField:
    name: str
    index: str
    of: Callable[[dict], object]   # its value, from the case


def _seconds_between(start: str, end: str) -> Callable[[dict], float | None]:
    def of(case: dict) -> float | None:
        a, b = case.get(start), case.get(end)
        return (b - a) / 1000 if a is not None and b is not None else None
    return of


SEARCH_FIELDS: tuple[SearchField, ...] = (
    SearchField("assignee_id", KEYWORD, lambda case: (case.get("assignee") or {}).get("id")),
    SearchField("time_to_acknowledge_seconds", DOUBLE, _seconds_between("created_at", "acknowledged_at")),
    SearchField("time_to_resolve_seconds", DOUBLE, _seconds_between("created_at", "resolved_at")),
)
