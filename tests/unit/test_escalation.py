"""Escalation policy stepping (streams/domain/escalation.py): steps, retries, round robin, urgency, shadow."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from streams.domain.escalation import Directory, PolicyError, advance, parse_policy, start, stop
from streams.domain.schedules import parse_schedule

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)

DIRECTORY = Directory(
    schedules={"primary": parse_schedule("primary", {"layers": [{
        "users": ["alice", "bob"], "rotation_start": "2026-11-23T00:00:00Z", "shift_length": "1d"}]})},
    teams={"dba": ("dan", "dora", "dave")},
)


def policy(**kw):
    data = {"steps": [
        {"id": "primary", "escalate_after_seconds": 300, "targets": [{"schedule": "primary"}]},
        {"id": "secondary", "escalate_after_seconds": 600, "targets": [{"user": "sam"}, {"team": "dba"}]},
    ], **kw}
    return parse_policy("db", data, DIRECTORY)


def notified(actions):
    return [a["user"] for a in actions if a["action"] == "notify"]


def timer(actions):
    (t,) = [a for a in actions if a["action"] == "timer"]
    return t


def test_steps_run_in_order_with_their_delays():
    p = policy()
    s, acts = start(p, DIRECTORY, T0)
    assert notified(acts) == ["bob"]  # 2026-11-24 is day 1 of the primary rotation
    assert acts[0] == {"action": "step_started", "step_id": "primary", "step_index": 0, "retry": 0}
    t = timer(acts)
    assert t["due_at"] == (T0 + timedelta(seconds=300)).isoformat()
    s2, none = advance(p, s, DIRECTORY, T0 + timedelta(seconds=299), t["timer_id"])
    assert none == [] and s2 == s                              # not due yet
    s, acts = advance(p, s, DIRECTORY, T0 + timedelta(seconds=300), t["timer_id"])
    assert notified(acts) == ["sam", "dan", "dora", "dave"]
    assert [a for a in acts if a["action"] == "responders_added"][0]["users"] == ["sam", "dan", "dora", "dave"]
    s, acts = advance(p, s, DIRECTORY, T0 + timedelta(seconds=900), timer(acts)["timer_id"])
    assert acts == [{"action": "policy_ended", "resolve": False}] and not s["active"]


def test_retries_loop_then_resolve_on_policy_end():
    p = policy(retries=1, resolve_page_on_policy_end=True)
    s, acts = start(p, DIRECTORY, T0)
    now, steps = T0, []
    for _ in range(4):
        t = timer(acts)
        now = datetime.fromisoformat(t["due_at"])
        s, acts = advance(p, s, DIRECTORY, now, t["timer_id"])
        steps += [(a["step_id"], a["retry"]) for a in acts if a["action"] == "step_started"]
        if not s["active"]:
            break
    assert steps == [("secondary", 0), ("primary", 1), ("secondary", 1)]
    assert acts == [{"action": "policy_ended", "resolve": True}]


def test_acknowledge_stops_and_stale_or_repeated_timers_do_nothing():
    p = policy()
    s, acts = start(p, DIRECTORY, T0)
    t = timer(acts)
    stopped = stop(s)
    assert advance(p, stopped, DIRECTORY, T0 + timedelta(hours=1), t["timer_id"]) == (stopped, [])
    s, acts = advance(p, s, DIRECTORY, T0 + timedelta(seconds=300), t["timer_id"])
    # the same timer delivered again (at-least-once) changes nothing
    assert advance(p, s, DIRECTORY, T0 + timedelta(seconds=301), t["timer_id"]) == (s, [])


def test_round_robin_takes_turns_across_runs_of_the_step():
    p = parse_policy("rr", {"retries": 2, "steps": [
        {"escalate_after_seconds": 60, "assignment": "round_robin", "targets": [{"team": "dba"}]}]}, DIRECTORY)
    s, acts = start(p, DIRECTORY, T0)
    who = [notified(acts)]
    for _ in range(2):
        t = timer(acts)
        s, acts = advance(p, s, DIRECTORY, datetime.fromisoformat(t["due_at"]), t["timer_id"])
        who.append(notified(acts))
    assert who == [["dan"], ["dora"], ["dave"]]


def test_low_urgency_notifies_step_one_only_and_never_escalates():
    p = policy(retries=3)
    s, acts = start(p, DIRECTORY, T0, low_urgency=True)
    assert notified(acts) == ["bob"] and not [a for a in acts if a["action"] == "timer"]
    assert advance(p, s, DIRECTORY, T0 + timedelta(days=1)) == (s, [])


def test_shadow_pages_run_everything_but_every_notification_is_shadow():
    p = policy()
    s, acts = start(p, DIRECTORY, T0, shadow=True)
    t = timer(acts)
    s, acts2 = advance(p, s, DIRECTORY, T0 + timedelta(seconds=300), t["timer_id"])
    notes = [a for a in acts + acts2 if a["action"] == "notify"]
    assert len(notes) == 5 and all(a["shadow"] for a in notes)


@pytest.mark.parametrize("data, field", [
    ({"steps": []}, "steps"),
    ({"retries": 10, "steps": [{"escalate_after_seconds": 60, "targets": [{"user": "a"}]}]}, "retries"),
    ({"steps": [{"escalate_after_seconds": 5, "targets": [{"user": "a"}]}]}, "escalate_after_seconds"),
    ({"steps": [{"escalate_after_seconds": 60, "targets": [{"schedule": "nope"}]}]}, "targets[0]"),
    ({"steps": [{"escalate_after_seconds": 60, "targets": [{"user": "a", "team": "dba"}]}]}, "targets[0]"),
    ({"steps": [{"escalate_after_seconds": 60, "targets": []}]}, "targets"),
    ({"steps": [{"escalate_after_seconds": 60, "assignment": "random", "targets": [{"user": "a"}]}]},
     "assignment"),
])
def test_invalid_policies_name_the_field(data, field):
    with pytest.raises(PolicyError) as err:
        parse_policy("p", data, DIRECTORY)
    assert field in str(err.value) and str(err.value).startswith("escalation_policies.p")
