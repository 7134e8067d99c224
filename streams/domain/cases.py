"""The case domain: decide what an intake message does, and apply events.

Pure functions over plain dicts (the shapes stored in the Faust tables):

* ``decide(tenant, intake, key_state, case)`` -> :class:`Decision`: which
  domain events an intake message produces, or why it is rejected, and the
  new key state. It never mutates its inputs.
* ``apply(tenant, case, event)`` -> case: the event-sourced fold. A case is a pure
  function of its domain events, so projections can rebuild it by replay.

Key state (one per dedup key) remembers the open case, the latest case, how
many cases the key has had, and the ids of the intake messages it has seen
together with what they produced, so a redelivered message has no second
effect and its outputs can be re-sent verbatim (see agents/intake.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.config import Tenant
from streams.domain.intake import (
    INVALID_TRANSITION, NO_OPEN_CASE, UNKNOWN_CASE, Intake, Rejection, derive_id, make_case_id,
)

SEEN_LIMIT = 1024     # intake ids remembered per dedup key
RECENT_LIMIT = 64     # of those, how many keep their outputs for re-sending

EVENT_TYPES = ("CaseCreated", "AlertDeduplicated", "StatusChanged", "Assigned", "CommentAdded", "PriorityChanged")

CASE_FIELDS = ("summary", "source", "severity", "component", "group", "class", "custom_details",
               "links", "project", "priority", "tags", "urgency")


@dataclass
class Decision:
    events: list[dict] = field(default_factory=list)
    rejection: Rejection | None = None
    key_state: dict | None = None      # new key state (None: nothing to store)
    cases: dict[str, dict] = field(default_factory=dict)  # case id -> new case state
    duplicate: bool = False            # intake id already applied
    noop: bool = False                 # valid, but changes nothing (e.g. ack of an acked page)


def new_key_state(dedup_key: str) -> dict:
    return {"dedup_key": dedup_key, "seq": 0, "open_case_id": None, "last_case_id": None,
            "seen": [], "recent": []}


def target_case_id(intake: Intake, key_state: dict | None) -> str | None:
    """Which case an intake message is about, before looking at the case."""
    if intake.case_id is not None:
        return intake.case_id
    if key_state is None:
        return None
    if intake.kind == "alert":
        return key_state["open_case_id"]
    return key_state["open_case_id"] or key_state["last_case_id"]


def already_seen(key_state: dict | None, event_id: str) -> bool:
    return key_state is not None and event_id in key_state["seen"]


def _recorded(key_state: dict, event_id: str) -> list | None:
    for entry in reversed(key_state["recent"]):
        if entry[0] == event_id:
            return entry
    return None


def recorded_outputs(key_state: dict, event_id: str) -> list | None:
    """The outputs ``event_id`` produced, if still remembered."""
    entry = _recorded(key_state, event_id)
    return entry[1] if entry else None


def is_redelivery(key_state: dict, event_id: str, offset: int | None) -> bool:
    """True when ``event_id`` was applied from this very input ``offset``.

    That is Kafka redelivering a message whose processing may not have been
    committed (a crash): its outputs must be re-sent. The same id arriving at
    another offset is a message sent twice: it has no effect at all.
    """
    entry = _recorded(key_state, event_id)
    return entry is not None and offset is not None and len(entry) > 2 and entry[2] == offset


def remember(key_state: dict, event_id: str, outputs: list, offset: int | None = None) -> dict:
    """Key state with ``event_id`` marked seen, its outputs and input offset kept (bounded)."""
    ks = dict(key_state)
    ks["seen"] = (key_state["seen"] + [event_id])[-SEEN_LIMIT:]
    ks["recent"] = (key_state["recent"] + [[event_id, outputs, offset]])[-RECENT_LIMIT:]
    return ks


# --------------------------------------------------------------------------
# decide
# --------------------------------------------------------------------------


class _Builder:
    def __init__(self, tenant: Tenant, intake: Intake, case: dict | None):
        self.tenant = tenant
        self.intake = intake
        self.case = case
        self.events: list[dict] = []

    def emit(self, etype: str, case_id: str, dedup_key: str, **payload) -> None:
        version = (self.case["version"] if self.case else 0) + 1
        event = {
            "event_id": derive_id("domain", self.intake.event_id, str(len(self.events))),
            "type": etype,
            "tenant": self.tenant.name,
            "case_id": case_id,
            "dedup_key": dedup_key,
            "version": version,
            "occurred_at": self.intake.timestamp,
            "caused_by": self.intake.event_id,
            "actor": self.intake.actor,
            **payload,
        }
        self.events.append(event)
        self.case = apply(self.tenant, self.case, event)


def decide(tenant: Tenant, intake: Intake, key_state: dict | None, case: dict | None) -> Decision:
    """What ``intake`` does, given the key's state and the target case.

    ``case`` is the state of ``target_case_id(intake, key_state)`` (None if
    there is no such case); for a command by case id, ``key_state`` is the
    state of that case's dedup key.
    """
    if already_seen(key_state, intake.event_id):
        return Decision(duplicate=True)
    if intake.kind == "alert":
        return _decide_alert(tenant, intake, key_state, case)
    return _decide_command(tenant, intake, key_state, case)


def _with_key(d: Decision, key_state: dict | None, builder: _Builder | None = None) -> Decision:
    d.key_state = key_state
    if builder is not None and builder.events:
        d.events = builder.events
        d.cases = {builder.case["case_id"]: builder.case}
    return d


def _decide_alert(tenant: Tenant, intake: Intake, key_state: dict | None, case: dict | None) -> Decision:
    ks = dict(key_state) if key_state else new_key_state(intake.dedup_key)
    is_open = case is not None and tenant.is_open(case["status"])
    b = _Builder(tenant, intake, case if is_open else None)
    if intake.op == "trigger":
        if is_open:
            b.emit("AlertDeduplicated", case["case_id"], case["dedup_key"],
                   occurrence_count=case["occurrence_count"] + 1,
                   last_seen_at=max(case["last_seen_at"], intake.timestamp),
                   summary=intake.fields["summary"], severity=intake.fields["severity"])
            return _with_key(Decision(), ks, b)
        seq = ks["seq"] + 1
        case_id = make_case_id(tenant, intake.dedup_key, seq)
        b.emit("CaseCreated", case_id, intake.dedup_key, status=tenant.default_status,
               case_type=tenant.case_type, work_type=tenant.work_type,
               **{f: intake.fields[f] for f in CASE_FIELDS})
        ks.update(seq=seq, open_case_id=case_id, last_case_id=case_id)
        return _with_key(Decision(), ks, b)
    # acknowledge / resolve
    if not is_open:
        return Decision(rejection=Rejection(
            NO_OPEN_CASE, f"{intake.op} for dedup key {intake.dedup_key!r}, which has no open case"))
    target = tenant.actions[intake.op]
    if case["status"] == target:
        return _with_key(Decision(noop=True), ks)
    if not tenant.allows(case["status"], target):
        return Decision(rejection=Rejection(
            INVALID_TRANSITION, f"{intake.op}: {tenant.name} does not allow {case['status']} -> {target} "
                                f"(case {case['case_id']})"), key_state=ks)
    b.emit("StatusChanged", case["case_id"], case["dedup_key"], from_status=case["status"],
           to_status=target, reason=f"alert_{intake.op}")
    if target == tenant.final_status:
        ks["open_case_id"] = None
    return _with_key(Decision(), ks, b)


def _decide_command(tenant: Tenant, intake: Intake, key_state: dict | None, case: dict | None) -> Decision:
    if case is None or key_state is None:
        who = f"case {intake.case_id!r}" if intake.case_id else f"dedup key {intake.dedup_key!r}"
        return Decision(rejection=Rejection(UNKNOWN_CASE, f"{intake.op}: no {who} in tenant {tenant.name}"))
    ks = dict(key_state)
    b = _Builder(tenant, intake, case)
    cid, dkey = case["case_id"], case["dedup_key"]
    f = intake.fields
    if intake.op == "set_status":
        target = f["status"]
        if case["status"] == target:
            return _with_key(Decision(noop=True), ks)
        if not tenant.allows(case["status"], target):
            return Decision(rejection=Rejection(
                INVALID_TRANSITION, f"set_status: {tenant.name} does not allow {case['status']} -> {target} "
                                    f"(case {cid})"), key_state=ks)
        reopening = case["status"] == tenant.final_status
        if reopening and ks["open_case_id"] not in (None, cid):
            return Decision(rejection=Rejection(
                INVALID_TRANSITION, f"set_status: cannot reopen {cid}: dedup key {dkey!r} already has "
                                    f"open case {ks['open_case_id']} (one open case per key)"), key_state=ks)
        b.emit("StatusChanged", cid, dkey, from_status=case["status"], to_status=target, reason="command")
        if target == tenant.final_status and ks["open_case_id"] == cid:
            ks["open_case_id"] = None
        elif reopening:
            ks["open_case_id"] = cid
    elif intake.op == "assign":
        before = case.get("assignee")
        if (before or {}).get("id") == (f["assignee"] or {}).get("id"):
            return _with_key(Decision(noop=True), ks)
        b.emit("Assigned", cid, dkey, assignee=f["assignee"], previous_assignee=before)
    elif intake.op == "comment":
        b.emit("CommentAdded", cid, dkey, text=f["text"])
    elif intake.op == "set_priority":
        if case.get("priority") == f["priority"]:
            return _with_key(Decision(noop=True), ks)
        b.emit("PriorityChanged", cid, dkey, from_priority=case.get("priority"), to_priority=f["priority"])
    return _with_key(Decision(), ks, b)


# --------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------


def apply(tenant: Tenant, case: dict | None, event: dict) -> dict:
    """The case after ``event``. ``case`` is None before ``CaseCreated``."""
    t = event["type"]
    at = event["occurred_at"]
    if t == "CaseCreated":
        if case is not None:
            raise ValueError(f"CaseCreated for existing case {event['case_id']}")
        new = {
            "case_id": event["case_id"], "tenant": event["tenant"], "dedup_key": event["dedup_key"],
            "status": event["status"], "case_type": event["case_type"], "work_type": event["work_type"],
            **{f: event[f] for f in CASE_FIELDS},
            "created_at": at, "last_seen_at": at, "status_changed_at": at,
            "acknowledged_at": None, "resolved_at": None,
            "occurrence_count": 1, "assignee": None, "comment_count": 0,
        }
    else:
        if case is None:
            raise ValueError(f"{t} before CaseCreated for {event['case_id']}")
        if event["version"] != case["version"] + 1:
            raise ValueError(f"{t} version {event['version']} does not follow {case['version']} "
                             f"for {event['case_id']}")
        new = dict(case)
        if t == "AlertDeduplicated":
            new["occurrence_count"] = event["occurrence_count"]
            new["last_seen_at"] = event["last_seen_at"]
        elif t == "StatusChanged":
            new["status"] = event["to_status"]
            new["status_changed_at"] = at
            if event["to_status"] == tenant.actions["acknowledge"]:
                new["acknowledged_at"] = new["acknowledged_at"] or at
            if event["to_status"] == tenant.final_status:
                new["resolved_at"] = at
            elif event["from_status"] == tenant.final_status:
                new["resolved_at"] = None  # reopened
        elif t == "Assigned":
            new["assignee"] = event["assignee"]
        elif t == "CommentAdded":
            new["comment_count"] = case["comment_count"] + 1
        elif t == "PriorityChanged":
            new["priority"] = event["to_priority"]
        else:
            raise ValueError(f"unknown event type {t!r}")
    new["version"] = event["version"]
    new["updated_at"] = at
    return new


def replay(tenant: Tenant, events: list[dict]) -> dict | None:
    """Fold a case's events (in version order) into its state."""
    case = None
    for e in events:
        case = apply(tenant, case, e)
    return case
