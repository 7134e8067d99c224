"""SLA maths: deadlines and breaches per priority. Pure; times are epoch milliseconds.

An SLA per priority sets a time to first response (the case is acknowledged:
``acknowledged_at``) and a time to resolution (``resolved_at``), both counted
from ``created_at``. A changed priority moves the deadlines (they are always
computed from the current priority). A target is breached when its deadline
passed before it was met -- or has passed and it is still unmet.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.domain.schedules import parse_duration

KINDS = ("first_response", "resolution")


class SlaError(ValueError):
    pass


@dataclass(frozen=True)
class Sla:
    priority: str
    first_response_seconds: int | None
    resolution_seconds: int | None


def parse_slas(data: dict) -> dict[str, Sla]:
    if not isinstance(data, dict):
        raise SlaError("slas: a mapping of priority -> {first_response, resolution}")
    out = {}
    for prio, d in data.items():
        where = f"slas.{prio}"
        if prio not in ("P1", "P2", "P3", "P4", "P5"):
            raise SlaError(f"{where}: priorities are P1-P5")
        if not isinstance(d, dict) or not set(d) <= set(KINDS) or not d:
            raise SlaError(f"{where}: give first_response and/or resolution, e.g. {{first_response: 15m}}")
        try:
            fr = parse_duration(d["first_response"], f"{where}.first_response") if "first_response" in d else None
            res = parse_duration(d["resolution"], f"{where}.resolution") if "resolution" in d else None
        except ValueError as exc:
            raise SlaError(str(exc)) from None
        if fr is not None and res is not None and res < fr:
            raise SlaError(f"{where}: resolution must not be shorter than first_response")
        out[prio] = Sla(prio, fr, res)
    return out


def deadlines(case: dict, slas: dict[str, Sla]) -> dict[str, int]:
    """kind -> due time (ms) for the case's current priority (empty without an SLA)."""
    sla = slas.get(case.get("priority") or "")
    if sla is None:
        return {}
    out = {}
    if sla.first_response_seconds is not None:
        out["first_response"] = case["created_at"] + sla.first_response_seconds * 1000
    if sla.resolution_seconds is not None:
        out["resolution"] = case["created_at"] + sla.resolution_seconds * 1000
    return out


def breaches(case: dict, slas: dict[str, Sla], now_ms: int) -> dict[str, int]:
    """kind -> due time, for every target breached by ``now_ms``."""
    met_at = {"first_response": case.get("acknowledged_at"), "resolution": case.get("resolved_at")}
    out = {}
    for kind, due in deadlines(case, slas).items():
        met = met_at[kind]
        if (met is not None and met > due) or (met is None and now_ms >= due):
            out[kind] = due
    return out


def next_due(case: dict, slas: dict[str, Sla]) -> int | None:
    """When the next SLA timer should fire for this case (None: nothing pending)."""
    met_at = {"first_response": case.get("acknowledged_at"), "resolution": case.get("resolved_at")}
    pending = [due for kind, due in deadlines(case, slas).items() if met_at[kind] is None]
    return min(pending) if pending else None
