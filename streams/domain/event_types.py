"""The domain event types, listed once. Pure.

Each type has an Avro schema ``schemas/avro/<type>.v<N>.avsc`` (a unit
test checks both ways), a group (the case itself, on-call paging and
automation in ``streams/domain/oncall.py``, notification delivery outcomes
in ``agents/notify.py``), what it changes in the case (``changes``:
``cases.apply`` dispatches on it) and a one-line description of what it
changed (``describe``: the demo's table, ``casestream case show --timeline``).

``CaseCreated`` opens a case (``streams.domain.case_schema.new_case``);
every other type changes an existing one, or nothing (only recorded in the
timeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CASE, ONCALL, DELIVERY = "case", "oncall", "delivery"
CREATED = "CaseCreated"


@dataclass(frozen=True)
class EventType:
    name: str
    group: str
    # (tenant, the case before, the event) -> the fields it changes; None: it changes nothing
    changes: Callable[[object, dict, dict], dict] | None = None
    describe: Callable[[dict], str] | None = None


# --------------------------------------------------------------------------
# what each type changes in a case
# --------------------------------------------------------------------------


def _alert_deduplicated(tenant, case: dict, e: dict) -> dict:
    return {"occurrence_count": e["occurrence_count"], "last_seen_at": e["last_seen_at"]}


def _status_changed(tenant, case: dict, e: dict) -> dict:
    at = e["occurred_at"]
    out = {"status": e["to_status"], "status_changed_at": at}
    if e["to_status"] == tenant.actions["acknowledge"] and case.get("acknowledged_at") is None:
        out["acknowledged_at"] = at
        out["time_to_first_acknowledge"] = at - case["created_at"]  # ms
    if e["to_status"] == tenant.final_status:
        out["resolved_at"] = at
    elif e["from_status"] == tenant.final_status:
        out["resolved_at"] = None  # reopened
    return out


def _escalation_step_started(tenant, case: dict, e: dict) -> dict:
    return {"escalation_policy_id": e["escalation_policy_id"],
            "escalation_policy_step_id": e["escalation_policy_step_id"],
            "escalation_policy_retry_count": e["escalation_policy_retry_count"],
            "urgency": e["urgency"] or case.get("urgency"), "is_shadow": e["is_shadow"],
            "targets": [dict(t) for t in e["targets"]], "escalation_active": True}


def _responders_added(tenant, case: dict, e: dict) -> dict:
    ids = list(case.get("responder_users") or [])
    people = [dict(p) for p in case.get("responders") or []]
    for person in e["responders"]:
        if person["id"] not in ids:
            ids.append(person["id"])
            people.append(dict(person))
    return {"responder_users": ids, "responders": people, "responders_added_at": e["occurred_at"]}


# --------------------------------------------------------------------------
# what each type changed, in words
# --------------------------------------------------------------------------


def _who(person: dict | None) -> str | None:
    return (person or {}).get("name") or (person or {}).get("id")


def _step(e: dict) -> str:
    retry = f" (retry {e['escalation_policy_retry_count']})" if e["escalation_policy_retry_count"] else ""
    return (f"policy {e['escalation_policy_id']} step {e['step_index'] + 1}{retry}"
            f", urgency {e.get('urgency') or '-'}{', shadow' if e['is_shadow'] else ''}")


TYPES: tuple[EventType, ...] = (
    EventType(CREATED, CASE,
              describe=lambda e: f"{e['status']}: {e.get('summary') or ''} [{e.get('severity') or '-'}]"),
    EventType("AlertDeduplicated", CASE, _alert_deduplicated, lambda e: f"occurrence #{e['occurrence_count']}"),
    EventType("StatusChanged", CASE, _status_changed,
              lambda e: f"{e['from_status']} -> {e['to_status']} ({e['reason']})"),
    EventType("Assigned", CASE, lambda tenant, case, e: {"assignee": e["assignee"]},
              lambda e: f"assignee {_who(e.get('assignee'))}"),
    EventType("CommentAdded", CASE, lambda tenant, case, e: {"comment_count": case["comment_count"] + 1},
              lambda e: repr(e["text"][:60])),
    EventType("PriorityChanged", CASE, lambda tenant, case, e: {"priority": e["to_priority"]},
              lambda e: f"{e.get('from_priority') or '-'} -> {e['to_priority']}"),
    # on-call paging and automation (streams/domain/oncall.py)
    EventType("EscalationStepStarted", ONCALL, _escalation_step_started, _step),
    EventType("RespondersAdded", ONCALL, _responders_added,
              lambda e: "responders " + ", ".join(r["id"] for r in e["responders"])),
    EventType("NotificationRequested", ONCALL,
              describe=lambda e: f"notify {e['user_id']}{' (shadow)' if e['is_shadow'] else ''}"),
    EventType("EscalationEnded", ONCALL, lambda tenant, case, e: {"escalation_active": False},
              lambda e: f"policy {e['escalation_policy_id']}: {e['reason']}"),
    EventType("AcknowledgeTimedOut", ONCALL,
              describe=lambda e: f"acknowledged {e['timeout_seconds']} s ago, not resolved"),
    EventType("SlaBreached", ONCALL,
              lambda tenant, case, e: {"sla_breaches": list(case.get("sla_breaches") or []) + [e["sla"]]},
              lambda e: f"{e['sla']} SLA of {e['priority']}"),
    EventType("AutomationApplied", ONCALL, describe=lambda e: f"rule {e['rule_id']}: {', '.join(e['actions'])}"),
    # notification delivery outcomes (agents/notify.py)
    EventType("NotificationDelivered", DELIVERY),
    EventType("NotificationFailed", DELIVERY),
    EventType("EndpointDisabled", DELIVERY),
)
BY_NAME = {t.name: t for t in TYPES}
NAMES = tuple(t.name for t in TYPES)


def describe(event: dict) -> str:
    """What ``event`` changed, in one line ('' for a type without a description)."""
    kind = BY_NAME.get(event["type"])
    return kind.describe(event) if kind is not None and kind.describe is not None else ""
