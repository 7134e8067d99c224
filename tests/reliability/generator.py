"""Deterministic intake histories for the reliability suite: one seed decides every input.

A history is a list of :class:`Step`\\ s, performed in order, each acknowledged before the next
starts (so the order Kafka holds per key is the order of the list):

* ``kafka``: intake messages published straight to ``T.intake`` (as ``casestream send`` keys them);
* ``events``: one request to the gateway's native endpoint (``/v1/integrations/<key>/events``,
  a list of intake messages);
* ``pagerduty``: one PagerDuty Events API v2 request (``POST /v2/enqueue``); its message carries
  no ``event_id`` (the record is its identity) and, for a share of triggers, no ``dedup_key``
  either (the gateway answers the key it gave: the record's id).

What the inputs are: triggers, acknowledges and resolves over a pool of dedup keys per tenant,
case commands (``set_status``, ``assign``, ``comment``, ``set_priority``, naming the dedup key or
the case id), a share of triggers without ``event_id`` (the record is the identity: the same bytes
again are a second occurrence), and a share of exact redeliveries (the bytes of an earlier message
with an ``event_id`` sent again: no second effect). Actions follow a rough idea of each key's
state so that most inputs take effect; the rest (an acknowledge with nothing open, a transition
the tenant does not allow) are dead letters. The generator never decides what is right: the
checker's model does, from :meth:`Step.published` -- the bytes that reach ``T.intake``.

``notify`` keys (on-call): one trigger each (``source: notify``), never touched again, for a
notification rule to deliver: a delivery outcome lands after the case's last input (the
checker's rule for cases with deliveries).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import orjson

from streams.config import get_tenant
from streams.domain.intake import make_case_id
from streams.domain.monitors import translate

KAFKA, EVENTS, PAGERDUTY = "kafka", "events", "pagerduty"
GATEWAY = (EVENTS, PAGERDUTY)
SEVERITIES = ("critical", "error", "warning", "info")
PRIORITIES = ("P1", "P2", "P3", "P4", "P5")
PEOPLE = ({"id": "u-ann", "name": "Ann Gen", "email": "ann.gen@example.com"},
          {"id": "u-bob", "name": "Bob Gen", "email": "bob.gen@example.com"})


@dataclass
class Step:
    tenant: str
    source: str
    messages: list     # kafka: intake messages; events: the request's
    #                    messages; pagerduty: the one v2 event, without its routing_key
    redeliveries: int = 0

    def published(self) -> list[bytes]:
        """The records this step puts on ``T.intake``, in order (what the gateway publishes:
        its translation of the body, each message JSON-encoded)."""
        if self.source == PAGERDUTY:
            return [orjson.dumps(m) for m in translate(PAGERDUTY, self.messages[0], {})]
        return [orjson.dumps(m) for m in self.messages]


@dataclass
class _Key:
    name: str
    state: str = "none"      # none | open | acked | closed: the generator's guess, not the truth
    cases: int = 0           # cases opened so far (by the guess): the next case id's sequence


@dataclass
class Generator:
    """``steps(n)``: about ``n`` inputs (messages reaching ``T.intake``) for ``tenants``."""

    run_id: str
    tenants: tuple[str, ...] = ("case-management",)
    seed: int = 0
    keys: int = 40                 # dedup keys per tenant
    gateway: float = 0.15          # share of inputs through the gateway (half PagerDuty, half native)
    commands: float = 0.15
    redeliveries: float = 0.08
    no_event_id: float = 0.05      # share of triggers (Kafka or native gateway) without event_id
    no_dedup_key: float = 0.2      # share of PagerDuty triggers without dedup_key
    notify: int = 0                # notify keys (on-call only): one trigger each
    batch: int = 100               # messages per Kafka step
    per_request: int = 10          # messages per native gateway request
    rnd: random.Random = field(init=False)
    sent: dict[str, list[bytes]] = field(init=False)   # tenant -> messages with an event_id sent so far
    pool: dict[str, list[_Key]] = field(init=False)
    serial: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.rnd = random.Random(self.seed)
        self.sent = {t: [] for t in self.tenants}
        self.pool = {t: [_Key(f"{self.run_id}/{t[:2]}{i}") for i in range(self.keys)] for t in self.tenants}

    def steps(self, n: int) -> list[Step]:
        out: list[Step] = []
        notify = [f"{self.run_id}/notify{i}" for i in range(self.notify)] if "on-call" in self.tenants else []
        count = through_gateway = 0
        while count < n:
            tenant = self.rnd.choice(self.tenants)
            if count and through_gateway < self.gateway * count:
                if self.rnd.random() < 0.5:
                    step = Step(tenant, PAGERDUTY, [self._pagerduty(tenant)])
                else:
                    step = self._step(tenant, EVENTS, self.per_request)
                through_gateway += len(step.messages)
            else:
                step = self._step(tenant, KAFKA, min(self.batch, n - count))
            if notify and tenant == "on-call" and step.source != PAGERDUTY and self.rnd.random() < 0.5:
                step.messages.append(self._trigger(notify.pop(), source="notify"))
            out.append(step)
            count += len(step.messages)
        if notify:   # the rest, at the end
            out.append(Step("on-call", KAFKA, [self._trigger(k, source="notify") for k in notify]))
        return out

    # -- one step -------------------------------------------------------------------------------

    def _step(self, tenant: str, source: str, size: int) -> Step:
        step = Step(tenant, source, [])
        for _ in range(max(1, size)):
            if self.sent[tenant] and self.rnd.random() < self.redeliveries:
                again = self.rnd.choice(self.sent[tenant])
                step.messages.append(orjson.loads(again))
                step.redeliveries += 1
                continue
            msg = self._message(tenant, self.rnd.choice(self.pool[tenant]))
            if "event_id" in msg:
                self.sent[tenant].append(orjson.dumps(msg))
            step.messages.append(msg)
        return step

    def _tenant(self, name: str):
        """The tenant's configuration, read once (get_tenant parses tenants.yaml on every call)."""
        cache = self.__dict__.setdefault("_tenants", {})
        if name not in cache:
            cache[name] = get_tenant(name)
        return cache[name]

    def _next_id(self) -> str:
        self.serial += 1
        return f"{self.run_id}-g{self.serial}"

    def _trigger(self, key: str, **extra) -> dict:
        return {"event_id": self._next_id(), "action": "trigger", "dedup_key": key,
                "summary": f"{key} failing", "severity": self.rnd.choice(SEVERITIES), **extra}

    def _message(self, tenant: str, key: _Key) -> dict:
        r = self.rnd.random()
        if r < self.commands and key.state != "none":
            return self._command(tenant, key)
        if key.state in ("none", "closed") or r < 0.55:
            msg = self._trigger(key.name)
            if self.rnd.random() < self.no_event_id:
                del msg["event_id"]    # the record is its identity
            if key.state in ("none", "closed"):
                key.state, key.cases = "open", key.cases + 1
            return msg
        action = "acknowledge" if key.state == "open" and r < 0.75 else "resolve"
        key.state = "acked" if action == "acknowledge" else "closed"
        return {"event_id": self._next_id(), "action": action, "dedup_key": key.name}

    def _command(self, tenant: str, key: _Key) -> dict:
        t = self._tenant(tenant)
        msg = {"event_id": self._next_id(), "actor": self.rnd.choice(PEOPLE)}
        if self.rnd.random() < 0.2:
            msg["case_id"] = make_case_id(t, key.name, key.cases)
        else:
            msg["dedup_key"] = key.name
        kind = self.rnd.choice(("set_status", "assign", "comment", "set_priority"))
        msg["command"] = kind
        if kind == "set_status":
            msg["status"] = self.rnd.choice(t.statuses)
            key.state = {t.final_status: "closed", t.default_status: "open"}.get(msg["status"], "acked")
        elif kind == "assign":
            msg["assignee"] = self.rnd.choice(PEOPLE + (None,))
        elif kind == "comment":
            msg["text"] = f"note {self.serial}"
        else:
            msg["priority"] = self.rnd.choice(PRIORITIES)
        return msg

    def _pagerduty(self, tenant: str) -> dict:
        """A v2 event (no event_id: the record is its identity)."""
        key = self.rnd.choice(self.pool[tenant])
        if key.state in ("none", "closed") or self.rnd.random() < 0.5:
            self.serial += 1
            body = {"event_action": "trigger", "payload": {"summary": f"{self.run_id} pd {self.serial}",
                                                           "source": "pd-gen", "severity": self.rnd.choice(SEVERITIES)}}
            if self.rnd.random() >= self.no_dedup_key:
                body["dedup_key"] = key.name
                if key.state in ("none", "closed"):
                    key.state, key.cases = "open", key.cases + 1
            return body
        action = "acknowledge" if key.state == "open" else "resolve"
        key.state = "acked" if action == "acknowledge" else "closed"
        return {"event_action": action, "dedup_key": key.name}
