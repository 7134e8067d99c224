"""Notification delivery: webhooks and Slack, retried from durable state, never lost.

The apply agent decides deliveries (``streams/domain/notify.py``) and puts a
request on ``T.notifications`` (keyed by delivery id) as part of its recorded
outputs. This agent keeps every pending delivery in the ``deliveries``
table and every finished one in ``delivery_outcomes`` (changelogged,
partitioned like that topic; the scan below reads only the pending ones):

* a **request** it has not seen becomes a pending delivery (a known id is a
  re-sent request: ignored);
* every ``tick`` a scan of its partitions sends the pending deliveries that
  are due -- each attempt is an asyncio task (at most ``CONCURRENCY`` at
  once) that POSTs through ``streams/outbound.py`` (SSRF policy, pinned
  address, no redirects, capped response) and puts the attempt's **result**
  back on ``T.notifications``; a retry is a time in the table, never a
  sleeping coroutine, so nothing blocks the partition or other endpoints;
* a result (applied in stream order) is classified (``streams/domain/
  delivery.py``): delivered; retry (timeout, connection error, 429 with
  ``Retry-After``, 5xx) at a capped exponential backoff with jitter while the
  retry window lasts; permanent (other 4xx, a refused address, an endpoint
  no longer configured or disabled). A final outcome goes to ``T.timers``,
  keyed like the case, where the apply agent records
  ``NotificationDelivered`` / ``NotificationFailed`` / ``EndpointDisabled`` on
  the case's timeline.

A circuit breaker per endpoint (in memory, dropped with its metric series
once a reload removes the endpoint) stops attempts to an endpoint that
keeps failing and probes it again later; ``disable_after`` permanent
failures in a row disable the endpoint (kept in the table until its URL
changes in the configuration). After a crash the table still holds every
pending delivery, and an attempt whose result was not recorded is made
again: receivers see each delivery at least once and deduplicate on
``X-Casestream-Delivery-Id``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import orjson

from agents.intake import dead_letter, write_in_context
from streams import metrics, outbound
from streams.app import Topology
from streams.domain import delivery as policy
from streams.domain.intake import NOTIFICATION_FAILED, PROCESSING_ERROR, Rejection, routing_token
from streams.domain.notify import endpoint_for
from streams.domain.slack import slack_message
from streams.domain.webhook import DELIVERY_ID_HEADER, webhook_body, webhook_headers

log = logging.getLogger("casestream.notify")

CONCURRENCY = 32
BATCH, WITHIN = 200, 0.05
BREAKER_STATES = {policy.CLOSED: 0, policy.HALF_OPEN: 1, policy.OPEN: 2}


def register(topo: Topology, tick: float = 0.5) -> None:
    app, tenant, tname = topo.app, topo.tenant, topo.tenant.name
    inflight: dict[str, int] = {}            # delivery id -> attempt in flight
    breakers: dict[str, policy.CircuitBreaker] = {}
    sem = asyncio.Semaphore(CONCURRENCY)
    tasks: set[asyncio.Task] = set()

    def now_s() -> float:
        return topo.clock.now_ms() / 1000

    def breaker(name: str) -> policy.CircuitBreaker:
        d = topo.oncall.current.delivery
        if name not in breakers:
            breakers[name] = policy.CircuitBreaker(d.breaker_failures, d.breaker_open, max(d.breaker_open, 3600.0))
        return breakers[name]

    def forget_removed(cfg) -> None:
        """The breakers (and metric series) of endpoints no longer configured go: however often a reload
        changes the endpoints, there are no more of them than endpoints configured."""
        for name in [n for n in breakers if endpoint_for(cfg, n) is None]:
            del breakers[name]
            metrics.BREAKER_STATE.remove(tname, name)

    def load(table, key: str) -> dict | None:
        raw = table.get(key)
        return orjson.loads(raw) if raw is not None else None

    def disabled(ep) -> dict | None:
        rec = load(topo.deliveries, f"endpoint:{ep.name}")
        return rec if rec and rec.get("disabled") and rec.get("url") == ep.url else None

    @app.agent(topo.notifications_topic, name=f"{topo.family.app_id}.notify")
    async def deliver(stream):
        async for events in stream.take_events(BATCH, within=WITHIN):
            for event in events:
                try:
                    handle(event)
                except Exception as exc:  # a bad record must not stop deliveries: dead-letter it
                    m = event.message
                    log.exception("notifications %s:%s@%s could not be handled", m.topic, m.partition, m.offset)
                    record = dead_letter(Rejection(PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:2000]),
                                         m.topic, m.partition, m.offset, event.value)
                    record["dead_lettered_at"] = int(time.time() * 1000)
                    topo.dlq.send_soon(key=m.key, value=orjson.dumps(record))
                    metrics.DLQ_MESSAGES.labels(tname, PROCESSING_ERROR).inc()

    def state_of(did: str) -> dict | None:
        """The pending delivery, else its final outcome, else None (never seen)."""
        return load(topo.deliveries, did) or load(topo.delivery_outcomes, did)

    def endpoint_outcome(event, msg: dict) -> None:
        """A delivered or permanently failed attempt, for the endpoint's health (kept under one key)."""
        cfg, name = topo.oncall.current, msg["endpoint"]
        key = f"endpoint:{name}"
        rec = load(topo.deliveries, key) or {"consecutive_permanent": 0}
        if rec.get("url") != msg.get("url"):
            rec = {"consecutive_permanent": 0}  # a new URL: a fresh start (re-enables a disabled endpoint)
        health = policy.EndpointHealth(cfg.delivery.disable_after)
        health.consecutive_permanent = rec.get("consecutive_permanent", 0)
        health.disabled = bool(rec.get("disabled"))
        was = health.disabled
        health.record(msg["outcome"], msg["at"], msg["reason"])
        write_in_context(topo.deliveries, event, key, orjson.dumps(
            {"consecutive_permanent": health.consecutive_permanent, "disabled": health.disabled,
             "url": msg.get("url"), "reason": msg["reason"]}))
        if health.disabled and not was:
            log.warning("endpoint %s disabled after %d permanent failures in a row: %s", name,
                        health.consecutive_permanent, msg["reason"])
            report = {"kind": "delivery", "outcome": "disabled", "delivery_id": msg["delivery_id"],
                      "case_id": msg["case_id"], "dedup_key": msg["dedup_key"], "endpoint": name,
                      "channel": msg["channel"], "consecutive_failures": health.consecutive_permanent,
                      "reason": msg["reason"], "at": int(msg["at"] * 1000)}
            topo.timers_topic.send_soon(key=routing_token(msg["dedup_key"]).encode(), value=orjson.dumps(report))

    def handle(event) -> None:
        msg = orjson.loads(event.value)
        if msg["kind"] == "endpoint":
            endpoint_outcome(event, msg)
            return
        did = msg["delivery_id"]
        state = state_of(did)
        if msg["kind"] == "request":
            if state is None:
                write_in_context(topo.deliveries, event, did, orjson.dumps(
                    {"delivery_id": did, "state": "pending", "attempts": 0, "first_at": now_s(),
                     "next_at": now_s(), "request": msg}))
            return
        if msg["kind"] == "retry":  # `casestream dlq replay` of a failed delivery, after a fix
            if state is not None and state["state"] == "failed":
                request = {k: v for k, v in msg.items() if k != "kind"}
                write_in_context(topo.deliveries, event, did, orjson.dumps(
                    {"delivery_id": did, "state": "pending", "attempts": 0, "first_at": now_s(), "next_at": now_s(),
                     "request": dict(request, kind="request")}))
                log.info("delivery %s to %s: retried on request (dead letter replay)", did, msg.get("endpoint"))
            return
        if msg["kind"] != "result":
            return
        if inflight.get(did) == msg["attempt"]:
            del inflight[did]
        if state is None or state["state"] != "pending" or msg["attempt"] != state["attempts"] + 1:
            if state is not None and state.get("report") and msg["attempt"] == state["attempts"]:
                # the result that finished it, redelivered: a crash may have lost the outcome report
                # after the tables had it, so it goes again (the apply agent records it once)
                topo.timers_topic.send_soon(key=routing_token(state["report"]["dedup_key"]).encode(),
                                            value=orjson.dumps(state["report"]))
            return  # a result already applied (redelivered), or for a finished delivery
        settle(event, did, state, msg)

    def settle(event, did: str, state: dict, msg: dict) -> None:
        cfg = topo.oncall.current
        req, at, attempts = state["request"], msg["at"], msg["attempt"]
        name, channel = req["endpoint"], req["channel"]
        if msg.get("refused"):
            outcome = policy.Outcome(policy.PERMANENT, None, msg["reason"])
        else:
            outcome = policy.classify(msg.get("status"), msg.get("error"), msg.get("retry_after"), at)
            breaker(name).record(outcome.kind == policy.DELIVERED, at)
            metrics.BREAKER_STATE.labels(tname, name).set(BREAKER_STATES.get(breaker(name).state, 0))
        metrics.DELIVERIES.labels(tname, channel, outcome.kind).inc()
        if outcome.kind != policy.RETRY and (not msg.get("refused") or msg.get("count_failure", True)):
            # the endpoint's health lives under one key, so it is updated by a message keyed by the
            # endpoint (one partition) rather than here, in the delivery's partition
            ep = endpoint_for(cfg, name)
            topo.notifications_topic.send_soon(key=f"endpoint:{name}".encode(), value=orjson.dumps(
                {"kind": "endpoint", "delivery_id": did, "endpoint": name, "channel": channel,
                 "url": ep.url if ep else None, "outcome": outcome.kind, "reason": outcome.reason,
                 "case_id": req["case_id"], "dedup_key": req["dedup_key"], "at": at}))
        final = None
        if outcome.kind == policy.DELIVERED:
            final = "delivered"
        elif outcome.kind == policy.RETRY:
            d = cfg.delivery
            nxt = policy.next_attempt(state["first_at"], attempts, outcome, at, d.retry_window, cap=d.max_backoff,
                                      rand=random.random)
            if nxt is None:
                final = "failed"
                outcome = policy.Outcome(policy.RETRY, None, f"retry window exhausted; last: {outcome.reason}")
            else:
                write_in_context(topo.deliveries, event, did, orjson.dumps(
                    dict(state, attempts=attempts, next_at=nxt, last=outcome.reason)))
                return
        else:
            final = "failed"
        if final == "failed":  # a dead letter: `casestream dlq replay --reason notification_failed` retries it
            dead_letter_failure(event, req, outcome.reason)
        report = {"kind": "delivery", "outcome": final, "delivery_id": did, "case_id": req["case_id"],
                  "dedup_key": req["dedup_key"], "endpoint": name, "channel": channel, "attempts": attempts,
                  "status_code": msg.get("status"), "reason": outcome.reason,
                  "permanent": outcome.kind == policy.PERMANENT,
                  "notification_id": req.get("notification_id"), "user_id": req.get("user_id"),
                  "at": int(at * 1000)}
        # final: a small record in the outcomes table (the id stays known: a re-sent request is
        # ignored; the report is kept to be sent again if this result is redelivered); the pending
        # table, which every tick scans, keeps only what is pending
        write_in_context(topo.delivery_outcomes, event, did, orjson.dumps(
            {"delivery_id": did, "state": final, "attempts": attempts, "endpoint": name, "report": report}))
        write_in_context(topo.deliveries, event, did, None)
        topo.timers_topic.send_soon(key=routing_token(req["dedup_key"]).encode(), value=orjson.dumps(report))

    def dead_letter_failure(event, req: dict, reason: str) -> None:
        msg = event.message
        record = dead_letter(Rejection(NOTIFICATION_FAILED, f"delivery {req['delivery_id']} to {req['endpoint']}: "
                                                            f"{reason}"), msg.topic, msg.partition, msg.offset,
                             orjson.dumps(req))
        record["dead_lettered_at"] = int(time.time() * 1000)
        topo.dlq.send_soon(key=req["delivery_id"].encode(), value=orjson.dumps(record))
        metrics.DLQ_MESSAGES.labels(tname, NOTIFICATION_FAILED).inc()

    @app.timer(interval=tick, name=f"{topo.family.app_id}.deliveries")
    async def send_due():
        if not app.tables.recovery.completed.is_set():
            return
        cfg, now = topo.oncall.current, now_s()
        forget_removed(cfg)
        pending = 0
        for _key, raw in topo.deliveries.items():
            d = orjson.loads(raw)
            if d.get("state") != "pending":
                continue
            pending += 1
            did = d["delivery_id"]
            if d["next_at"] > now or did in inflight:
                continue
            attempt = d["attempts"] + 1
            ep = endpoint_for(cfg, d["request"]["endpoint"])
            if ep is None:
                refuse(did, attempt, "the endpoint is no longer configured")
                continue
            if disabled(ep):
                refuse(did, attempt, f"endpoint {ep.name} is disabled (it failed permanently too often); "
                                     f"change its URL to enable it again", count=False)
                continue
            if not breaker(ep.name).allow(now):
                continue  # open: tried again after the pause, attempts not counted
            inflight[did] = attempt
            task = asyncio.ensure_future(attempt_delivery(d, ep, attempt))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        metrics.DELIVERIES_PENDING.labels(tname).set(pending)

    def refuse(did: str, attempt: int, reason: str, count: bool = True) -> None:
        inflight[did] = attempt
        topo.notifications_topic.send_soon(key=did.encode(), value=orjson.dumps(
            {"kind": "result", "delivery_id": did, "attempt": attempt, "at": now_s(), "refused": True,
             "reason": reason, "count_failure": count}))

    async def attempt_delivery(d: dict, ep, attempt: int) -> None:
        cfg = topo.oncall.current
        req, did = d["request"], d["delivery_id"]
        event, case = req["event"], req["case"]
        result: dict
        async with sem:
            started = time.monotonic()
            try:
                if ep.channel == "slack":
                    body = orjson.dumps(slack_message(event, case, f"{tname}|{req['case_id']}|{req['dedup_key']}"))
                    headers = {"Content-Type": "application/json", DELIVERY_ID_HEADER: did}
                else:
                    body = webhook_body(event, case, tname, delivery_id=did)
                    headers = webhook_headers(delivery_id=did, event_type=event["type"], body=body,
                                              t=int(time.time()), secret=ep.secret, attempt=attempt)
                resp = await outbound.post(ep.url, body, headers, timeout=cfg.delivery.timeout,
                                           allow=cfg.delivery.allow_networks,
                                           require_https=not cfg.delivery.allow_http)
                result = {"status": resp.status, "error": resp.error, "retry_after": resp.header("retry-after")}
                metrics.DELIVERY_SECONDS.labels(tname, ep.channel).observe(resp.elapsed)
            except outbound.Refused as exc:
                result = {"refused": True, "reason": f"refused by the outbound policy: {exc.reason}"}
            except Exception as exc:
                result = {"status": None, "error": f"{exc.__class__.__name__}: {exc}"}
            log.info("delivery %s to %s attempt %d: %s (%.0f ms)", did, ep.name, attempt,
                     result.get("status") or result.get("reason") or result.get("error"),
                     (time.monotonic() - started) * 1000)
        topo.notifications_topic.send_soon(key=did.encode(), value=orjson.dumps(
            {"kind": "result", "delivery_id": did, "attempt": attempt, "at": now_s(), **result}))

    topo.agents["notify"] = deliver  # type: ignore[index]
