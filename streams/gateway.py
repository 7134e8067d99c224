"""The intake gateway: point an unmodified monitor at it.

HTTP routes (added to ``casestream api``; ``--routes intake`` serves only
these, ``--routes query`` only the analyst's view):

* ``POST /v2/enqueue`` -- PagerDuty Events API v2 (``routing_key`` is an
  integration key);
* ``POST /v1/integrations/<key>/alertmanager | grafana | datadog | events``;
* ``GET /ready`` (Kafka reachable), ``GET /metrics``, ``GET /openapi.json``.

A request goes through, in order: the limiter of failed authentications
per client address (``AddressLimiter``; -> 429 with ``Retry-After``, before
anything is looked up), the integration key (unknown, revoked or
expired -> 401; a key of another monitor kind -> 403), the body size (over
512 KiB -> 413, read no further), the signature when the integration
requires one (``X-Casestream-Signature``; wrong, stale or already used within
its window -> 401), JSON and
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
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import orjson
from aiohttp import web

from streams import kafka, metrics
from streams.config import load_tenants, load_topics
from streams.domain.auth import AddressLimiter, RateLimiter, SeenSignatures, key_tenant, signature_key, verify_signature
from streams.domain.intake import (
    MAX_DEPTH, MAX_MESSAGE_BYTES, RATE_LIMITED, RECORD_ID_PENDING, Rejection, assigned_dedup_key, decode_json,
    intake_partition_key, parse,
)
from streams.domain.monitors import PayloadError, translate
from streams.settings import Settings

log = logging.getLogger("casestream.gateway")

MAX_BODY = MAX_MESSAGE_BYTES           # 512 KiB, as PagerDuty's Events API
MONITOR_ROUTES = ("alertmanager", "grafana", "datadog", "events")
SIGNATURE_HEADER = "X-Casestream-Signature"
UNKNOWN_TENANT = "unknown"             # the metric label of a key whose tenant is not configured (or no key)


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
        async with self._lock:
            if self._producer is None:
                p = kafka.producer(self.bootstrap, linger_ms=2, request_timeout_ms=int(self.timeout * 1000),
                                   max_request_size=MAX_BODY * 2 + 64 * 1024)  # acks=all
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
    tenant: str | None = None          # the authenticated integration's tenant (metrics)


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

    def __init__(self, settings: Settings, store, limiter: RateLimiter, publisher: Publisher,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.publisher = publisher
        self.tenants = load_tenants(settings.tenants_file)
        self.clock = clock                      # unix seconds: signature windows
        self.seen_signatures = SeenSignatures()  # replays (gateway and Slack signatures)
        self.addresses = AddressLimiter(settings.rate_per_address)
        self._background: set[asyncio.Task] = set()

    def tenant_label(self, tenant: str | None) -> str:
        """A metric label: configured tenants by name, anything else under one label (bounded series)."""
        return tenant if tenant in self.tenants else UNKNOWN_TENANT

    def too_many(self, kind: str, address: str, wait: float) -> Answer:
        """429 for an address over its limit of failed authentications."""
        retry = max(1, math.ceil(wait))
        answer = self._fail(kind, 429, f"too many requests from {address} failing authentication "
                                       f"({self.addresses.rate:g}/s, burst {self.addresses.burst:g}); "
                                       f"retry after {retry} s")
        answer.headers = {"Retry-After": str(retry)}
        return answer

    async def authenticate(self, key: str | None):
        """The key's integration (None: unknown, revoked, expired); PostgreSQL down -> Unavailable."""
        if not key or not key_tenant(key):
            return None
        try:
            return await self.store.authenticate(key)
        except Exception as exc:
            log.warning("integration lookup failed: %r", exc)
            raise Unavailable("integration keys cannot be checked (PostgreSQL unavailable); retry later") from None

    def _fail(self, kind: str, status: int, message: str, errors=None, tenant: str | None = None) -> Answer:
        answer = self._fail_answer(kind, status, message, errors)
        answer.tenant = tenant
        return answer

    def _fail_answer(self, kind: str, status: int, message: str, errors=None) -> Answer:
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
        now = self.clock() if now is None else now
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
            return self._fail(kind, 403, f"this key belongs to a {integration.kind} integration; send to {where}",
                              tenant=integration.tenant)
        if len(raw) > MAX_BODY:
            return self._fail(kind, 413, f"body is {len(raw)} bytes; the limit is {MAX_BODY}",
                              tenant=integration.tenant)
        if integration.signing_secret:
            why = verify_signature(integration.signing_secret, signature, raw, int(now), seen=self.seen_signatures)
            if why is not None:
                return self._fail(kind, 401, f"{SIGNATURE_HEADER}: {why}", tenant=integration.tenant)
        answer = await self._accept(kind, integration, raw, body, now)
        answer.tenant = integration.tenant
        if integration.signing_secret and answer.status in (429, 503):
            # nothing was accepted: sending the same signed request again is a retry, not a replay
            self.seen_signatures.release(signature_key(integration.signing_secret, signature, raw))
        return answer

    async def _accept(self, kind: str, integration, raw: bytes, body, now: float) -> Answer:
        """An authenticated request: parse, translate, validate, limit, publish."""
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
        try:
            integration = await self.authenticate(key)
        except Unavailable as exc:
            return self._fail("slack", 503, str(exc))
        if integration is None:
            return self._fail("slack", 401, "unknown, revoked or expired integration key")
        answer = await self._slack_action(integration, raw, headers)
        answer.tenant = integration.tenant
        return answer

    async def _slack_action(self, integration, raw: bytes | None, headers) -> Answer:
        from streams.domain import slack
        from streams.domain.intake import derive_id

        if integration.kind != "slack":
            return self._fail("slack", 403, f"this key belongs to a {integration.kind} integration")
        if raw is None:
            return self._fail("slack", 413, f"body over {MAX_BODY} bytes")
        why = slack.verify_slack_signature(integration.signing_secret or "", headers.get("X-Slack-Request-Timestamp"),
                                           headers.get("X-Slack-Signature"), raw, int(self.clock()),
                                           seen=self.seen_signatures)
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
        return decode_json(raw, MAX_DEPTH)


def _redacted(kind: str, body: object, raw: bytes) -> str:
    """The request body for a dead letter, without the secret PagerDuty carries in it."""
    if kind == "pagerduty" and isinstance(body, dict) and "routing_key" in body:
        return orjson.dumps(dict(body, routing_key="[redacted]")).decode()
    return raw.decode("utf-8", errors="replace")


async def _read_body(request: web.Request) -> bytes | None:
    """The whole body, or None when it is over MAX_BODY (read no further than that).

    ``content.read(n)`` returns what has arrived so far, so it is read until
    the end of the body (Content-Length or the last chunk) or past the limit."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return None
    parts: list[bytes] = []
    size = 0
    while True:
        part = await request.content.read(MAX_BODY + 1 - size)
        if not part:  # the end of the body
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > MAX_BODY:
            return None


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    """Whom the per-address limiter counts: the peer, or -- when the peer is a proxy in ``trusted``
    (CIDRs, ``CASESTREAM_TRUSTED_PROXIES``) -- the last address in ``X-Forwarded-For`` that is not a
    trusted proxy itself. IPv6 addresses count per /64."""
    def parse(text):
        try:
            return ipaddress.ip_address(text.strip())
        except ValueError:
            return None

    nets = [ipaddress.ip_network(n) for n in trusted]
    addr = parse(peer) if peer else None
    if addr is None:
        return peer or "unknown"
    if forwarded_for and any(addr in n for n in nets):
        hops = [parse(h) for h in forwarded_for.split(",")]
        if hops and all(h is not None for h in hops):
            for hop in reversed(hops):
                addr = hop
                if not any(hop in n for n in nets):
                    break
    if addr.version == 6:
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def add_intake_routes(app: web.Application, settings: Settings, store=None, limiter=None,
                      publisher=None) -> Gateway:
    from streams.integrations import IntegrationStore

    tenants = load_tenants(settings.tenants_file)
    store = store or IntegrationStore(settings.postgres_dsn, settings.db_prefix, tenants)
    limiter = limiter or RateLimiter(settings.rate_per_integration, settings.rate_per_tenant)
    publisher = publisher or Publisher(settings.kafka_bootstrap_servers, tenants)
    gw = Gateway(settings, store, limiter, publisher)

    def address_of(request: web.Request) -> str:
        return client_address(request.remote, request.headers.get("X-Forwarded-For"), settings.trusted_proxies)

    async def respond(kind: str, key: str | None, request: web.Request) -> web.Response:
        started = time.perf_counter()
        address = address_of(request)
        wait = gw.addresses.take(address, time.monotonic())
        if wait:
            answer = gw.too_many(kind, address, wait)
        else:
            answer = await answer_request(kind, key, request)
            if answer.status != 401:  # only failed authentications use the address's tokens up
                gw.addresses.give_back(address, time.monotonic())
        metrics.GATEWAY_REQUESTS.labels(gw.tenant_label(answer.tenant or (key_tenant(key) if key else None)),
                                        kind, str(answer.status)).inc()
        metrics.GATEWAY_SECONDS.labels(kind).observe(time.perf_counter() - started)
        return web.Response(body=orjson.dumps(answer.body), status=answer.status, headers=answer.headers,
                            content_type="application/json")

    async def answer_request(kind: str, key: str | None, request: web.Request) -> Answer:
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
        return answer

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
        key = request.match_info["key"]
        address = address_of(request)
        wait = gw.addresses.take(address, time.monotonic())
        if wait:
            answer = gw.too_many("slack", address, wait)
        else:
            answer = await gw.slack_action(key, await _read_body(request), request.headers)
            if answer.status != 401:
                gw.addresses.give_back(address, time.monotonic())
        metrics.GATEWAY_REQUESTS.labels(gw.tenant_label(answer.tenant or key_tenant(key)), "slack",
                                        str(answer.status)).inc()
        if answer.status == 200:
            return web.Response(status=200)  # Slack wants a quick empty 200; the message is updated apart
        return web.Response(body=orjson.dumps(answer.body), status=answer.status, headers=answer.headers,
                            content_type="application/json")

    app.router.add_post("/v2/enqueue", enqueue)
    app.router.add_post("/v1/integrations/{key}/slack/actions", slack_actions)
    app.router.add_post("/v1/integrations/{key}/{kind}", monitor)
    app.router.add_get("/ready", ready)
    app.on_cleanup.append(on_cleanup)
    app[GATEWAY_KEY] = gw
    return gw
