"""Status transitions per tenant: set_status commands and alert actions."""

from __future__ import annotations

from collections import deque

import pytest

from helpers import CM, OC, TENANTS, World, ack, only_event, resolve, set_status, trigger
from streams.config import load_tenants
from streams.domain.intake import INVALID_TRANSITION, NO_OPEN_CASE

# Written out on purpose: if tenants.yaml drifts, test_yaml_matches_expected fails.
STATUSES = {
    "case-management": ("OPEN", "IN_PROGRESS", "CLOSED"),
    "on-call": ("TRIGGERED", "ACKNOWLEDGED", "RESOLVED"),
}
ALLOWED = {
    "case-management": {("OPEN", "IN_PROGRESS"), ("OPEN", "CLOSED"), ("IN_PROGRESS", "CLOSED"),
                        ("CLOSED", "OPEN")},
    "on-call": {("TRIGGERED", "ACKNOWLEDGED"), ("TRIGGERED", "RESOLVED"), ("ACKNOWLEDGED", "RESOLVED"),
                ("ACKNOWLEDGED", "TRIGGERED")},
}
DEFAULT = {"case-management": "OPEN", "on-call": "TRIGGERED"}
ACTIONS = {
    "case-management": {"acknowledge": "IN_PROGRESS", "resolve": "CLOSED"},
    "on-call": {"acknowledge": "ACKNOWLEDGED", "resolve": "RESOLVED"},
}

PAIRS = [(name, a, b) for name, sts in STATUSES.items() for a in sts for b in sts if a != b]


def path_to(name: str, status: str) -> list[str]:
    """Statuses to set, one after the other, to get from the default to ``status``."""
    start = DEFAULT[name]
    prev = {start: None}
    todo = deque([start])
    while todo:
        s = todo.popleft()
        for a, b in sorted(ALLOWED[name]):
            if a == s and b not in prev:
                prev[b] = s
                todo.append(b)
    assert status in prev, f"{status} unreachable in {name}"
    out = []
    while status != start:
        out.append(status)
        status = prev[status]
    return out[::-1]


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_yaml_matches_expected(name):
    t = load_tenants()[name]
    assert t.statuses == STATUSES[name]
    assert t.default_status == DEFAULT[name]
    got = {(a, b) for a in t.statuses for b in t.statuses if a != b and t.allows(a, b)}
    assert got == ALLOWED[name]
    assert t.actions == ACTIONS[name]


def test_every_pair_is_covered():
    assert len(PAIRS) == 12
    assert len({p for p in PAIRS}) == 12


@pytest.mark.parametrize("name,frm,to", PAIRS, ids=[f"{n}:{a}->{b}" for n, a, b in PAIRS])
def test_set_status_every_pair(name, frm, to):
    tenant = TENANTS[name]
    w = World(tenant)
    cid = w.open_case("k1")
    for s in path_to(name, frm):
        d = w.send(set_status(s, case_id=cid))
        only_event(d, "StatusChanged")
    before = w.case(cid)
    assert before["status"] == frm

    d = w.send(set_status(to, case_id=cid))

    assert tenant.allows(frm, to) == ((frm, to) in ALLOWED[name])
    if (frm, to) in ALLOWED[name]:
        e = only_event(d, "StatusChanged")
        assert (e["from_status"], e["to_status"], e["reason"]) == (frm, to, "command")
        assert e["case_id"] == cid
        assert e["version"] == before["version"] + 1
        assert d.cases[cid]["status"] == to
        assert w.case(cid)["status"] == to
    else:
        assert d.rejection is not None
        assert d.rejection.reason == INVALID_TRANSITION
        assert f"{frm} -> {to}" in d.rejection.detail
        assert d.events == []
        assert d.cases == {}
        assert not d.noop and not d.duplicate
        assert w.case(cid) == before
        # the rejection is remembered with the key's (unchanged) entry
        assert d.entry is not None and d.entry["cases"][cid] == before
        assert w.events[-1]["version"] == before["version"]


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_set_status_to_same_status_is_noop(name):
    w = World(TENANTS[name])
    cid = w.open_case("k1")
    d = w.send(set_status(DEFAULT[name], case_id=cid))
    assert d.noop is True
    assert d.events == [] and d.cases == {} and d.rejection is None


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_alert_actions_map_to_statuses(name):
    tenant = TENANTS[name]
    w = World(tenant)
    cid = w.open_case("k1")

    e = only_event(w.send(ack("k1")), "StatusChanged")
    assert (e["from_status"], e["to_status"], e["reason"]) == (
        DEFAULT[name], ACTIONS[name]["acknowledge"], "alert_acknowledge")
    case = w.case(cid)
    assert case["status"] == ACTIONS[name]["acknowledge"]
    assert case["acknowledged_at"] == e["occurred_at"]
    assert w.key("k1")["open_case_id"] == cid  # still open

    e = only_event(w.send(resolve("k1")), "StatusChanged")
    assert (e["from_status"], e["to_status"], e["reason"]) == (
        ACTIONS[name]["acknowledge"], ACTIONS[name]["resolve"], "alert_resolve")
    case = w.case(cid)
    assert case["status"] == ACTIONS[name]["resolve"] == tenant.final_status
    assert case["resolved_at"] == e["occurred_at"]
    ks = w.key("k1")
    assert ks["open_case_id"] is None
    assert ks["last_case_id"] == cid


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_resolve_straight_from_default(name):
    w = World(TENANTS[name])
    cid = w.open_case("k1")
    e = only_event(w.send(resolve("k1")), "StatusChanged")
    assert (e["from_status"], e["to_status"]) == (DEFAULT[name], ACTIONS[name]["resolve"])
    assert w.case(cid)["acknowledged_at"] is None


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_acknowledge_twice_is_noop(name):
    w = World(TENANTS[name])
    cid = w.open_case("k1")
    only_event(w.send(ack("k1")), "StatusChanged")
    before = w.case(cid)
    d = w.send(ack("k1"))
    assert d.noop is True
    assert d.events == []
    assert d.cases == {}
    assert d.rejection is None
    assert d.entry is not None and d.entry["open_case_id"] == cid
    assert w.case(cid) == before


@pytest.mark.parametrize("name", sorted(STATUSES))
@pytest.mark.parametrize("action", [ack, resolve])
def test_alert_action_after_resolve_has_no_open_case(name, action):
    w = World(TENANTS[name])
    w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    d = w.send(action("k1", event_id="late"))
    assert d.rejection is not None and d.rejection.reason == NO_OPEN_CASE
    assert d.events == [] and d.cases == {}
    # a known key: the rejection comes with the entry, so it is remembered
    assert d.entry is not None and d.entry["dedup_key"] == "k1"
    assert "late" in w.key("k1")["seen"]


def test_reopen_refused_while_key_has_another_open_case():
    w = World(CM)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    c2 = w.open_case("k1")
    assert c2 != c1
    before = w.case(c1)

    d = w.send(set_status("OPEN", case_id=c1))

    assert d.rejection is not None
    assert d.rejection.reason == INVALID_TRANSITION
    assert c2 in d.rejection.detail
    assert d.events == [] and d.cases == {}
    assert w.case(c1) == before
    assert w.case(c1)["status"] == "CLOSED"
    assert w.key("k1")["open_case_id"] == c2


def test_reopen_allowed_when_key_has_no_open_case():
    w = World(CM)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    assert w.case(c1)["resolved_at"] is not None

    e = only_event(w.send(set_status("OPEN", case_id=c1)), "StatusChanged")
    assert (e["from_status"], e["to_status"]) == ("CLOSED", "OPEN")
    assert w.key("k1")["open_case_id"] == c1
    assert w.case(c1)["resolved_at"] is None
    # the reopened case is the key's open case again: a trigger deduplicates into it
    e = only_event(w.send(trigger("k1")), "AlertDeduplicated")
    assert e["case_id"] == c1
    assert e["occurrence_count"] == 2


def test_reopen_by_dedup_key_targets_last_case():
    w = World(CM)
    c1 = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    e = only_event(w.send(set_status("OPEN", dedup_key="k1")), "StatusChanged")
    assert e["case_id"] == c1
    assert w.key("k1")["open_case_id"] == c1


def test_on_call_resolved_is_terminal():
    w = World(OC)
    cid = w.open_case("k1")
    only_event(w.send(resolve("k1")), "StatusChanged")
    for s in ("TRIGGERED", "ACKNOWLEDGED"):
        d = w.send(set_status(s, case_id=cid))
        assert d.rejection is not None and d.rejection.reason == INVALID_TRANSITION


CUSTOM = """\
tenants:
  strict:
    display_name: Strict
    case_type: STRICT
    work_type: TASK
    case_id_prefix: ST
    statuses: [NEW, TRIAGED, ACKED, DONE]
    default_status: NEW
    final_status: DONE
    transitions:
      NEW: [TRIAGED, DONE]
      TRIAGED: [ACKED, DONE]
      ACKED: [DONE]
      DONE: []
    actions:
      acknowledge: ACKED
      resolve: DONE
"""


def test_alert_acknowledge_not_allowed_from_status_is_invalid_transition(tmp_path):
    p = tmp_path / "tenants.yaml"
    p.write_text(CUSTOM)
    tenant = load_tenants(p)["strict"]
    w = World(tenant)
    cid = w.open_case("k1")
    d = w.send(ack("k1"))  # NEW -> ACKED is not a transition
    assert d.rejection is not None and d.rejection.reason == INVALID_TRANSITION
    assert "NEW -> ACKED" in d.rejection.detail
    assert d.events == [] and d.cases == {}
    assert d.entry is not None and d.entry["open_case_id"] == cid
    assert w.case(cid)["status"] == "NEW"
    only_event(w.send(set_status("TRIAGED", case_id=cid)), "StatusChanged")
    e = only_event(w.send(ack("k1")), "StatusChanged")
    assert (e["from_status"], e["to_status"]) == ("TRIAGED", "ACKED")
