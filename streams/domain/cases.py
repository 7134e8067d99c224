"""The case domain: decide what an intake message does, and apply events.

Pure functions over plain dicts (the shapes stored in the Faust tables):

* ``decide(tenant, intake, entry)`` -> :class:`Decision`: the domain events an
  intake message produces, or why it is rejected, and the key's new entry.
  It never mutates its inputs.
* ``apply(tenant, case, event)`` -> case: the event-sourced fold. A case is a
  pure function of its domain events, so projections can rebuild it by replay.

**One entry per dedup key holds everything a decision reads**: the key's
cases (their decision-relevant fields), which one is open, how many the key
has had, and the ids of the intake messages it has seen with what they
produced. A decision reads one entry and writes one entry, so a crash that
loses some table writes can never leave the inputs of a later decision
inconsistent with each other (see agents/intake.py for the crash analysis).
A separate, write-once index maps case ids to dedup keys for commands that
name a case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import orjson

from streams.config import Tenant
from streams.domain import case_schema, event_types
from streams.domain.intake import (
    INVALID_TRANSITION, NO_OPEN_CASE, UNKNOWN_CASE, Intake, Rejection, derive_id, make_case_id,
)

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


class _Builder:
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


def decide(tenant: Tenant, intake: Intake, entry: dict | None, oncall=None) -> Decision:
    """What ``intake`` does to the key whose entry is ``entry``.

    ``entry`` comes from :func:`lookup`; None means the key (or the case id
    of a command) is unknown. ``oncall`` (an ``OnCallConfig``) adds what
    follows a change: escalation, acknowledgement and SLA timers, automation
    rules (``streams.domain.oncall``); without it only the case changes.
    """
    if already_seen(entry, intake.event_id):
        return Decision(duplicate=True)
    if intake.kind == "alert":
        d = _decide_alert(tenant, intake, entry)
    else:
        d = _decide_command(tenant, intake, entry)
    if oncall is not None and d.events:
        from streams.domain import oncall as paging

        d = paging.follow_up(tenant, oncall, intake, d)
    return d


def _reject(reason: str, detail: str, entry: dict | None) -> Decision:
    # The entry is returned so that the rejection is remembered too (a key that never had a
    # case gets a new, empty one): a redelivery then re-sends the same dead letter instead of
    # re-deciding against a later state. Only a command naming a case id nobody knows is not
    # remembered (there is no key to remember it under).
    return Decision(rejection=Rejection(reason, detail), entry=entry)


def _seq_of(case: dict) -> int:
    """Creation order of a case within its key (the case id's last part)."""
    return int(case["case_id"].rsplit("-", 1)[1])


def _evict(entry: dict) -> None:
    """Keep at most MAX_CASES_PER_KEY cases: drop the oldest that are not open."""
    cases = entry["cases"]
    while len(cases) > MAX_CASES_PER_KEY:
        oldest = min((c for cid, c in cases.items() if cid not in (entry["open_case_id"], entry["last_case_id"])),
                     key=_seq_of, default=None)
        if oldest is None:
            return
        del cases[oldest["case_id"]]
        if oldest["case_id"] in entry.get("oncall", {}):
            entry["oncall"] = {k: v for k, v in entry["oncall"].items() if k != oldest["case_id"]}


def _decide_alert(tenant: Tenant, intake: Intake, entry: dict | None) -> Decision:
    entry = entry or new_entry(intake.dedup_key)
    case = target_case(intake, entry)
    is_open = case is not None and tenant.is_open(case["status"])
    b = _Builder(tenant, intake, entry, case if is_open else None)
    if intake.op == "trigger":
        if is_open:
            b.emit("AlertDeduplicated", case["case_id"],
                   occurrence_count=case["occurrence_count"] + 1,
                   last_seen_at=max(case["last_seen_at"], intake.timestamp),
                   summary=intake.fields["summary"], severity=intake.fields["severity"])
            return b.decision()
        seq = entry["seq"] + 1
        case_id = make_case_id(tenant, intake.dedup_key, seq)
        b.emit("CaseCreated", case_id, status=tenant.default_status,
               case_type=tenant.case_type, work_type=tenant.work_type,
               **{f: intake.fields[f] for f in case_schema.INTAKE_FIELDS})
        b.entry.update(seq=seq, open_case_id=case_id, last_case_id=case_id)
        _evict(b.entry)
        return b.decision(created=[case_id])
    # acknowledge / resolve
    if not is_open:
        # remembered even for a key that never had a case (a brand-new entry is stored): else a
        # crash that redelivers this record after a later trigger's state was written would apply
        # it to that trigger's case (found by tests/unit/test_identity_property.py)
        return _reject(NO_OPEN_CASE, f"{intake.op} for dedup key {intake.dedup_key!r}, which has no open case",
                       entry)
    target = tenant.actions[intake.op]
    if case["status"] == target:
        return Decision(noop=True, entry=entry)
    if not tenant.allows(case["status"], target):
        return _reject(INVALID_TRANSITION, f"{intake.op}: {tenant.name} does not allow {case['status']} -> "
                                           f"{target} (case {case['case_id']})", entry)
    b.emit("StatusChanged", case["case_id"], from_status=case["status"], to_status=target,
           reason=f"alert_{intake.op}")
    if target == tenant.final_status:
        b.entry["open_case_id"] = None
    return b.decision()


def _decide_command(tenant: Tenant, intake: Intake, entry: dict | None) -> Decision:
    case = target_case(intake, entry)
    if case is None:
        who = f"case {intake.case_id!r}" if intake.case_id else f"dedup key {intake.dedup_key!r}"
        detail = f"{intake.op}: no {who} in tenant {tenant.name}"
        if entry is not None and intake.case_id:
            detail += f" (stream state keeps the last {MAX_CASES_PER_KEY} cases of a dedup key)"
        if entry is None and intake.dedup_key:
            entry = new_entry(intake.dedup_key)  # remembered (see the acknowledge/resolve rejection)
        return _reject(UNKNOWN_CASE, detail, entry)
    b = _Builder(tenant, intake, entry, case)
    cid = case["case_id"]
    f = intake.fields
    if intake.op == "set_status":
        target = f["status"]
        if case["status"] == target:
            return Decision(noop=True, entry=entry)
        if not tenant.allows(case["status"], target):
            return _reject(INVALID_TRANSITION, f"set_status: {tenant.name} does not allow {case['status']} -> "
                                               f"{target} (case {cid})", entry)
        reopening = case["status"] == tenant.final_status
        if reopening and entry["open_case_id"] not in (None, cid):
            return _reject(INVALID_TRANSITION, f"set_status: cannot reopen {cid}: dedup key "
                                               f"{entry['dedup_key']!r} already has open case "
                                               f"{entry['open_case_id']} (one open case per key)", entry)
        b.emit("StatusChanged", cid, from_status=case["status"], to_status=target, reason="command")
        if target == tenant.final_status and entry["open_case_id"] == cid:
            b.entry["open_case_id"] = None
        elif reopening:
            b.entry["open_case_id"] = cid
    elif intake.op == "assign":
        before = case.get("assignee")
        if (before or {}).get("id") == (f["assignee"] or {}).get("id"):
            return Decision(noop=True, entry=entry)
        b.emit("Assigned", cid, assignee=f["assignee"], previous_assignee=before)
    elif intake.op == "comment":
        b.emit("CommentAdded", cid, text=f["text"])
    elif intake.op == "set_priority":
        if case.get("priority") == f["priority"]:
            return Decision(noop=True, entry=entry)
        b.emit("PriorityChanged", cid, from_priority=case.get("priority"), to_priority=f["priority"])
    return b.decision()


# --------------------------------------------------------------------------
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
