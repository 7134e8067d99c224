"""On-call schedules: who is on call for schedule S at time t. Pure.

The PagerDuty model:

* a schedule has a time zone, **layers** and **overrides**;
* a layer rotates through ``users``: shift *n* (counted from
  ``rotation_start``) belongs to ``users[n % len(users)]``. Shifts that are a
  whole number of days hand off at the local wall-clock time of
  ``rotation_start`` in the schedule's time zone (a weekly 09:00 handoff stays
  at 09:00 across daylight-saving changes); other shift lengths are exact
  durations;
* a layer may be **restricted** to windows (days of the week and a local
  start/end time; an end before the start crosses midnight); outside them
  the layer has nobody;
* later layers sit on top of earlier ones: the last layer with someone on
  call wins;
* an **override** (user, start, end) beats every layer while it lasts; the
  last one listed wins when they overlap.

``parse_schedule(name, data)`` validates plain data (from YAML) and names the
offending field in its error; ``on_call(schedule, at)`` answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DURATION = re.compile(r"^(\d+)(s|m|h|d|w)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ScheduleError(ValueError):
    """Invalid schedule data; the message names the field."""


@dataclass(frozen=True)
class Restriction:
    days: frozenset[int]   # 0 = Monday
    start: time
    end: time              # end <= start: the window crosses midnight

    def covers(self, local: datetime) -> bool:
        t = local.time().replace(tzinfo=None)
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= t < self.end
        # crosses midnight: either the evening part on a listed day, or the
        # morning part on the day after a listed day
        if t >= self.start:
            return local.weekday() in self.days
        if t < self.end:
            return (local.weekday() - 1) % 7 in self.days
        return False


@dataclass(frozen=True)
class Layer:
    name: str
    users: tuple[str, ...]
    rotation_start: datetime
    shift_seconds: int
    restrictions: tuple[Restriction, ...] = ()


@dataclass(frozen=True)
class Override:
    user: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Schedule:
    id: str
    tz: ZoneInfo
    layers: tuple[Layer, ...]
    overrides: tuple[Override, ...] = ()


@dataclass(frozen=True)
class OnCall:
    user: str
    source: str          # "override" or the layer name
    shift: int | None    # the layer's shift number (None for an override)


def shift_number(layer: Layer, at: datetime, tz: ZoneInfo) -> int | None:
    """Which shift of ``layer`` covers ``at`` (None before the rotation starts)."""
    if at < layer.rotation_start:
        return None
    if layer.shift_seconds % 86400 == 0:
        days = layer.shift_seconds // 86400
        start_local = layer.rotation_start.astimezone(tz)
        local = at.astimezone(tz)
        elapsed_days = (local.date() - start_local.date()).days
        # before today's handoff time, it is still the previous day's shift
        handoff_today = datetime.combine(local.date(), start_local.timetz().replace(tzinfo=None), tz)
        if local < handoff_today:
            elapsed_days -= 1
        return elapsed_days // days
    return int((at - layer.rotation_start).total_seconds()) // layer.shift_seconds


def on_call(schedule: Schedule, at: datetime) -> OnCall | None:
    """Who is on call at ``at`` (an aware datetime); None when nobody is."""
    if at.tzinfo is None:
        raise ValueError("on_call needs an aware datetime")
    for o in reversed(schedule.overrides):
        if o.start <= at < o.end:
            return OnCall(o.user, "override", None)
    local = at.astimezone(schedule.tz)
    for layer in reversed(schedule.layers):
        if layer.restrictions and not any(r.covers(local) for r in layer.restrictions):
            continue
        n = shift_number(layer, at, schedule.tz)
        if n is None:
            continue
        return OnCall(layer.users[n % len(layer.users)], layer.name, n)
    return None


# --------------------------------------------------------------------------
# parsing plain data (from YAML)
# --------------------------------------------------------------------------


def parse_duration(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _DURATION.match(str(value))
    if not m or int(m.group(1)) == 0:
        raise ScheduleError(f"{where}: a duration like 12h, 1d or 1w (or seconds), got {value!r}")
    return int(m.group(1)) * _UNIT[m.group(2)]


def _aware(value, where: str) -> datetime:
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            raise ScheduleError(f"{where}: an RFC 3339 time, got {value!r}") from None
    if dt.tzinfo is None:
        raise ScheduleError(f"{where}: needs a time zone offset (Z or +hh:mm)")
    return dt


def _clock(value, where: str) -> time:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML reads 09:00 as sexagesimal 540
        value = f"{value // 60:02d}:{value % 60:02d}"
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", str(value))
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59 or (int(m.group(1)) == 24 and int(m.group(2))):
        raise ScheduleError(f"{where}: a local time like \"09:00\", got {value!r}")
    h, mi = int(m.group(1)), int(m.group(2))
    return time(0, 0) if h == 24 else time(h, mi)


def parse_schedule(schedule_id: str, data: dict) -> Schedule:
    where = f"schedules.{schedule_id}"
    if not isinstance(data, dict):
        raise ScheduleError(f"{where}: a mapping with time_zone, layers and overrides")
    unknown = set(data) - {"time_zone", "layers", "overrides", "description"}
    if unknown:
        raise ScheduleError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    try:
        tz = ZoneInfo(str(data.get("time_zone", "UTC")))
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"{where}.time_zone: unknown time zone {data.get('time_zone')!r}") from None
    layers_data = data.get("layers")
    if not isinstance(layers_data, list) or not layers_data:
        raise ScheduleError(f"{where}.layers: at least one layer")
    layers = []
    for i, ld in enumerate(layers_data):
        lw = f"{where}.layers[{i}]"
        if not isinstance(ld, dict):
            raise ScheduleError(f"{lw}: a mapping with users, rotation_start and shift_length")
        users = ld.get("users")
        if not isinstance(users, list) or not users or not all(isinstance(u, str) and u for u in users):
            raise ScheduleError(f"{lw}.users: a non-empty list of user ids")
        restrictions = []
        for j, rd in enumerate(ld.get("restrictions") or []):
            rw = f"{lw}.restrictions[{j}]"
            days = rd.get("days", list(DAYS)) if isinstance(rd, dict) else None
            if not isinstance(days, list) or not days or any(d not in DAYS for d in days):
                raise ScheduleError(f"{rw}.days: a list of {', '.join(DAYS)}")
            start, end = _clock(rd.get("start"), f"{rw}.start"), _clock(rd.get("end"), f"{rw}.end")
            restrictions.append(Restriction(frozenset(DAYS.index(d) for d in days), start, end))
        layers.append(Layer(
            name=str(ld.get("name") or f"layer-{i + 1}"),
            users=tuple(users),
            rotation_start=_aware(ld.get("rotation_start"), f"{lw}.rotation_start"),
            shift_seconds=parse_duration(ld.get("shift_length"), f"{lw}.shift_length"),
            restrictions=tuple(restrictions),
        ))
    overrides = []
    for i, od in enumerate(data.get("overrides") or []):
        ow = f"{where}.overrides[{i}]"
        if not isinstance(od, dict) or not isinstance(od.get("user"), str):
            raise ScheduleError(f"{ow}: a mapping with user, start and end")
        start, end = _aware(od.get("start"), f"{ow}.start"), _aware(od.get("end"), f"{ow}.end")
        if end <= start:
            raise ScheduleError(f"{ow}: end must be after start")
        overrides.append(Override(od["user"], start, end))
    return Schedule(schedule_id, tz, tuple(layers), tuple(overrides))

