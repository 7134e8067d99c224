"""Escalation policies: which step runs, who is told, when the next step is due. Pure.

The PagerDuty / Datadog On-Call model:

* a policy has ordered **steps**; each has ``escalate_after_seconds``,
  ``targets`` (users, schedules -- whoever is on call *now* -- and teams) and
  an ``assignment``: ``notify_all`` targets, or ``round_robin`` (one target
  per run of the step, taking turns);
* after the last step the policy starts again from step 1, ``retries`` times
  (0-9); after that it ends, and resolves the page if
  ``resolve_page_on_policy_end``;
* acknowledge or resolve stops it; a **low urgency** page runs step 1 only
  and never escalates; a **shadow** page runs everything but every
  notification it asks for is marked shadow.

``start(...)`` and ``advance(...)`` take the escalation state (a plain dict,
stored with the page) and the time, and return the new state and the
*actions* the caller turns into domain events and a timer: ``step_started``,
``responders_added``, ``notify`` (one per target user), ``timer`` (when to
call ``advance`` next) and ``policy_ended``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from streams.domain.schedules import Schedule, on_call

ASSIGNMENTS = ("notify_all", "round_robin")
TARGET_KINDS = ("user", "schedule", "team")


class PolicyError(ValueError):
    """Invalid policy data; the message names the field."""


@dataclass(frozen=True)
class Target:
    kind: str   # user | schedule | team
    id: str


@dataclass(frozen=True)
class Step:
    id: str
    escalate_after_seconds: int
    targets: tuple[Target, ...]
    assignment: str = "notify_all"


@dataclass(frozen=True)
class Policy:
    id: str
    steps: tuple[Step, ...]
    retries: int = 0
    resolve_page_on_policy_end: bool = False


@dataclass(frozen=True)
class Directory:
    """What targets resolve against: schedules and teams."""

    schedules: dict[str, Schedule]
    teams: dict[str, tuple[str, ...]]


def resolve_targets(step: Step, directory: Directory, now: datetime) -> list[str]:
    """The users a step's targets mean at ``now`` (in target order, without repeats)."""
    users: list[str] = []
    for t in step.targets:
        if t.kind == "user":
            found = [t.id]
        elif t.kind == "schedule":
            oc = on_call(directory.schedules[t.id], now)
            found = [oc.user] if oc else []
        else:
            found = list(directory.teams.get(t.id, ()))
        users += [u for u in found if u not in users]
    return users


def _run_step(policy: Policy, state: dict, directory: Directory, now: datetime, shadow: bool,
              low_urgency: bool) -> tuple[dict, list[dict]]:
    step = policy.steps[state["step_index"]]
    users = resolve_targets(step, directory, now)
    if step.assignment == "round_robin" and users:
        turn = state["round_robin"].get(step.id, 0)
        users = [users[turn % len(users)]]
        state["round_robin"] = dict(state["round_robin"], **{step.id: turn + 1})
    actions: list[dict] = [{"action": "step_started", "step_id": step.id, "step_index": state["step_index"],
                            "retry": state["retry_count"]}]
    if users:
        actions.append({"action": "responders_added", "users": users, "step_id": step.id})
        actions += [{"action": "notify", "user": u, "step_id": step.id, "shadow": shadow} for u in users]
    if low_urgency:
        state["next_due_at"] = None  # low urgency: step 1 only, never escalates
    else:
        due = now + timedelta(seconds=step.escalate_after_seconds)
        state["next_due_at"] = due.isoformat()
        actions.append({"action": "timer", "due_at": due.isoformat(),
                        "timer_id": f"{policy.id}:{state['retry_count']}:{state['step_index']}"})
    return state, actions


def start(policy: Policy, directory: Directory, now: datetime, *, shadow: bool = False,
          low_urgency: bool = False) -> tuple[dict, list[dict]]:
    """A new page enters the policy: step 1 runs now."""
    state = {"policy_id": policy.id, "step_index": 0, "retry_count": 0, "round_robin": {},
             "next_due_at": None, "active": True, "shadow": shadow, "low_urgency": low_urgency}
    return _run_step(policy, state, directory, now, shadow, low_urgency)


def advance(policy: Policy, state: dict, directory: Directory, now: datetime,
            timer_id: str | None = None) -> tuple[dict, list[dict]]:
    """A timer fired: run the next step, loop, or end the policy.

    A stale timer (the policy was stopped, or this timer id is not the
    pending one) changes nothing: timers may be delivered more than once.
    """
    if not state.get("active") or state.get("next_due_at") is None:
        return state, []
    expected = f"{policy.id}:{state['retry_count']}:{state['step_index']}"
    if timer_id is not None and timer_id != expected:
        return state, []
    if now < datetime.fromisoformat(state["next_due_at"]):
        return state, []
    state = dict(state)
    if state["step_index"] + 1 < len(policy.steps):
        state["step_index"] += 1
    elif state["retry_count"] < policy.retries:
        state["step_index"] = 0
        state["retry_count"] += 1
    else:
        state.update(active=False, next_due_at=None)
        return state, [{"action": "policy_ended", "resolve": policy.resolve_page_on_policy_end}]
    return _run_step(policy, state, directory, now, state["shadow"], state["low_urgency"])


def stop(state: dict) -> dict:
    """Acknowledge or resolve: no further steps (pending timers become stale)."""
    return dict(state, active=False, next_due_at=None)


def parse_policy(policy_id: str, data: dict, directory: Directory) -> Policy:
    where = f"escalation_policies.{policy_id}"
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: a mapping with steps, retries, resolve_page_on_policy_end")
    unknown = set(data) - {"steps", "retries", "resolve_page_on_policy_end", "description"}
    if unknown:
        raise PolicyError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    retries = data.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 9:
        raise PolicyError(f"{where}.retries: an integer from 0 to 9, got {retries!r}")
    steps_data = data.get("steps")
    if not isinstance(steps_data, list) or not steps_data:
        raise PolicyError(f"{where}.steps: at least one step")
    steps = []
    for i, sd in enumerate(steps_data):
        sw = f"{where}.steps[{i}]"
        if not isinstance(sd, dict):
            raise PolicyError(f"{sw}: a mapping with escalate_after_seconds, targets, assignment")
        after = sd.get("escalate_after_seconds")
        if isinstance(after, bool) or not isinstance(after, int) or after < 60:
            raise PolicyError(f"{sw}.escalate_after_seconds: an integer of at least 60, got {after!r}")
        assignment = sd.get("assignment", "notify_all")
        if assignment not in ASSIGNMENTS:
            raise PolicyError(f"{sw}.assignment: one of {', '.join(ASSIGNMENTS)}, got {assignment!r}")
        targets = []
        for j, td in enumerate(sd.get("targets") or []):
            tw = f"{sw}.targets[{j}]"
            kinds = [k for k in TARGET_KINDS if isinstance(td, dict) and k in td]
            if len(kinds) != 1 or not isinstance(td[kinds[0]], str):
                raise PolicyError(f"{tw}: exactly one of user, schedule or team, e.g. {{schedule: primary}}")
            kind, tid = kinds[0], td[kinds[0]]
            if kind == "schedule" and tid not in directory.schedules:
                raise PolicyError(f"{tw}: unknown schedule {tid!r}; known: {', '.join(sorted(directory.schedules))}")
            if kind == "team" and tid not in directory.teams:
                raise PolicyError(f"{tw}: unknown team {tid!r}; known: {', '.join(sorted(directory.teams))}")
            targets.append(Target(kind, tid))
        if not targets:
            raise PolicyError(f"{sw}.targets: at least one target")
        steps.append(Step(str(sd.get("id") or f"step-{i + 1}"), after, tuple(targets), assignment))
    return Policy(policy_id, tuple(steps), retries, bool(data.get("resolve_page_on_policy_end", False)))
