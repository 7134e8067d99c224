"""The case domain: decide what an intake message does, and apply events.

Pure functions over plain dicts (the shapes stored in the Faust tables):

* ``decide(tenant, intake, entry)`` -> :class:`Decision`: the domain events an
  intake message produces, or why it is rejected, and the key's new entry.
  It never mutates its inputs.
* ``apply(tenant, case, event)`` -> case: the event-sourced fold, with the
  entry and what it remembers, lives in ``case_state`` (re-exported here).

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

from streams.config import Tenant
from streams.domain import case_schema
from streams.domain import oncall as paging
from streams.domain.case_state import (  # noqa: F401  (re-exported: the case domain's API)
    EVENT_TYPES, MAX_CASES_PER_KEY, ONCALL_DEFAULTS, RECENT_BYTES, RECENT_LIMIT, SEEN_LIMIT,
    STATE_FIELDS, Builder, Decision, already_seen, apply, compact, fold_each, is_redelivery,
    lookup, new_entry, recorded_outputs, remember, replay, target_case,
)
from streams.domain.intake import (
    INVALID_TRANSITION, NO_OPEN_CASE, UNKNOWN_CASE, Intake, Rejection, make_case_id,
)

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
    b = Builder(tenant, intake, entry, case if is_open else None)
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
    b = Builder(tenant, intake, entry, case)
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