"""The delivery stage, without Faust or HTTP: what a notification record does, and what is due.

:class:`Deliverer` holds what the ``notify`` agent (``agents/notify.py``)
keeps in memory -- the attempts in flight and a circuit breaker per
endpoint -- and decides:

* :meth:`Deliverer.handle` -- one ``T.notifications`` record (a delivery
  request, an attempt's result, a retry asked by ``casestream dlq replay``,
  an endpoint's health update) against the ``deliveries`` and
  ``delivery_outcomes`` tables, read through a callable: the table writes
  and the records to send, in order (:class:`Effects`). The agent applies
  the writes at once, so the next record of its batch reads them;
* :meth:`Deliverer.due` -- which pending deliveries to attempt now, and which
  to refuse (endpoint removed or disabled) with a result record;
* :func:`attempt_request` -- the body and headers of one attempt (webhook or
  Slack), and :func:`result_record` -- the record of its result.

The agent makes the HTTP calls (``streams/outbound.py``), applies the
writes, sends the records, and keeps metrics and logs from ``Effects``.
Policy (classification, backoff, breaker, endpoint health) is
``streams.domain.delivery``.

Imports: see ``streams/stage/__init__.py`` (no Faust, no clients).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Callable

import orjson

from streams.domain import delivery as policy
from streams.domain.intake import NOTIFICATION_FAILED, Rejection, routing_token
from streams.domain.notify import endpoint_for
from streams.domain.slack import slack_message
from streams.domain.webhook import DELIVERY_ID_HEADER, webhook_body, webhook_headers
from streams.stage.route import dead_letter


class Store(enum.Enum):
    DELIVERIES = "deliveries"                # delivery id -> pending delivery; "endpoint:<name>" -> its health
    OUTCOMES = "delivery_outcomes"           # delivery id -> final outcome (and its report)


class Topic(enum.Enum):
    TIMERS = "timers"                        # outcome reports, keyed like the case (the apply agent records them)
    NOTIFICATIONS = "notifications"          # endpoint health updates, refusals (results)


@dataclass(frozen=True)
class Put:
    """A table write (``value`` None deletes)."""

    table: Store
    key: str
    value: bytes | None


@dataclass(frozen=True)
class Send:
    topic: Topic
    key: bytes
    value: bytes


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter to send to ``T.dlq`` (the sender stamps ``dead_lettered_at``)."""

    record: dict
    key: bytes


@dataclass
class Effects:
    """What one notification record does: ``actions`` (table writes, records to send, dead letters of
    failed deliveries -- ``casestream dlq replay`` retries them --, in order), and what the
    agent reports about it (metrics, logs)."""

    actions: list[Put | Send | DeadLetter] = field(default_factory=list)
    outcome: tuple[str, str] | None = None          # (channel, outcome kind) of a settled attempt
    breaker: tuple[str, str] | None = None          # (endpoint, breaker state) after recording an attempt
    disabled: tuple[str, int, str] | None = None    # (endpoint, permanent failures in a row, reason): just disabled
    retried: tuple[str, str] | None = None          # (delivery id, endpoint) of a failed delivery made pending again

    def put(self, table: Store, key: str, value: dict | None) -> None:
        self.actions.append(Put(table, key, orjson.dumps(value) if value is not None else None))

    def send(self, topic: Topic, key: str, value: dict) -> None:
        self.actions.append(Send(topic, key.encode(), orjson.dumps(value)))


@dataclass
class Due:
    """What a scan of the pending deliveries found: ``attempts`` to make now (delivery, endpoint,
    attempt number), ``refusals`` (result records to send), and how many are pending."""

    attempts: list[tuple[dict, object, int]] = field(default_factory=list)
    refusals: list[Send] = field(default_factory=list)
    pending: int = 0


class Deliverer:
    """The delivery decisions of one worker. ``rand``: the jitter of retry backoffs."""

    def __init__(self, rand: Callable[[], float] = random.random):
        self.rand = rand
        self.inflight: dict[str, int] = {}            # delivery id -> attempt in flight
        self.breakers: dict[str, policy.CircuitBreaker] = {}

    def breaker(self, cfg, name: str) -> policy.CircuitBreaker:
        if name not in self.breakers:
            d = cfg.delivery
            self.breakers[name] = policy.CircuitBreaker(d.breaker_failures, d.breaker_open,
                                                        max(d.breaker_open, 3600.0))
        return self.breakers[name]

    def forget_removed(self, cfg) -> list[str]:
        """Drop the breakers of endpoints no longer configured (the agent drops their metric series):
        however often a reload changes the endpoints, there are no more of them than configured."""
        removed = [n for n in self.breakers if endpoint_for(cfg, n) is None]
        for name in removed:
            del self.breakers[name]
        return removed

    # -- a notification record ------------------------------------------------------------------

    def handle(self, msg: dict, cfg, clock: Callable[[], float], load: Callable[[Store, str], dict | None],
               source: tuple[str, int, int]) -> Effects:
        """One ``T.notifications`` record. ``clock``: the worker's clock (s), asked when a delivery
        becomes pending; ``source``: the record's (topic, partition, offset), for a dead letter."""
        fx = Effects()
        if msg["kind"] == "endpoint":
            self._endpoint_outcome(fx, msg, cfg, load)
            return fx
        did = msg["delivery_id"]
        state = load(Store.DELIVERIES, did) or load(Store.OUTCOMES, did)  # pending, else final, else None
        if msg["kind"] == "request":
            if state is None:
                now = clock()
                fx.put(Store.DELIVERIES, did, {"delivery_id": did, "state": "pending", "attempts": 0,
                                               "first_at": now, "next_at": now, "request": msg})
            return fx
        if msg["kind"] == "retry":  # `casestream dlq replay` of a failed delivery, after a fix
            if state is not None and state["state"] == "failed":
                request, now = {k: v for k, v in msg.items() if k != "kind"}, clock()
                fx.put(Store.DELIVERIES, did, {"delivery_id": did, "state": "pending", "attempts": 0,
                                               "first_at": now, "next_at": now,
                                               "request": dict(request, kind="request")})
                fx.retried = (did, msg.get("endpoint"))
            return fx
        if msg["kind"] != "result":
            return fx
        if self.inflight.get(did) == msg["attempt"]:
            del self.inflight[did]
        if state is None or state["state"] != "pending" or msg["attempt"] != state["attempts"] + 1:
            if state is not None and state.get("report") and msg["attempt"] == state["attempts"]:
                # the result that finished it, redelivered: a crash may have lost the outcome report
                # after the tables had it, so it goes again (the apply agent records it once)
                fx.send(Topic.TIMERS, routing_token(state["report"]["dedup_key"]), state["report"])
            return fx  # a result already applied (redelivered), or for a finished delivery
        self._settle(fx, did, state, msg, cfg, source)
        return fx

    def _settle(self, fx: Effects, did: str, state: dict, msg: dict, cfg, source: tuple[str, int, int]) -> None:
        req, at, attempts = state["request"], msg["at"], msg["attempt"]
        name, channel = req["endpoint"], req["channel"]
        if msg.get("refused"):
            outcome = policy.Outcome(policy.PERMANENT, None, msg["reason"])
        else:
            outcome = policy.classify(msg.get("status"), msg.get("error"), msg.get("retry_after"), at)
            self.breaker(cfg, name).record(outcome.kind == policy.DELIVERED, at)
            fx.breaker = (name, self.breaker(cfg, name).state)
        fx.outcome = (channel, outcome.kind)
        if outcome.kind != policy.RETRY and (not msg.get("refused") or msg.get("count_failure", True)):
            # the endpoint's health lives under one key, so it is updated by a message keyed by the
            # endpoint (one partition) rather than here, in the delivery's partition
            ep = endpoint_for(cfg, name)
            fx.send(Topic.NOTIFICATIONS, f"endpoint:{name}",
                    {"kind": "endpoint", "delivery_id": did, "endpoint": name, "channel": channel,
                     "url": ep.url if ep else None, "outcome": outcome.kind, "reason": outcome.reason,
                     "case_id": req["case_id"], "dedup_key": req["dedup_key"], "at": at})
        final = None
        if outcome.kind == policy.DELIVERED:
            final = "delivered"
        elif outcome.kind == policy.RETRY:
            d = cfg.delivery
            nxt = policy.next_attempt(state["first_at"], attempts, outcome, at, d.retry_window, cap=d.max_backoff,
                                      rand=self.rand)
            if nxt is None:
                final = "failed"
                outcome = policy.Outcome(policy.RETRY, None, f"retry window exhausted; last: {outcome.reason}")
            else:
                fx.put(Store.DELIVERIES, did, dict(state, attempts=attempts, next_at=nxt, last=outcome.reason))
                return
        else:
            final = "failed"
        if final == "failed":  # a dead letter: `casestream dlq replay --reason notification_failed` retries it
            record = dead_letter(Rejection(NOTIFICATION_FAILED, f"delivery {req['delivery_id']} to "
                                                                f"{req['endpoint']}: {outcome.reason}"),
                                 *source, orjson.dumps(req))
            fx.actions.append(DeadLetter(record, req["delivery_id"].encode()))
        report = {"kind": "delivery", "outcome": final, "delivery_id": did, "case_id": req["case_id"],
                  "dedup_key": req["dedup_key"], "endpoint": name, "channel": channel, "attempts": attempts,
                  "status_code": msg.get("status"), "reason": outcome.reason,
                  "permanent": outcome.kind == policy.PERMANENT,
                  "notification_id": req.get("notification_id"), "user_id": req.get("user_id"),
                  "at": int(at * 1000)}
        # final: a small record in the outcomes table (the id stays known: a re-sent request is
        # ignored; the report is kept to be sent again if this result is redelivered); the pending
        # table, which every tick scans, keeps only what is pending
        fx.put(Store.OUTCOMES, did, {"delivery_id": did, "state": final, "attempts": attempts, "endpoint": name,
                                     "report": report})
        fx.put(Store.DELIVERIES, did, None)
        fx.send(Topic.TIMERS, routing_token(req["dedup_key"]), report)

    def _endpoint_outcome(self, fx: Effects, msg: dict, cfg, load: Callable[[Store, str], dict | None]) -> None:
        """A delivered or permanently failed attempt, for the endpoint's health (kept under one key)."""
        name = msg["endpoint"]
        key = f"endpoint:{name}"
        rec = load(Store.DELIVERIES, key) or {"consecutive_permanent": 0}
        if rec.get("url") != msg.get("url"):
            rec = {"consecutive_permanent": 0}  # a new URL: a fresh start (re-enables a disabled endpoint)
        health = policy.EndpointHealth(cfg.delivery.disable_after)
        health.consecutive_permanent = rec.get("consecutive_permanent", 0)
        health.disabled = bool(rec.get("disabled"))
        was = health.disabled
        health.record(msg["outcome"], msg["at"], msg["reason"])
        fx.put(Store.DELIVERIES, key, {"consecutive_permanent": health.consecutive_permanent,
                                       "disabled": health.disabled, "url": msg.get("url"), "reason": msg["reason"]})
        if health.disabled and not was:
            fx.disabled = (name, health.consecutive_permanent, msg["reason"])
            report = {"kind": "delivery", "outcome": "disabled", "delivery_id": msg["delivery_id"],
                      "case_id": msg["case_id"], "dedup_key": msg["dedup_key"], "endpoint": name,
                      "channel": msg["channel"], "consecutive_failures": health.consecutive_permanent,
                      "reason": msg["reason"], "at": int(msg["at"] * 1000)}
            fx.send(Topic.TIMERS, routing_token(msg["dedup_key"]), report)

    # -- the scan of pending deliveries ---------------------------------------------------------

    def due(self, cfg, now: float, pending_items, load: Callable[[Store, str], dict | None]) -> Due:
        """Scan ``pending_items`` ((key, raw) of the ``deliveries`` table): the attempts to make now
        (marked in flight), the refusals, and the count pending. An endpoint whose breaker is open
        is tried again after its pause (attempts not counted)."""
        out = Due()
        for _key, raw in pending_items:
            d = orjson.loads(raw)
            if d.get("state") != "pending":
                continue
            out.pending += 1
            did = d["delivery_id"]
            if d["next_at"] > now or did in self.inflight:
                continue
            attempt = d["attempts"] + 1
            ep = endpoint_for(cfg, d["request"]["endpoint"])
            if ep is None:
                out.refusals.append(self._refuse(did, attempt, now, "the endpoint is no longer configured"))
                continue
            rec = load(Store.DELIVERIES, f"endpoint:{ep.name}")
            if rec and rec.get("disabled") and rec.get("url") == ep.url:
                out.refusals.append(self._refuse(did, attempt, now,
                                                 f"endpoint {ep.name} is disabled (it failed permanently too "
                                                 f"often); change its URL to enable it again", count=False))
                continue
            if not self.breaker(cfg, ep.name).allow(now):
                continue  # open: tried again after the pause, attempts not counted
            self.inflight[did] = attempt
            out.attempts.append((d, ep, attempt))
        return out

    def _refuse(self, did: str, attempt: int, now: float, reason: str, count: bool = True) -> Send:
        self.inflight[did] = attempt
        return Send(Topic.NOTIFICATIONS, did.encode(), orjson.dumps(
            {"kind": "result", "delivery_id": did, "attempt": attempt, "at": now, "refused": True,
             "reason": reason, "count_failure": count}))


def attempt_request(tenant_name: str, d: dict, ep, attempt: int, wall_s: int) -> tuple[bytes, dict[str, str]]:
    """The body and headers of attempt ``attempt`` of pending delivery ``d`` to endpoint ``ep``
    (``wall_s``: the signature's timestamp, epoch seconds)."""
    req, did = d["request"], d["delivery_id"]
    event, case = req["event"], req["case"]
    if ep.channel == "slack":
        body = orjson.dumps(slack_message(event, case, f"{tenant_name}|{req['case_id']}|{req['dedup_key']}"))
        return body, {"Content-Type": "application/json", DELIVERY_ID_HEADER: did}
    body = webhook_body(event, case, tenant_name, delivery_id=did)
    return body, webhook_headers(delivery_id=did, event_type=event["type"], body=body, t=wall_s, secret=ep.secret,
                                 attempt=attempt)


def result_record(did: str, attempt: int, now: float, result: dict) -> tuple[bytes, bytes]:
    """(key, value) of an attempt's result on ``T.notifications``."""
    return did.encode(), orjson.dumps({"kind": "result", "delivery_id": did, "attempt": attempt, "at": now,
                                       **result})
