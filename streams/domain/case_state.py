"""The state of a dedup key and its cases: the entry, what it remembers, and the fold.

Pure functions over plain dicts (the shapes stored in the Faust tables):

* ``apply(tenant, case, event)`` -> case: the event-sourced fold. A case is a
  pure function of its domain events, so projections can rebuild it by replay.
* the entry of a dedup key (``new_entry``, ``compact``, ``lookup``) and what it
  remembers of the intake ids it has seen (``already_seen``, ``remember``,
  ``recorded_outputs``, ``is_redelivery``);
* :class:`Decision`, what a decision returns, and :class:`Builder`, which emits
  a case's events and folds them as it goes.

The decisions themselves live in ``cases`` (the case changes), ``oncall``
(paging, timers, automation) and ``notify`` (notification requests); all
three build on this module, which imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import orjson

from streams.config import Tenant
from streams.domain import case_schema, event_types
from streams.domain.intake import Intake, Rejection, derive_id

SEEN_LIMIT = 1024       # intake ids remembered per dedup key
RECENT_LIMIT = 64       # of those, how many keep their outputs for re-sending
# ... and fewer while their outputs take more than this (the newest input's are always kept): a key's
# entry is one changelog record, at most streams.config.MAX_RECORD_BYTES (4 MiB); the outputs of one
# input reach ~1.3 MiB (a CaseCreated with 512 KiB of custom_details, a dead letter of a 512 KiB message)
RECENT_BYTES = 2 * 1024 * 1024
MAX_CASES_PER_KEY = 50  # cases of a key kept in stream state (oldest closed ones go first)

# the event types (streams/domain/event_types.py) and the case fields (streams/domain/case_schema.py)
EVENT_TYPES = event_types.NAMES
STATE_FIELDS = case_schema.STATE_FIELDS
ONCALL_DEFAULTS = case_schema.ONCALL_DEFAULTS


@dataclass
class Decision:
    events: list[dict] = field(default_factory=list)
    rejection: Rejection | None = None
    entry: dict | None = None          # the key's new entry (None: nothing to store)
    created: list[str] = field(default_factory=list)  # case ids created (index writes)
    duplicate: bool = False            # intake id already applied
    noop: bool = False                 # valid, but changes nothing (e.g. ack of an acked page)

    @property
    def cases(self) -> dict[str, dict]:
        """The cases this decision changed, as stored (case id -> state)."""
        if self.entry is None:
            return {}
        ids = {e["case_id"] for e in self.events}
        return {cid: c for cid, c in self.entry["cases"].items() if cid in ids}


def new_entry(dedup_key: str) -> dict:
    # "oncall" (case id -> escalation state and pending timers) is added by
    # streams.domain.oncall when a case has any
    return {"dedup_key": dedup_key, "seq": 0, "open_case_id": None, "last_case_id": None,
            "cases": {}, "seen": [], "recent": []}


def compact(case: dict) -> dict:
    return {f: case.get(f) for f in STATE_FIELDS}


def lookup(intake: Intake, get_entry: Callable[[str], dict | None],
           get_index: Callable[[str], str | None]) -> dict | None:
    """The entry an intake message is decided against (None: key never seen)."""
    if intake.case_id is not None:
        dedup_key = get_index(intake.case_id)
        return get_entry(dedup_key) if dedup_key is not None else None
    return get_entry(intake.dedup_key)


def target_case(intake: Intake, entry: dict | None) -> dict | None:
    """The case an intake message is about (None: no such case)."""
    if entry is None:
        return None
    if intake.case_id is not None:
        cid = intake.case_id
    elif intake.kind == "alert":
        cid = entry["open_case_id"]
    else:
        cid = entry["open_case_id"] or entry["last_case_id"]
    return entry["cases"].get(cid) if cid else None


def already_seen(entry: dict | None, event_id: str) -> bool:
    return entry is not None and event_id in entry["seen"]


def _recorded(entry: dict, event_id: str) -> list | None:
    for item in reversed(entry["recent"]):
        if item[0] == event_id:
            return item
    return None


def recorded_outputs(entry: dict, event_id: str) -> list | None:
    """The outputs ``event_id`` produced, if still remembered."""
    item = _recorded(entry, event_id)
    return item[1] if item else None


def is_redelivery(entry: dict, event_id: str, offset: int | None) -> bool:
    """True when ``event_id`` was applied from this very input ``offset``.

    That is Kafka redelivering a record whose processing may not have been
    committed (a crash): its outputs must be re-sent. The same id arriving at
    another offset is a message sent twice: it has no effect at all.
    """
    item = _recorded(entry, event_id)
    return item is not None and offset is not None and len(item) > 2 and item[2] == offset


def remember(entry: dict, event_id: str, outputs: list, offset: int | None = None) -> dict:
    """The entry with ``event_id`` marked seen, its outputs and input offset kept (bounded),
    and ``applied``, the number of inputs applied to the key, one more: a later state of the
    key always has a greater ``applied`` (a restore keeps the greatest, streams/rebalance.py)."""
    e = dict(entry)
    e["applied"] = entry.get("applied", 0) + 1
    e["seen"] = (entry["seen"] + [event_id])[-SEEN_LIMIT:]
    e["recent"] = _kept_recent((entry["recent"] + [[event_id, outputs, offset]])[-RECENT_LIMIT:])
    return e


def _kept_recent(recent: list) -> list:
    """The newest ``recent`` items whose outputs fit in RECENT_BYTES (the newest one always)."""
    size = len(orjson.dumps(recent))
    while size > RECENT_BYTES and len(recent) > 1:
        size -= len(orjson.dumps(recent[0])) + 1   # and its comma
        recent = recent[1:]
    return recent


# --------------------------------------------------------------------------
# decide
# --------------------------------------------------------------------------


class Builder:
    """Emits events for one case of one entry, folding them as it goes."""

    def __init__(self, tenant: Tenant, intake: Intake, entry: dict, case: dict | None):
        self.tenant = tenant
        self.intake = intake
        self.entry = dict(entry, cases=dict(entry["cases"]))
        self.case = case
        self.events: list[dict] = []

    def emit(self, etype: str, case_id: str, actor: dict | None | str = "intake", **payload) -> dict:
        version = (self.case["version"] if self.case else 0) + 1
        event = {
            # unique per tenant, case and version; the same input always gives the same id
            "event_id": derive_id("domain", self.tenant.name, case_id, str(version), self.intake.event_id),
            "type": etype,
            "tenant": self.tenant.name,
            "case_id": case_id,
            "dedup_key": self.entry["dedup_key"],
            "version": version,
            "occurred_at": self.intake.timestamp,
            "caused_by": self.intake.event_id,
            "actor": self.intake.actor if actor == "intake" else actor,
            **payload,
        }
        self.events.append(event)
        self.case = compact(apply(self.tenant, self.case, event))
        self.entry["cases"][case_id] = self.case
        return event

    def decision(self, **kw) -> Decision:
        return Decision(events=self.events, entry=self.entry, **kw)


# apply
# --------------------------------------------------------------------------


def apply(tenant: Tenant, case: dict | None, event: dict) -> dict:
    """The case after ``event``. ``case`` is None before ``CaseCreated``."""
    t = event["type"]
    if t == event_types.CREATED:
        if case is not None:
            raise ValueError(f"CaseCreated for existing case {event['case_id']}")
        new = case_schema.new_case(event)
    else:
        if case is None:
            raise ValueError(f"{t} before CaseCreated for {event['case_id']}")
        if event["version"] != case["version"] + 1:
            raise ValueError(f"{t} version {event['version']} does not follow {case['version']} "
                             f"for {event['case_id']}")
        kind = event_types.BY_NAME.get(t)
        if kind is None:
            raise ValueError(f"unknown event type {t!r}")
        new = dict(case)
        if kind.changes is not None:  # else recorded in the timeline; no case field changes
            new.update(kind.changes(tenant, case, event))
    new["version"] = event["version"]
    new["updated_at"] = event["occurred_at"]
    return new


def fold_each(tenant: Tenant, before: dict[str, dict | None], events: list[dict]):
    """Yield (event, its case's compact state right after it), folding from
    ``before`` (case id -> state before the first event; None: a new case)."""
    states = dict(before)
    for e in events:
        state = compact(apply(tenant, states.get(e["case_id"]), e))
        states[e["case_id"]] = state
        yield e, state


def replay(tenant: Tenant, events: list[dict]) -> dict | None:
    """Fold a case's events (in version order) into its state."""
    case = None
    for e in events:
        case = apply(tenant, case, e)
    return case
