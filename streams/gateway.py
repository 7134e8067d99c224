"""The intake gateway: point an unmodified monitor at it.

HTTP routes (added to ``casestream api``; ``--routes intake`` serves only
these, ``--routes query`` only the analyst's view):

* ``POST /v2/enqueue`` -- PagerDuty Events API v2 (``routing_key`` is an
  integration key);
* ``POST /v1/integrations/<key>/alertmanager | grafana | datadog | events``;
* ``GET /ready`` (Kafka reachable), ``GET /metrics``, ``GET /openapi.json``.

A request goes through, in order: the integration key (unknown, revoked or
expired -> 401; a key of another monitor kind -> 403), the body size (over
512 KiB -> 413, before anything is parsed), the signature when the
integration requires one (``X-Casestream-Signature``; -> 401), JSON and
nesting depth (-> 400), the monitor's format (``streams/domain/monitors.py``;
-> 400 with field-level errors in the monitor's own response format), the
canonical intake validation of every resulting event (the worker's own
``parse``; -> 400), the rate limits (per integration and per tenant, token
buckets; -> 429 with ``Retry-After``, the refusal dead-lettered as
``rate_limited``), and publishing to ``T.intake`` with ``acks=all``: 202 only
once Kafka has acknowledged every event; Kafka unreachable -> 503 and
nothing is claimed as accepted (a retry is harmless: event ids are
deterministic, the worker deduplicates them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import orjson
from aiohttp import web

from streams import metrics
from streams.config import load_tenants, load_topics
from streams.domain.auth import RateLimiter, key_tenant, verify_signature
from streams.domain.intake import (
    MAX_DEPTH, MAX_MESSAGE_BYTES, RATE_LIMITED, RECORD_ID_PENDING, Rejection, _depth_ok, assigned_dedup_key,
    intake_partition_key, parse,
)
from streams.domain.monitors import PayloadError, translate
from streams.settings import Settings

log = logging.getLogger("casestream.gateway")

MAX_BODY = MAX_MESSAGE_BYTES           # 512 KiB, as PagerDuty's Events API
MONITOR_ROUTES = ("alertmanager", "grafana", "datadog", "events")
SIGNATURE_HEADER = "X-Casestream-Signature"


class Unavailable(Exception):
    """Kafka did not acknowledge: nothing may be claimed as accepted."""


class Publisher:
    """Publishes intake events (acks=all) and gateway dead letters to a tenant's topics."""

    def __init__(self, bootstrap: str, tenants, timeout: float = 10.0):
        self.bootstrap = bootstrap
        self.topics = {t: (load_topics(t).name("intake"), load_topics(t).name("dlq")) for t in tenants}
        self.timeout = timeout
        self._producer = None
        self._lock = asyncio.Lock()

    async def _get(self):
        from aiokafka import AIOKafkaProducer

        async with self._lock:
            if self._producer is None:
                p = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2,
                                     request_timeout_ms=int(self.timeout * 1000),
                                     max_request_size=MAX_BODY * 2 + 64 * 1024)
                try:
                    await asyncio.wait_for(p.start(), self.timeout)
                except Exception as exc:
                    try:
                        await p.stop()
                    except Exception:
                        pass
                    raise Unavailable(f"Kafka at {self.bootstrap} is unreachable: {exc.__class__.__name__}") from None
                self._producer = p
            return self._producer

    async def publish(self, tenant: str, records: list[tuple[bytes | None, bytes]]) -> list[tuple[str, int, int]]:
        """Publish and wait for every acknowledgement; where each record was placed (topic, partition, offset)."""
        producer = await self._get()
        topic = self.topics[tenant][0]
        try:
            futures = [await producer.send(topic, value, key=key) for key, value in records]
            placed = await asyncio.wait_for(asyncio.gather(*futures), self.timeout)
        except Exception as exc:
            raise Unavailable(f"Kafka did not acknowledge: {exc.__class__.__name__} {exc}") from None
        return [(topic, md.partition, md.offset) for md in placed]

    async def dead_letter(self, tenant: str, record: dict) -> None:
        """Best effort: a refusal is answered whether or not its dead letter could be written."""
        try:
            producer = await self._get()
            fut = await producer.send(self.topics[tenant][1], orjson.dumps(record))
            await asyncio.wait_for(fut, self.timeout)
        except Exception as exc:
            log.warning("dead letter for %s not written: %r", tenant, exc)

    async def ready(self) -> bool:
        try:
            producer = await self._get()
            # a metadata round trip now: the brokers known from an earlier answer say nothing
            # about whether one answers today (False: no broker answered)
            answered = await asyncio.wait_for(producer.client.force_metadata_update(), self.timeout)
            return bool(answered) and bool(producer.client.cluster.brokers())
        except Exception:
            return False

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


@dataclass
class Answer:
    status: int
    body: dict
    headers: dict | None = None


def _pd_error(status: int, message: str, errors: list[str] | None = None, label: str = "invalid event") -> Answer:
    body = {"status": label, "message": message}
    if errors is not None:
        body["errors"] = errors
    return Answer(status, body)


def _error(status: int, error: str, message: str, errors: list[dict] | None = None) -> Answer:
    body = {"status": "error", "error": error, "message": message}
    if errors is not None:
        body["errors"] = errors
    return Answer(status, body)


class Gateway:
    """The request pipeline, apart from aiohttp (tests drive it over real HTTP)."""

    def __init__(self, settings: Settings, store, limiter: RateLimiter, publisher: Publisher):
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.publisher = publisher
        self.tenants = load_tenants(settings.tenants_file)
        self._background: set[asyncio.Task] = set()

    async def authenticate(self, key: str | None):
        """The key's integration (None: unknown, revoked, expired); PostgreSQL down -> Unavailable."""
        if not key or not key_tenant(key):
            return None
        try:
            return await self.store.authenticate(key)
        except Exception as exc:
            log.warning("integration lookup failed: %r", exc)
            raise Unavailable("integration keys cannot be checked (PostgreSQL unavailable); retry later") from None

    def _fail(self, kind: str, status: int, message: str, errors=None) -> Answer:
        if kind == "pagerduty":
            label = {401: "unauthorized", 403: "forbidden", 413: "invalid event", 429: "throttle event",
                     503: "unavailable"}.get(status, "invalid event")
            msg = "Event object is invalid" if status == 400 else message
            errs = [f"{e['field']}: {e['message']}" if e.get("field") else e["message"] for e in errors] \
                if errors is not None else ([message] if status in (400, 413) else None)
            return _pd_error(status, msg, errs, label)
        code = {400: "invalid_payload", 401: "unauthorized", 403: "forbidden", 413: "too_large",
                404: "not_found",
                429: "rate_limited", 503: "unavailable"}[status]
        return _error(status, code, message, errors)

    async def handle(self, kind: str, key: str | None, raw: bytes, signature: str | None,
                     now: float | None = None) -> Answer:
        now = time.time() if now is None else now
        body = None
        if kind == "pagerduty":  # the key travels inside the body
            if len(raw) > MAX_BODY:
                return self._fail(kind, 413, f"body is {len(raw)} bytes; the limit is {MAX_BODY}")
            body, bad = self._json(raw)
            if bad:
                return self._fail(kind, 400, bad, [{"field": "", "message": bad}])
            key = body.get("routing_key") if isinstance(body, dict) else None
            if not isinstance(key, str) or not key:
                return self._fail(kind, 400, "routing_key is required",
                                  [{"field": "routing_key", "message": "is required (your integration key)"}])
        try:
            integration = await self.authenticate(key)
        except Unavailable as exc:
            return self._fail(kind, 503, str(exc))
        if integration is None:
            return self._fail(kind, 401, "unknown, revoked or expired integration key")
        if integration.kind != kind:
            where = "POST /v2/enqueue" if integration.kind == "pagerduty" else \
                f"/v1/integrations/<key>/{integration.kind}"
            return self._fail(kind, 403, f"this key belongs to a {integration.kind} integration; send to {where}")
        if len(raw) > MAX_BODY:
            return self._fail(kind, 413, f"body is {len(raw)} bytes; the limit is {MAX_BODY}")
        if integration.signing_secret:
            why = verify_signature(integration.signing_secret, signature, raw, int(now))
            if why is not None:
                return self._fail(kind, 401, f"{SIGNATURE_HEADER}: {why}")
        if body is None:
            body, bad = self._json(raw)
            if bad:
                return self._fail(kind, 400, bad, [{"field": "", "message": bad}])
        try:
            messages = translate(kind, body, integration.options)
        except PayloadError as exc:
            return self._fail(kind, 400, "the payload is invalid", exc.errors)
        records, errors = [], []
        received = int(now * 1000)
        tenant = self.tenants[integration.tenant]
        parsed = []
        for i, msg in enumerate(messages):
            value = orjson.dumps(msg)
            result = parse(value, tenant, received, RECORD_ID_PENDING)
            if isinstance(result, Rejection):
                errors.append({"field": f"[{i}]" if len(messages) > 1 or kind == "events" else "",
                               "message": result.detail})
                continue
            parsed.append(result)
            # keyed by routing token: an alert naming the dedup key and a command naming the case id
            # land on one partition, in order
            records.append((intake_partition_key(result, tenant), value))
        if errors:
            return self._fail(kind, 400, "the payload is invalid", errors)
        labels = (integration.tenant, kind)
        refusal = self.limiter.check(integration.tenant, integration.id, len(records), time.monotonic())
        if refusal is not None:
            metrics.GATEWAY_EVENTS.labels(*labels, "rate_limited").inc(len(records))
            retry = max(1, math.ceil(refusal.retry_after))
            subject = f"integration {integration.id} ({integration.name})" if refusal.scope == "integration" \
                else f"tenant {integration.tenant}"
            message = (f"rate limit of {subject} exceeded: {refusal.rate:g} events/s, burst {refusal.burst:g}; "
                       f"retry after {retry} s")
            if refusal.too_large:
                message = (f"{len(records)} events in one request exceed the burst of {subject} "
                           f"({refusal.burst:g}); send fewer per request")
            await self.publisher.dead_letter(integration.tenant, {
                "reason": RATE_LIMITED, "detail": message,
                "source": {"topic": f"gateway:{kind}", "partition": -1, "offset": -1},
                "original": _redacted(kind, body, raw), "original_encoding": "utf-8",
                "dead_lettered_at": int(now * 1000)})
            answer = self._fail(kind, 429, message)
            answer.body.update(integration=integration.id, limit={"scope": refusal.scope, "rate": refusal.rate,
                                                                   "burst": refusal.burst})
            answer.headers = {"Retry-After": str(retry)}
            return answer
        try:
            placed = await self.publisher.publish(integration.tenant, records)
        except Unavailable as exc:
            log.warning("503: %s", exc)
            return self._fail(kind, 503, "intake is unavailable (Kafka did not acknowledge); retry later")
        metrics.GATEWAY_EVENTS.labels(*labels, "accepted").inc(len(records))
        # a trigger without dedup_key is its own alert, keyed by its record (a fresh key per accepted request)
        dedup_keys = [assigned_dedup_key(r, *where) or r.case_id for r, where in zip(parsed, placed)]
        if kind == "pagerduty":
            return Answer(202, {"status": "success", "message": "Event processed", "dedup_key": dedup_keys[0]})
        return Answer(202, {"status": "accepted", "events": len(records), "dedup_keys": dedup_keys})

    async def slack_action(self, key: str, raw: bytes | None, headers) -> Answer:
        """A Slack button press: verify Slack's signature, publish the acknowledge / resolve command
        (the Slack user as actor) to T.intake, then update the message through ``response_url``."""
        from streams.domain import slack
        from streams.domain.intake import derive_id

        try:
            integration = await self.authenticate(key)
        except Unavailable as exc:
            return self._fail("slack", 503, str(exc))
        if integration is None:
            return self._fail("slack", 401, "unknown, revoked or expired integration key")
        if integration.kind != "slack":
            return self._fail("slack", 403, f"this key belongs to a {integration.kind} integration")
        if raw is None:
            return self._fail("slack", 413, f"body over {MAX_BODY} bytes")
        why = slack.verify_slack_signature(integration.signing_secret or "", headers.get("X-Slack-Request-Timestamp"),
                                           headers.get("X-Slack-Signature"), raw, int(time.time()))
        if why is not None:
            return self._fail("slack", 401, f"Slack signature: {why}")
        try:
            action = slack.parse_action(raw)
            tenant_name, case_id, _dedup_key = action.value.split("|", 2)
        except ValueError as exc:
            return self._fail("slack", 400, f"not a casestream button: {exc}")
        if tenant_name != integration.tenant:
            return self._fail("slack", 403, f"this button belongs to tenant {tenant_name}")
        op = {slack.ACK_ACTION_ID: "acknowledge", slack.RESOLVE_ACTION_ID: "resolve"}.get(action.action_id)
        if op is None:
            return self._fail("slack", 400, f"unknown action {action.action_id!r}")
        tenant = self.tenants[tenant_name]
        status = tenant.actions[op]
        actor = {"id": f"slack:{action.user_id}", "name": action.user_name, "email": None}
        command = {"event_id": derive_id("slack", raw), "command": "set_status", "case_id": case_id,
                   "status": status, "actor": actor}
        value = orjson.dumps(command)
        parsed = parse(value, tenant, 0)
        key = (intake_partition_key(parsed, tenant) if not isinstance(parsed, Rejection) else None) or case_id.encode()
        try:
            await self.publisher.publish(tenant_name, [(key, value)])
        except Unavailable as exc:
            log.warning("503: %s", exc)
            return self._fail("slack", 503, "intake is unavailable; press again later")
        metrics.GATEWAY_EVENTS.labels(tenant_name, "slack", "accepted").inc()
        update = slack.updated_message(action.message_blocks or {"case_id": case_id}, status, action)
        task = asyncio.ensure_future(self._respond_to_slack(action.response_url, update))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return Answer(200, {})

    async def _respond_to_slack(self, url: str | None, message: dict) -> None:
        from streams import outbound
        from streams.domain.slack import valid_response_url

        extra = [p for p in self.settings.slack_response_prefixes if url and url.startswith(p)]
        if not (valid_response_url(url) or extra):
            log.warning("slack: response_url %r is not Slack's; message not updated", url)
            return
        try:
            resp = await outbound.post(url, orjson.dumps(message), {"Content-Type": "application/json"},
                                       allow=["127.0.0.0/8"] if extra else (),
                                       require_https=not any(p.startswith("http://") for p in extra))
            if resp.status is None or resp.status >= 300:
                log.warning("slack: message update answered %s %s", resp.status, resp.error or "")
        except Exception as exc:
            log.warning("slack: message update failed: %r", exc)

    @staticmethod
    def _json(raw: bytes) -> tuple[object, str | None]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "recursion" in str(exc).lower():
                return None, f"JSON nested deeper than {MAX_DEPTH} levels"
            return None, f"not valid JSON: {exc}"
        if not _depth_ok(body, MAX_DEPTH):
            return None, f"JSON nested deeper than {MAX_DEPTH} levels"
        return body, None


def _redacted(kind: str, body: object, raw: bytes) -> str:
    """The request body for a dead letter, without the secret PagerDuty carries in it."""
    if kind == "pagerduty" and isinstance(body, dict) and "routing_key" in body:
        return orjson.dumps(dict(body, routing_key="[redacted]")).decode()
    return raw.decode("utf-8", errors="replace")


async def _read_body(request: web.Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY (read no further than that)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return None
    data = await request.content.read(MAX_BODY + 1)
    return None if len(data) > MAX_BODY else data


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def add_intake_routes(app: web.Application, settings: Settings, store=None, limiter=None,
                      publisher=None) -> Gateway:
    from streams.integrations import IntegrationStore

    tenants = load_tenants(settings.tenants_file)
    store = store or IntegrationStore(settings.postgres_dsn, settings.db_prefix, tenants)
    limiter = limiter or RateLimiter(settings.rate_per_integration, settings.rate_per_tenant)
    publisher = publisher or Publisher(settings.kafka_bootstrap_servers, tenants)
    gw = Gateway(settings, store, limiter, publisher)

    async def respond(kind: str, key: str | None, request: web.Request) -> web.Response:
        started = time.perf_counter()
        raw = await _read_body(request)
        if raw is None:
            # over the limit: answered without reading or parsing the rest (the key is still checked first)
            try:
                integration = None if kind == "pagerduty" else await gw.authenticate(key)
                if kind != "pagerduty" and integration is None:
                    answer = gw._fail(kind, 401, "unknown, revoked or expired integration key")
                else:
                    answer = gw._fail(kind, 413, f"body over {MAX_BODY} bytes")
            except Unavailable as exc:
                answer = gw._fail(kind, 503, str(exc))
        else:
            answer = await gw.handle(kind, key, raw, request.headers.get(SIGNATURE_HEADER))
        tenant = key_tenant(key) if key else None
        metrics.GATEWAY_REQUESTS.labels(tenant or "-", kind, str(answer.status)).inc()
        metrics.GATEWAY_SECONDS.labels(kind).observe(time.perf_counter() - started)
        return web.Response(body=orjson.dumps(answer.body), status=answer.status, headers=answer.headers,
                            content_type="application/json")

    async def enqueue(request: web.Request) -> web.Response:
        return await respond("pagerduty", None, request)

    async def monitor(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind not in MONITOR_ROUTES:
            raise web.HTTPNotFound(text=orjson.dumps({"status": "error", "error": "not_found", "message":
                                   f"no intake route {kind!r}; use one of {', '.join(MONITOR_ROUTES)}"}).decode(),
                                   content_type="application/json")
        return await respond(kind, request.match_info["key"], request)

    async def ready(request: web.Request) -> web.Response:
        ok = await publisher.ready()
        return web.Response(body=orjson.dumps({"status": "ready" if ok else "unavailable", "kafka": ok}),
                            status=200 if ok else 503, content_type="application/json")

    async def on_cleanup(app):
        await publisher.close()
        await store.close()

    async def slack_actions(request: web.Request) -> web.Response:
        answer = await gw.slack_action(request.match_info["key"], await _read_body(request), request.headers)
        metrics.GATEWAY_REQUESTS.labels(key_tenant(request.match_info["key"]) or "-", "slack",
                                        str(answer.status)).inc()
        if answer.status == 200:
            return web.Response(status=200)  # Slack wants a quick empty 200; the message is updated apart
        return web.Response(body=orjson.dumps(answer.body), status=answer.status, content_type="application/json")

    app.router.add_post("/v2/enqueue", enqueue)
    app.router.add_post("/v1/integrations/{key}/slack/actions", slack_actions)
    app.router.add_post("/v1/integrations/{key}/{kind}", monitor)
    app.router.add_get("/ready", ready)
    app.on_cleanup.append(on_cleanup)
    app[GATEWAY_KEY] = gw
    return gw
