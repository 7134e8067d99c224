"""Small builders for unit tests: intake messages (dict -> orjson bytes ->
``parse``) and ``World``, a convenience wrapper over
``streams.stage.memory.MemoryStage`` (the apply stage over dicts).
"""

from __future__ import annotations

import orjson

from streams.config import Tenant, load_tenants
from streams.domain import cases as domain
from streams.domain.intake import Intake, Rejection, derive_id, parse
from streams.stage.memory import MemoryStage

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
    """A thin test wrapper over :class:`streams.stage.memory.MemoryStage`.

    ``MemoryStage.handle`` runs the apply stage (``streams.stage.apply.ApplyBatch``:
    lookup, decide, outputs, index and entry writes, remember) exactly like
    ``agents/intake.py``; this wrapper
    only adds conveniences: messages without an ``event_id`` get a fresh one
    (``e1``, ``e2``, ...) and, without a ``timestamp``, a received time one
    second after the last; the domain events are kept in order; and the
    stored state is read back through orjson, like the RocksDB tables.
    """

    def __init__(self, tenant: Tenant, prefix: str = "e"):
        self.tenant = tenant
        self.prefix = prefix
        self.mem = MemoryStage(tenant)
        self.events: list[dict] = []
        self.n = 0

    @property
    def entries(self) -> dict[str, dict]:
        return self.mem.entries

    @property
    def index(self) -> dict[str, str]:
        return self.mem.index

    def key(self, dedup_key: str) -> dict | None:
        """The stored entry of ``dedup_key`` (a JSON round-tripped copy)."""
        v = self.mem.entries.get(dedup_key)
        return orjson.loads(orjson.dumps(v)) if v is not None else None

    def case(self, case_id: str) -> dict | None:
        """The stored (compact) state of ``case_id``, found through the index."""
        dedup_key = self.mem.index.get(case_id)
        entry = self.key(dedup_key) if dedup_key is not None else None
        return entry["cases"].get(case_id) if entry else None

    @property
    def cases(self) -> dict[str, dict]:
        """Every case kept in stream state, all keys together."""
        return {cid: c for e in self.mem.entries.values() for cid, c in e["cases"].items()}

    def to_intake(self, msg) -> Intake:
        if isinstance(msg, Intake):
            return msg
        self.n += 1
        msg = dict(msg)
        msg.setdefault("event_id", f"{self.prefix}{self.n}")
        return intake(self.tenant, msg, T0 + self.n * 1000)

    def send(self, msg, offset: int | None = None) -> domain.Decision:
        d = self.mem.handle(self.to_intake(msg), offset)
        self.events.extend(d.events)
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


# --------------------------------------------------------------------------
# on-call events (escalation, responders, notifications, SLA, automation)
# --------------------------------------------------------------------------

CAROL = {"id": "u-carol", "name": None, "email": None}


def emit(w: World, case_id: str, etype: str, *, at: int | None = None, actor: dict | None = None,
         **payload) -> dict:
    """Append a domain event of ``etype`` to ``case_id`` in ``w``, the way a
    producer of on-call events would: the next version, a derived event id,
    folded into the stored case (so later ``decide`` calls see it)."""
    dedup_key = w.mem.index[case_id]
    entry = w.mem.entries[dedup_key]
    case = entry["cases"][case_id]
    w.n += 1
    caused_by = f"{w.prefix}{w.n}"
    version = case["version"] + 1
    event = {
        "event_id": derive_id("domain", w.tenant.name, case_id, str(version), caused_by),
        "type": etype, "tenant": w.tenant.name, "case_id": case_id, "dedup_key": dedup_key,
        "version": version, "occurred_at": at if at is not None else T0 + w.n * 1000,
        "caused_by": caused_by, "actor": actor, **payload,
    }
    new = domain.compact(domain.apply(w.tenant, case, event))
    w.mem.entries[dedup_key] = dict(entry, cases={**entry["cases"], case_id: new})
    w.events.append(event)
    return event


def oncall_scenario(w: World, key: str = "prod/db") -> list[dict]:
    """One page through every on-call event type, plus a low-urgency page
    (no next escalation). Returns the events it added (also in ``w.events``)."""
    start = len(w.events)
    cid = w.open_case(key, severity="critical", priority="P2")
    emit(w, cid, "AutomationApplied", rule_id="rule-db", trigger="case_created",
         actions=["set_priority:P1", "add_tag:db"])
    at = T0 + (w.n + 1) * 1000
    emit(w, cid, "EscalationStepStarted", at=at, escalation_policy_id="ep-db", escalation_policy_step_id="ep-db-s1",
         step_index=0, escalation_policy_retry_count=0, urgency="high", is_shadow=False,
         targets=[{"kind": "user", "id": ALICE["id"]}, {"kind": "schedule", "id": "sch-primary"},
                  {"kind": "team", "id": "team-db"}],
         next_escalation_at=at + 300_000)
    emit(w, cid, "RespondersAdded", escalation_policy_step_id="ep-db-s1", responders=[ALICE, CAROL])
    for user in (ALICE, CAROL):
        emit(w, cid, "NotificationRequested", notification_id=derive_id("notify", cid, user["id"]),
             user_id=user["id"], escalation_policy_id="ep-db", escalation_policy_step_id="ep-db-s1",
             escalation_policy_retry_count=0, urgency="high", is_shadow=False, reason="escalation")
    emit(w, cid, "RespondersAdded", escalation_policy_step_id=None, responders=[BOB], actor=ALICE)
    emit(w, cid, "NotificationRequested", notification_id=derive_id("notify", cid, BOB["id"]), user_id=BOB["id"],
         escalation_policy_id=None, escalation_policy_step_id=None, escalation_policy_retry_count=0,
         urgency=None, is_shadow=False, reason="automation")
    acked = w.send(ack(key)).events[-1]
    emit(w, cid, "EscalationEnded", escalation_policy_id="ep-db", reason="acknowledged", resolves_page=False)
    emit(w, cid, "AcknowledgeTimedOut", acknowledged_at=acked["occurred_at"], timeout_seconds=1800)
    emit(w, cid, "SlaBreached", sla="resolution", priority="P2", due_at=w.events[start]["occurred_at"] + 3_600_000)
    # delivery outcomes of those notifications
    emit(w, cid, "NotificationDelivered", delivery_id=derive_id("delivery", cid, "a"), endpoint="user:u-alice:webhook",
         channel="webhook", attempts=1, status_code=200, notification_id=derive_id("notify", cid, ALICE["id"]),
         user_id=ALICE["id"])
    emit(w, cid, "NotificationFailed", delivery_id=derive_id("delivery", cid, "c"), endpoint="ops-slack",
         channel="slack", attempts=3, reason="410 Gone", permanent=True, status_code=410, notification_id=None,
         user_id=None)
    emit(w, cid, "EndpointDisabled", endpoint="ops-slack", channel="slack", consecutive_failures=5, reason="410 Gone")
    # a shadow, low-urgency page: step 1 only, no next escalation
    low = w.open_case(f"{key}/low", urgency="low")
    emit(w, low, "EscalationStepStarted", escalation_policy_id="ep-db", escalation_policy_step_id="ep-db-s1",
         step_index=0, escalation_policy_retry_count=0, urgency="low", is_shadow=True,
         targets=[{"kind": "user", "id": BOB["id"]}], next_escalation_at=None)
    return w.events[start:]
