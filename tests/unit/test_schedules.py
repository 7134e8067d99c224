"""On-call schedules (streams/domain/schedules.py): rotations, restrictions, overrides, time zones."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from streams.domain.schedules import ScheduleError, on_call, parse_duration, parse_schedule, shift_number

UTC = timezone.utc


def at(s: str) -> datetime:
    return datetime.fromisoformat(s)


def weekly(**extra):
    return parse_schedule("primary", {
        "time_zone": "Europe/Berlin",
        "layers": [{"name": "weekly", "users": ["alice", "bob", "carol"],
                    "rotation_start": "2026-11-02T09:00:00+01:00", "shift_length": "1w"}],
        **extra,
    })


def who(schedule, when: str) -> str | None:
    oc = on_call(schedule, at(when))
    return oc.user if oc else None


def test_weekly_rotation_across_shift_boundaries():
    s = weekly()
    assert who(s, "2026-11-02T08:59:59+01:00") is None          # before the rotation starts
    assert who(s, "2026-11-02T09:00:00+01:00") == "alice"
    assert who(s, "2026-11-09T08:59:59+01:00") == "alice"       # last second of shift 0
    assert who(s, "2026-11-09T09:00:00+01:00") == "bob"         # handoff
    assert who(s, "2026-11-16T09:00:00+01:00") == "carol"
    assert who(s, "2026-11-23T09:00:00+01:00") == "alice"       # wraps around
    assert who(s, "2026-11-23T08:00:00Z") == "alice"            # 09:00 Berlin, given in UTC


def test_day_multiple_shifts_hand_off_at_local_wall_clock_across_dst():
    s = parse_schedule("daily", {"time_zone": "Europe/Berlin", "layers": [{
        "users": ["a", "b"], "rotation_start": "2026-03-27T09:00:00+01:00", "shift_length": "1d"}]})
    # Berlin moves to summer time on 2026-03-29: the handoff stays at 09:00 local
    assert who(s, "2026-03-29T08:59:00+02:00") == "b"   # day 1 still (shift started 03-28 09:00)
    assert who(s, "2026-03-29T09:00:00+02:00") == "a"   # day 2 starts at 09:00 CEST = 07:00Z
    assert who(s, "2026-03-29T07:00:00Z") == "a"


def test_hourly_shifts_are_exact_durations():
    s = parse_schedule("h", {"layers": [{"users": ["x", "y", "z"], "rotation_start": "2026-01-01T00:00:00Z",
                                         "shift_length": "8h"}]})
    assert [who(s, f"2026-01-01T{h:02d}:00:00Z") for h in (0, 7, 8, 16, 23)] == ["x", "x", "y", "z", "z"]
    assert who(s, "2026-01-02T00:00:00Z") == "x"
    assert shift_number(s.layers[0], at("2026-01-02T00:00:00Z"), s.tz) == 3


def test_restrictions_and_layers_on_top():
    s = parse_schedule("biz", {"time_zone": "America/New_York", "layers": [
        {"name": "base", "users": ["night"], "rotation_start": "2026-01-01T00:00:00Z", "shift_length": "1w"},
        {"name": "business-hours", "users": ["ann", "ben"], "rotation_start": "2026-01-05T09:00:00-05:00",
         "shift_length": "1d", "restrictions": [{"days": ["mon", "tue", "wed", "thu", "fri"],
                                                 "start": "09:00", "end": "17:00"}]},
    ]})
    assert who(s, "2026-01-05T10:00:00-05:00") == "ann"     # Monday 10:00 New York: top layer
    assert who(s, "2026-01-06T10:00:00-05:00") == "ben"     # Tuesday
    assert who(s, "2026-01-05T17:00:00-05:00") == "night"   # window ends at 17:00
    assert who(s, "2026-01-10T10:00:00-05:00") == "night"   # Saturday: restricted away
    assert on_call(s, at("2026-01-05T10:00:00-05:00")).source == "business-hours"


def test_restriction_windows_crossing_midnight():
    s = parse_schedule("n", {"layers": [{"users": ["owl"], "rotation_start": "2026-01-01T00:00:00Z",
                                         "shift_length": "1w", "restrictions": [
                                             {"days": ["fri"], "start": "22:00", "end": "06:00"}]}]})
    assert who(s, "2026-01-02T23:00:00Z") == "owl"   # Friday night
    assert who(s, "2026-01-03T05:59:00Z") == "owl"   # Saturday early morning, same window
    assert who(s, "2026-01-03T06:00:00Z") is None
    assert who(s, "2026-01-03T23:00:00Z") is None    # Saturday night: not a listed day
    assert who(s, "2026-01-02T05:00:00Z") is None    # Friday morning belongs to Thursday's window


def test_overrides_win_and_the_last_one_listed_wins_overlaps():
    s = weekly(overrides=[
        {"user": "dave", "start": "2026-11-03T00:00:00+01:00", "end": "2026-11-04T00:00:00+01:00"},
        {"user": "erin", "start": "2026-11-03T12:00:00+01:00", "end": "2026-11-03T13:00:00+01:00"},
    ])
    assert who(s, "2026-11-03T11:00:00+01:00") == "dave"
    assert who(s, "2026-11-03T12:30:00+01:00") == "erin"
    assert who(s, "2026-11-04T00:00:00+01:00") == "alice"   # end is exclusive
    assert on_call(s, at("2026-11-03T11:00:00+01:00")).source == "override"


@pytest.mark.parametrize("data, field", [
    ({"layers": []}, "layers"),
    ({"layers": [{"users": [], "rotation_start": "2026-01-01T00:00:00Z", "shift_length": "1d"}]}, "users"),
    ({"layers": [{"users": ["a"], "rotation_start": "2026-01-01T00:00:00", "shift_length": "1d"}]}, "rotation_start"),
    ({"layers": [{"users": ["a"], "rotation_start": "2026-01-01T00:00:00Z", "shift_length": "0d"}]}, "shift_length"),
    ({"time_zone": "Mars/Olympus", "layers": [{"users": ["a"], "rotation_start": "2026-01-01T00:00:00Z",
                                                "shift_length": "1d"}]}, "time_zone"),
    ({"layers": [{"users": ["a"], "rotation_start": "2026-01-01T00:00:00Z", "shift_length": "1d",
                  "restrictions": [{"days": ["funday"], "start": "09:00", "end": "17:00"}]}]}, "days"),
    ({"layers": [{"users": ["a"], "rotation_start": "2026-01-01T00:00:00Z", "shift_length": "1d",
                  "restrictions": [{"start": "9am", "end": "17:00"}]}]}, "start"),
    ({"layers": [{"users": ["a"], "rotation_start": "2026-01-01T00:00:00Z", "shift_length": "1d"}],
      "overrides": [{"user": "b", "start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}]}, "overrides[0]"),
    ({"layers": [{"users": ["a"], "rotation_start": "2026-01-01T00:00:00Z", "shift_length": "1d"}], "colour": 1},
     "colour"),
])
def test_invalid_schedules_name_the_field(data, field):
    with pytest.raises(ScheduleError) as err:
        parse_schedule("s", data)
    assert field in str(err.value) and str(err.value).startswith("schedules.s")


def test_durations_and_yaml_sexagesimal_times():
    assert [parse_duration(v, "x") for v in ("90s", "15m", "12h", "1d", "2w", 300)] == [
        90, 900, 43200, 86400, 1209600, 300]
    # YAML 1.1 reads an unquoted 09:00 as 540; it still means 09:00
    s = parse_schedule("y", {"layers": [{"users": ["a"], "rotation_start": "2026-01-05T00:00:00Z",
                                         "shift_length": "1w",
                                         "restrictions": [{"days": ["mon"], "start": 540, "end": 1020}]}]})
    assert who(s, "2026-01-05T09:00:00Z") == "a" and who(s, "2026-01-05T08:59:00Z") is None


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        on_call(weekly(), datetime(2026, 11, 3, 12, 0))
    assert on_call(weekly(), datetime(2026, 11, 3, 12, 0, tzinfo=timezone.utc) + timedelta(0)).user == "alice"
