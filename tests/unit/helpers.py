"""Small builders for unit tests: intake messages (dict -> orjson bytes ->
``parse``) and an in-memory stand-in for the keys/cases tables that drives
``streams.domain.cases.decide`` the way ``agents/intake.py`` does.
"""

from __future__ import annotations

import orjson

from streams.config import Tenant, load_tenants
from streams.domain import cases as domain
from streams.domain.intake import Intake, Rejection, parse

TENANTS = load_tenants()
CM = TENANTS["case-management"]
OC = TENANTS["on-call"]

T0 = 1_795_514_400_000  # 2026-11-24T10:00:00Z in epoch ms

ALICE = {"id": "u-alice", "name": "Alice Doe", "email": "alice@example.com"}
BOB = {"id": "u-bob", "name": "Bob Roe", "email": "bob@example.com"}


def raw(msg) -> bytes:
    return orjson.dumps(msg)


def parse_msg(tenant: Tenant, msg, received_ms: int = T0) -> Intake | Rejection:
    return parse(raw(msg), tenant, received_ms)


def intake(tenant: Tenant, msg, received_ms: int = T0) -> Intake:
    r = parse_msg(tenant, msg, received_ms)
    assert isinstance(r, Intake), f"expected an Intake, got {r!r}"
    return r


def rejection(tenant: Tenant, msg, received_ms: int = T0) -> Rejection:
    r = parse_msg(tenant, msg, received_ms)
    assert isinstance(r, Rejection), f"expected a Rejection, got {r!r}"
    return r


def trigger(key: str | None, summary: str = "disk full on db-1", **kw) -> dict:
    msg = {"action": "trigger", "summary": summary, **kw}
    if key is not None:
        msg["dedup_key"] = key
    return msg


def ack(key: str, **kw) -> dict:
    return {"action": "acknowledge", "dedup_key": key, **kw}


def resolve(key: str, **kw) -> dict:
    return {"action": "resolve", "dedup_key": key, **kw}


def command(op: str, *, case_id: str | None = None, dedup_key: str | None = None,
            actor: dict | None = None, **kw) -> dict:
    msg = {"command": op, "actor": actor or ALICE, **kw}
    if case_id is not None:
        msg["case_id"] = case_id
    if dedup_key is not None:
        msg["dedup_key"] = dedup_key
    return msg


def set_status(status: str, **kw) -> dict:
    return command("set_status", status=status, **kw)


class World:
    """The keys and cases tables of one tenant, kept in dicts.

    ``send`` does what ``apply_cases`` does for one routed message: look up
    the key and case state, ``decide``, store the new state and ``remember``
    the outputs. State goes through orjson like the RocksDB tables.
    Messages without an ``event_id`` get a fresh one (``e1``, ``e2``, ...)
    and, without a ``timestamp``, a received time one second after the last.
    """

    def __init__(self, tenant: Tenant, prefix: str = "e"):
        self.tenant = tenant
        self.prefix = prefix
        self.keys: dict[str, bytes] = {}
        self.cases: dict[str, bytes] = {}
        self.events: list[dict] = []
        self.n = 0

    def key(self, dedup_key: str) -> dict | None:
        v = self.keys.get(dedup_key)
        return orjson.loads(v) if v is not None else None

    def case(self, case_id: str) -> dict | None:
        v = self.cases.get(case_id)
        return orjson.loads(v) if v is not None else None

    def lookup(self, it: Intake) -> tuple[dict | None, dict | None]:
        if it.case_id is not None:
            case = self.case(it.case_id)
            ks = self.key(case["dedup_key"]) if case else None
        else:
            ks = self.key(it.dedup_key)
            cid = domain.target_case_id(it, ks)
            case = self.case(cid) if cid else None
        return ks, case

    def to_intake(self, msg) -> Intake:
        if isinstance(msg, Intake):
            return msg
        self.n += 1
        msg = dict(msg)
        msg.setdefault("event_id", f"{self.prefix}{self.n}")
        return intake(self.tenant, msg, T0 + self.n * 1000)

    def send(self, msg) -> domain.Decision:
        it = self.to_intake(msg)
        ks, case = self.lookup(it)
        d = domain.decide(self.tenant, it, ks, case)
        if d.duplicate:
            return d
        self.events.extend(d.events)
        for cid, state in d.cases.items():
            self.cases[cid] = orjson.dumps(state)
        outputs = [["domain-events", e["case_id"], e] for e in d.events]
        if d.rejection is not None:
            outputs.append(["dlq", it.dedup_key or it.case_id, {"reason": d.rejection.reason}])
        if d.key_state is not None:
            ks2 = domain.remember(d.key_state, it.event_id, outputs)
            self.keys[ks2["dedup_key"]] = orjson.dumps(ks2)
        return d

    def open_case(self, key: str = "k1", **kw) -> str:
        """Trigger ``key`` and return the id of its open case."""
        d = self.send(trigger(key, **kw))
        assert d.rejection is None and d.events, d
        return d.events[-1]["case_id"]

    def events_of(self, case_id: str) -> list[dict]:
        return [e for e in self.events if e["case_id"] == case_id]


def only_event(d: domain.Decision, etype: str) -> dict:
    assert d.rejection is None, d.rejection
    assert not d.duplicate and not d.noop
    assert [e["type"] for e in d.events] == [etype]
    return d.events[0]
