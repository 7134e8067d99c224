"""Notifications: which deliveries a domain event asks for, and what a delivery outcome records. Pure.

The apply agent holds each case's state when it emits events, so it decides
deliveries (:func:`deliveries`):

* a ``NotificationRequested`` (escalation) goes to the target user's contact
  methods (``users.<id>.contact: {webhook: url, slack: url}``);
* a **notification rule** (``notification_rules``: event types and a match on
  the case after the event) sends matching events to named ``endpoints``;
* a shadow page's notifications are recorded (``NotificationRequested`` with
  ``is_shadow``) and never sent: no delivery at all for a shadow case.

Each delivery has a deterministic id (event id + endpoint), so a re-sent
request is the same delivery; the delivery agent (``agents/notify.py``)
sends it, retries it, and reports its outcome back through ``T.timers``;
:func:`decide_outcome` turns that into ``NotificationDelivered``,
``NotificationFailed`` and ``EndpointDisabled`` on the case's timeline.
"""

from __future__ import annotations

from streams.config import Tenant
from streams.domain.case_state import Builder, Decision, already_seen, fold_each
from streams.domain.delivery import delivery_id
from streams.domain.intake import Intake, derive_id
from streams.domain.oncall import SYSTEM_ACTOR, matches

# outcomes of deliveries are never themselves notified (that would loop)
OUTCOME_TYPES = ("NotificationDelivered", "NotificationFailed", "EndpointDisabled")
CASE_FIELDS = ("case_id", "status", "severity", "priority", "urgency", "summary", "responder_users", "is_shadow",
               "dedup_key", "source", "component", "tags")


def deliveries(tenant: Tenant, cfg, before: dict[str, dict | None], events: list[dict]) -> list[dict]:
    """Delivery requests (plain dicts) for ``events``, in event order. ``before``:
    case id -> its state before the first event (None for a new case)."""
    if not events or (not cfg.notification_rules and not any(e["type"] == "NotificationRequested" for e in events)):
        return []
    # a shadow page is known as such from its first EscalationStepStarted on (which follows CaseCreated)
    shadow = {e["case_id"] for e in events if e.get("is_shadow")} | {
        cid for cid, st in before.items() if st and st.get("is_shadow")}
    out: list[dict] = []
    for index, (e, state) in enumerate(fold_each(tenant, before, events)):
        cid = e["case_id"]
        if cid in shadow or e["type"] in OUTCOME_TYPES:
            continue  # shadow: recorded, never sent; outcomes: never notified
        targets = []
        if e["type"] == "NotificationRequested":
            targets += cfg.user_endpoints(e["user_id"])
        for rule in cfg.notification_rules:
            if (not rule.event_types or e["type"] in rule.event_types) and matches(rule.match, state):
                targets += [cfg.endpoints[name] for name in rule.endpoints if name in cfg.endpoints]
        seen: set[str] = set()
        for ep in targets:
            if ep.name in seen:
                continue
            seen.add(ep.name)
            out.append({
                "kind": "request", "delivery_id": delivery_id(e["event_id"], ep.name), "tenant": tenant.name,
                "case_id": cid, "dedup_key": e["dedup_key"], "endpoint": ep.name, "channel": ep.channel,
                "event_index": index, "case": {f: state.get(f) for f in CASE_FIELDS},
                "notification_id": e.get("notification_id"), "user_id": e.get("user_id"),
            })
    return out


def endpoint_for(cfg, name: str):
    """The endpoint a delivery goes to, as configured now (None: removed)."""
    if name.startswith("user:"):
        _, user_id, channel = name.split(":", 2)
        return next((ep for ep in cfg.user_endpoints(user_id) if ep.channel == channel), None)
    return cfg.endpoints.get(name)


def outcome_intake(tenant: Tenant, outcome: dict) -> Intake:
    return Intake("delivery", derive_id("delivery-outcome", tenant.name, outcome["delivery_id"], outcome["outcome"]),
                  outcome["outcome"], outcome["dedup_key"], outcome["case_id"], outcome["at"], SYSTEM_ACTOR, {},
                  outcome["at"])


def decide_outcome(tenant: Tenant, outcome: dict, entry: dict | None) -> Decision:
    """The timeline event of a delivery's final outcome (``delivered``,
    ``failed``) or of the endpoint it disabled (``disabled``). Reported twice,
    it records once."""
    intake = outcome_intake(tenant, outcome)
    if already_seen(entry, intake.event_id):
        return Decision(duplicate=True)
    case = (entry or {}).get("cases", {}).get(outcome["case_id"])
    if case is None:
        return Decision(noop=True)  # the case is no longer in stream state (evicted): nothing to record on
    b = Builder(tenant, intake, entry, case)
    if outcome["outcome"] == "disabled":  # recorded on the case whose delivery tipped it
        b.emit("EndpointDisabled", outcome["case_id"], actor=SYSTEM_ACTOR, endpoint=outcome["endpoint"],
               channel=outcome["channel"], consecutive_failures=outcome["consecutive_failures"],
               reason=outcome["reason"])
        return b.decision()
    common = {"delivery_id": outcome["delivery_id"], "endpoint": outcome["endpoint"], "channel": outcome["channel"],
              "attempts": outcome["attempts"], "status_code": outcome.get("status_code"),
              "notification_id": outcome.get("notification_id"), "user_id": outcome.get("user_id")}
    if outcome["outcome"] == "delivered":
        b.emit("NotificationDelivered", outcome["case_id"], actor=SYSTEM_ACTOR, **common)
    else:
        b.emit("NotificationFailed", outcome["case_id"], actor=SYSTEM_ACTOR, reason=outcome["reason"],
               permanent=bool(outcome.get("permanent")), **common)
    return b.decision()
