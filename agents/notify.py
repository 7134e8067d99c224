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

This module is I/O only: the decisions (what a record does to the tables,
which deliveries are due, the request of an attempt) are
``streams.stage.deliver.Deliverer``; here are the table reads and writes, the
sends, the HTTP attempts, metrics and logs.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from agents.topology import Topology, write_in_context
from streams import metrics, outbound
from streams.domain import delivery as policy
from streams.domain.intake import PROCESSING_ERROR, Rejection
from streams.stage.deliver import DeadLetter, Deliverer, Put, Store, Topic, attempt_request, result_record
from streams.stage.route import dead_letter

log = logging.getLogger("casestream.notify")

CONCURRENCY = 32
BATCH, WITHIN = 200, 0.05
BREAKER_STATES = {policy.CLOSED: 0, policy.HALF_OPEN: 1, policy.OPEN: 2}


def register(topo: Topology, tick: float = 0.5) -> None:
    app, tname = topo.app, topo.tenant.name
    deliverer = Deliverer()  # attempts in flight and circuit breakers (in memory), the decisions
    sem = asyncio.Semaphore(CONCURRENCY)
    tasks: set[asyncio.Task] = set()
    tables = {Store.DELIVERIES: topo.deliveries, Store.OUTCOMES: topo.delivery_outcomes}
    topics = {Topic.TIMERS: topo.timers_topic, Topic.NOTIFICATIONS: topo.notifications_topic}

    def now_s() -> float:
        return topo.clock.now_ms() / 1000

    def load(table: Store, key: str) -> dict | None:
        raw = tables[table].get(key)
        return orjson.loads(raw) if raw is not None else None

    def send_dlq(key: bytes | None, record: dict) -> None:
        record = dict(record, dead_lettered_at=int(time.time() * 1000))
        topo.dlq.send_soon(key=key, value=orjson.dumps(record))
        metrics.DLQ_MESSAGES.labels(tname, record["reason"]).inc()

    @app.agent(topo.notifications_topic, name=f"{topo.family.app_id}.notify")
    async def deliver(stream):
        async for events in stream.take_events(BATCH, within=WITHIN):
            for event in events:
                try:
                    handle(event)
                except Exception as exc:  # a bad record must not stop deliveries: dead-letter it
                    m = event.message
                    log.exception("notifications %s:%s@%s could not be handled", m.topic, m.partition, m.offset)
                    send_dlq(m.key, dead_letter(Rejection(PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:2000]),
                                                m.topic, m.partition, m.offset, event.value))

    def handle(event) -> None:
        m = event.message
        fx = deliverer.handle(orjson.loads(event.value), topo.oncall.current, now_s, load,
                              (m.topic, m.partition, m.offset))
        if fx.breaker is not None:
            name, state = fx.breaker
            metrics.BREAKER_STATE.labels(tname, name).set(BREAKER_STATES.get(state, 0))
        if fx.outcome is not None:
            metrics.DELIVERIES.labels(tname, *fx.outcome).inc()
        for action in fx.actions:  # in order; a write is read by the next record of the batch
            if isinstance(action, Put):
                write_in_context(tables[action.table], event, action.key, action.value)
            elif isinstance(action, DeadLetter):
                send_dlq(action.key, action.record)
            else:
                topics[action.topic].send_soon(key=action.key, value=action.value)
        if fx.disabled is not None:
            log.warning("endpoint %s disabled after %d permanent failures in a row: %s", *fx.disabled)
        if fx.retried is not None:
            log.info("delivery %s to %s: retried on request (dead letter replay)", *fx.retried)

    @app.timer(interval=tick, name=f"{topo.family.app_id}.deliveries")
    async def send_due():
        if not app.tables.recovery.completed.is_set():
            return
        cfg, now = topo.oncall.current, now_s()
        for name in deliverer.forget_removed(cfg):
            metrics.BREAKER_STATE.remove(tname, name)
        due = deliverer.due(cfg, now, topo.deliveries.items(), load)
        for refusal in due.refusals:
            topo.notifications_topic.send_soon(key=refusal.key, value=refusal.value)
        for d, ep, attempt in due.attempts:
            task = asyncio.ensure_future(attempt_delivery(d, ep, attempt))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        metrics.DELIVERIES_PENDING.labels(tname).set(due.pending)

    async def attempt_delivery(d: dict, ep, attempt: int) -> None:
        cfg = topo.oncall.current
        did = d["delivery_id"]
        result: dict
        async with sem:
            started = time.monotonic()
            try:
                body, headers = attempt_request(tname, d, ep, attempt, int(time.time()))
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
        key, value = result_record(did, attempt, now_s(), result)
        topo.notifications_topic.send_soon(key=key, value=value)

    topo.agents["notify"] = deliver  # type: ignore[index]
