"""On-call paging and case automation: what follows a case change, and what a due timer does. Pure.

``streams.domain.cases.decide`` produces the case change an intake message
asks for; :func:`follow_up` then reacts to each of those events with the
tenant's ``OnCallConfig`` (``streams/oncall_config.py``):

* a new case that a **routing rule** (or the event's own
  ``escalation_policy_id``) gives a policy starts it: step 1 runs now
  (``EscalationStepStarted``, ``RespondersAdded``, one
  ``NotificationRequested`` per responder) and an escalation timer is set;
* acknowledge ends the escalation (``EscalationEnded`` reason
  ``acknowledged``) and sets the **acknowledgement timeout** timer; resolve
  ends everything;
* a case's **SLA** timer follows its priority and what is still unmet;
* **automation rules** run on ``case_created``, ``status_changed``,
  ``occurrence_count`` and ``sla_breached``; their actions (set priority,
  assign, comment, change status, page a policy) are events with the rule
  as actor, preceded by ``AutomationApplied``. Changes made by a rule get
  the paging and SLA reactions but do not trigger rules again (no loops).

**Timers** are stream state: ``entry["oncall"][case_id]`` holds the case's
escalation state and its pending timers, at most one per kind
(``escalation``, ``ack_timeout``, ``sla``), each with a unique id. A due
timer comes back as a timer message (``agents/timers.py``); :func:`decide_timer`
fires it only while it is still the pending one of its kind, so a timer
delivered twice, or one made stale by an acknowledgement, does nothing. A
fired timer acts at its due time: events it causes carry ``occurred_at =
due_at``, so the same timer always produces the same events.

Times are epoch milliseconds; "now" for an intake message is when
casestream received it (``Intake.now``), for a timer its due time.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from streams.config import Tenant
from streams.domain import escalation as esc
from streams.domain.case_state import Builder, Decision, already_seen
from streams.domain.intake import Intake, derive_id

TIMER_KINDS = ("escalation", "ack_timeout", "sla")
SYSTEM_ACTOR = {"id": "casestream", "name": "casestream", "email": None}
MATCH_FIELDS = ("source", "component", "group", "class", "project", "severity", "priority", "urgency",
                "status", "tags")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_datetime(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def to_ms(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def new_case_oncall() -> dict:
    return {"escalation": None, "timers": {}, "seq": 0}


def pending_timers(entry: dict | None) -> dict[str, dict]:
    """timer id -> {case_id, kind, due_at, dedup_key}: the entry's pending timers."""
    out: dict[str, dict] = {}
    if not entry:
        return out
    for cid, oc in (entry.get("oncall") or {}).items():
        for kind, t in oc["timers"].items():
            out[t["id"]] = {"timer_id": t["id"], "case_id": cid, "kind": kind, "due_at": t["due_at"],
                            "dedup_key": entry["dedup_key"]}
    return out


def matches(criteria: dict, record: dict) -> bool:
    """Whether ``record`` (a case) fits a rule's ``criteria``: every key must
    fit; a key fits when the record's value is one of the listed values --
    for ``tags``, when the record's tags contain any of them. Empty criteria
    match everything."""
    for key, wanted in criteria.items():
        value = record.get(key)
        if key == "tags":
            if not any(t in wanted for t in (value or ())):
                return False
        elif value not in wanted:
            return False
    return True


def route(cfg, case: dict, requested_policy: str | None) -> tuple[str, str | None] | None:
    """(policy id, urgency override) for a new case, or None: no paging. An
    event's own (known) ``escalation_policy_id`` wins over the routing rules."""
    if requested_policy and requested_policy in cfg.policies:
        return requested_policy, None
    rule = cfg.route(case)
    return (rule.escalation_policy_id, rule.urgency) if rule is not None else None


def _automation_actor(rule) -> dict:
    return {"id": f"automation:{rule.id}", "name": rule.id, "email": None}


class _Engine:
    """Reactions on one case of one entry, emitting through the case builder."""

    def __init__(self, tenant: Tenant, cfg, b: Builder, case_id: str, now: int, actor: dict):
        self.tenant, self.cfg, self.b, self.cid, self.now, self.actor = tenant, cfg, b, case_id, now, actor
        oncall = dict(b.entry.get("oncall") or {})
        oc = oncall.get(case_id) or new_case_oncall()
        self.oc = dict(oc, timers=dict(oc["timers"]))
        oncall[case_id] = self.oc
        b.entry["oncall"] = oncall

    @property
    def case(self) -> dict:
        return self.b.case

    def emit(self, etype: str, actor: dict | None = None, **payload) -> dict:
        return self.b.emit(etype, self.cid, actor=actor or self.actor, **payload)

    def done(self) -> None:
        """Keep the case's on-call state small: nothing for a case that never
        had any; only the timer counter (timer ids are never reused) once a
        case is closed with nothing pending."""
        oc = self.oc
        if not oc["timers"] and oc["escalation"] is None and oc["seq"] == 0:
            del self.b.entry["oncall"][self.cid]
            if not self.b.entry["oncall"]:
                del self.b.entry["oncall"]
        elif not oc["timers"] and self.case["status"] == self.tenant.final_status:
            oc["escalation"] = None

    # -- timers ------------------------------------------------------------

    def set_timer(self, kind: str, due_at: int) -> None:
        current = self.oc["timers"].get(kind)
        if current is not None and current["due_at"] == due_at:
            return
        self.oc["seq"] += 1
        self.oc["timers"][kind] = {"id": f"{self.cid}/{kind}/{self.oc['seq']}", "due_at": due_at}

    def cancel_timer(self, kind: str) -> None:
        self.oc["timers"].pop(kind, None)

    # -- reactions -----------------------------------------------------------

    def react(self, event: dict, automation: bool) -> None:
        t = event["type"]
        if t == "CaseCreated":
            self.page_new_case()
            self.schedule_sla()
            if automation:
                self.automate("case_created", event)
        elif t == "StatusChanged":
            self.status_changed(event)
            self.schedule_sla()
            if automation:
                self.automate("status_changed", event)
        elif t == "AlertDeduplicated":
            if automation:
                self.automate("occurrence_count", event)
        elif t == "PriorityChanged":
            self.schedule_sla()
        elif t == "SlaBreached":
            if automation:
                self.automate("sla_breached", event)

    def status_changed(self, event: dict) -> None:
        ack, final = self.tenant.actions["acknowledge"], self.tenant.final_status
        to = event["to_status"]
        if to == ack:
            self.end_escalation("acknowledged")
            timeout = self.cfg.ack_timeout_seconds
            if timeout and self.tenant.allows(ack, self.tenant.default_status):
                self.set_timer("ack_timeout", self.now + timeout * 1000)
            return
        self.cancel_timer("ack_timeout")
        if to == final:
            self.end_escalation("resolved")
        elif event["from_status"] == ack and event.get("reason") == "ack_timeout":
            previous = self.oc["escalation"]
            if previous is not None and previous["policy_id"] in self.cfg.policies:
                self.start_escalation(previous["policy_id"], previous.get("urgency"), previous["shadow"])

    # -- escalation ------------------------------------------------------------

    def page_new_case(self) -> None:
        intake = self.b.intake
        routed = route(self.cfg, self.case, intake.fields.get("escalation_policy_id"))
        if routed is None:
            return
        policy_id, urgency = routed
        self.start_escalation(policy_id, urgency or self.case.get("urgency") or "high",
                              bool(intake.fields.get("is_shadow")))

    def start_escalation(self, policy_id: str, urgency: str | None, shadow: bool) -> None:
        policy = self.cfg.policies[policy_id]
        state, actions = esc.start(policy, self.cfg.directory, to_datetime(self.now), shadow=shadow,
                                   low_urgency=(urgency == "low"))
        state["urgency"] = urgency
        self.run(policy, state, actions)

    def end_escalation(self, reason: str) -> None:
        state = self.oc["escalation"]
        if state is None or not state["active"]:
            return
        self.oc["escalation"] = esc.stop(state)
        self.cancel_timer("escalation")
        self.emit("EscalationEnded", escalation_policy_id=state["policy_id"], reason=reason, resolves_page=False)

    def escalate(self, due_at: int) -> None:
        state = self.oc["escalation"]
        policy = self.cfg.policies.get(state["policy_id"]) if state else None
        if policy is None:  # the policy was removed from the configuration
            if state is not None and state["active"]:
                self.oc["escalation"] = esc.stop(state)
                self.emit("EscalationEnded", escalation_policy_id=state["policy_id"], reason="policy_removed",
                          resolves_page=False)
            return
        new, actions = esc.advance(policy, state, self.cfg.directory, to_datetime(due_at))
        new["urgency"] = state.get("urgency")
        self.run(policy, new, actions)

    def run(self, policy, state: dict, actions: list[dict]) -> None:
        """Turn escalation actions into events and the escalation timer."""
        self.oc["escalation"] = state
        urgency, shadow = state.get("urgency"), state["shadow"]
        step_event = None
        for a in actions:
            kind = a["action"]
            if kind == "step_started":
                step = policy.steps[a["step_index"]]
                due = state["next_due_at"]
                step_event = self.emit(
                    "EscalationStepStarted", escalation_policy_id=policy.id, escalation_policy_step_id=step.id,
                    step_index=a["step_index"], escalation_policy_retry_count=a["retry"], urgency=urgency,
                    is_shadow=shadow, targets=[{"kind": t.kind, "id": t.id} for t in step.targets],
                    next_escalation_at=to_ms(datetime.fromisoformat(due)) if due else None)
            elif kind == "responders_added":
                self.emit("RespondersAdded", escalation_policy_step_id=a["step_id"],
                          responders=[self.person(u) for u in a["users"]])
            elif kind == "notify":
                self.emit("NotificationRequested",
                          notification_id=derive_id("notification", self.tenant.name, self.cid,
                                                    step_event["event_id"], a["user"]),
                          user_id=a["user"], escalation_policy_id=policy.id, escalation_policy_step_id=a["step_id"],
                          escalation_policy_retry_count=state["retry_count"], urgency=urgency,
                          is_shadow=a["shadow"], reason="escalation")
            elif kind == "timer":
                self.set_timer("escalation", to_ms(datetime.fromisoformat(a["due_at"])))
            elif kind == "policy_ended":
                self.cancel_timer("escalation")
                self.emit("EscalationEnded", escalation_policy_id=policy.id, reason="policy_end",
                          resolves_page=a["resolve"])
                final = self.tenant.final_status
                if a["resolve"] and self.tenant.allows(self.case["status"], final):
                    self.change_status(final, "policy_end", self.actor, automation=True)

    def person(self, user_id: str) -> dict:
        user = self.cfg.users.get(user_id)
        return {"id": user_id, "name": user.name if user else None, "email": user.email if user else None}

    # -- status changes made by casestream itself ------------------------------

    def change_status(self, target: str, reason: str, actor: dict, automation: bool) -> None:
        case, entry = self.case, self.b.entry
        if case["status"] == target or not self.tenant.allows(case["status"], target):
            return
        reopening = case["status"] == self.tenant.final_status
        if reopening and entry["open_case_id"] not in (None, self.cid):
            return  # one open case per dedup key
        event = self.emit("StatusChanged", actor=actor, from_status=case["status"], to_status=target, reason=reason)
        if target == self.tenant.final_status and entry["open_case_id"] == self.cid:
            entry["open_case_id"] = None
        elif reopening:
            entry["open_case_id"] = self.cid
        self.react(event, automation)

    # -- acknowledgement timeout and SLAs ------------------------------------

    def ack_timed_out(self, due_at: int) -> None:
        ack = self.tenant.actions["acknowledge"]
        if self.case["status"] != ack:
            return
        self.emit("AcknowledgeTimedOut", acknowledged_at=self.case["status_changed_at"],
                  timeout_seconds=(due_at - self.case["status_changed_at"]) // 1000)
        self.change_status(self.tenant.default_status, "ack_timeout", self.actor, automation=True)

    def sla_state(self) -> dict[str, int]:
        """SLA kind -> deadline (ms), for targets neither met nor already breached."""
        case = self.case
        sla = self.cfg.slas.get(case.get("priority") or "")
        if sla is None:
            return {}
        met = {"first_response": case.get("acknowledged_at"), "resolution": case.get("resolved_at")}
        seconds = {"first_response": sla.first_response_seconds, "resolution": sla.resolution_seconds}
        return {k: case["created_at"] + s * 1000 for k, s in seconds.items()
                if s is not None and met[k] is None and k not in (case.get("sla_breaches") or [])}

    def schedule_sla(self) -> None:
        pending = self.sla_state()
        if pending:
            self.set_timer("sla", min(pending.values()))
        else:
            self.cancel_timer("sla")

    def sla_due(self, due_at: int) -> None:
        for kind, deadline in sorted(self.sla_state().items(), key=lambda kv: kv[1]):
            if deadline <= due_at:
                event = self.emit("SlaBreached", sla=kind, priority=self.case["priority"], due_at=deadline)
                self.react(event, automation=True)
        self.schedule_sla()

    # -- automation ------------------------------------------------------------

    def automate(self, trigger: str, event: dict) -> None:
        for rule in self.cfg.automation_rules:
            if rule.trigger != trigger:
                continue
            if trigger == "status_changed" and rule.to_status and event["to_status"] != rule.to_status:
                continue
            if trigger == "occurrence_count" and event["occurrence_count"] != rule.count:
                continue
            if trigger == "sla_breached" and rule.sla and event["sla"] != rule.sla:
                continue
            if not matches(rule.conditions, self.case):
                continue
            actor = _automation_actor(rule)
            self.emit("AutomationApplied", actor=actor, rule_id=rule.id, trigger=trigger,
                      actions=[f"{a}:{v}" for a, v in rule.actions])
            for action, value in rule.actions:
                self.act(action, value, actor)

    def act(self, action: str, value: str, actor: dict) -> None:
        case = self.case
        if action == "set_priority":
            if case.get("priority") != value:
                event = self.emit("PriorityChanged", actor=actor, from_priority=case.get("priority"),
                                  to_priority=value)
                self.react(event, automation=False)
        elif action == "assign":
            if (case.get("assignee") or {}).get("id") != value:
                self.emit("Assigned", actor=actor, assignee=self.person(value), previous_assignee=case.get("assignee"))
        elif action == "comment":
            self.emit("CommentAdded", actor=actor, text=value)
        elif action == "set_status":
            self.change_status(value, "automation", actor, automation=False)
        elif action == "page":
            if value in self.cfg.policies and self.tenant.is_open(case["status"]):
                self.end_escalation("superseded")
                self.start_escalation(value, case.get("urgency") or "high", bool(case.get("is_shadow")))


def follow_up(tenant: Tenant, cfg, intake: Intake, d: Decision) -> Decision:
    """``d`` (the case change ``intake`` asked for) plus everything that follows from it."""
    cid = d.events[0]["case_id"]
    b = Builder(tenant, intake, d.entry, d.entry["cases"][cid])
    b.events = list(d.events)
    engine = _Engine(tenant, cfg, b, cid, intake.now, SYSTEM_ACTOR)
    for event in d.events:
        engine.react(event, automation=True)
    engine.done()
    return Decision(events=b.events, entry=b.entry, created=d.created, noop=d.noop)


def timer_intake(tenant: Tenant, timer: dict) -> Intake:
    """A due timer as the input of a decision: its id is derived from the timer id."""
    return Intake("timer", derive_id("timer", tenant.name, timer["timer_id"]), timer["kind"], timer["dedup_key"],
                  timer["case_id"], timer["due_at"], SYSTEM_ACTOR, {}, timer["due_at"])


def is_pending(entry: dict | None, timer: dict) -> bool:
    oc = ((entry or {}).get("oncall") or {}).get(timer["case_id"])
    return oc is not None and (oc["timers"].get(timer["kind"]) or {}).get("id") == timer["timer_id"]


def decide_timer(tenant: Tenant, cfg, timer: dict, entry: dict | None) -> Decision:
    """What a due timer does. A timer that is not pending (fired already,
    cancelled, or replaced) is a no-op: timers may be delivered twice."""
    intake = timer_intake(tenant, timer)
    if already_seen(entry, intake.event_id):
        return Decision(duplicate=True)
    if not is_pending(entry, timer):
        return Decision(noop=True)
    cid = timer["case_id"]
    b = Builder(tenant, intake, entry, entry["cases"][cid])
    engine = _Engine(tenant, cfg, b, cid, timer["due_at"], SYSTEM_ACTOR)
    engine.cancel_timer(timer["kind"])
    if timer["kind"] == "escalation":
        engine.escalate(timer["due_at"])
    elif timer["kind"] == "ack_timeout":
        engine.ack_timed_out(timer["due_at"])
    elif timer["kind"] == "sla":
        engine.sla_due(timer["due_at"])
    engine.done()
    return Decision(events=b.events, entry=b.entry, noop=not b.events)
