"""The gateway's HTTP layer over real loopback sockets (an aiohttp server in this process): the
body reader, the limiter in front of authentication, metric labels, signature replays.

PostgreSQL and Kafka are not needed here: the integration store and the publisher are small
in-memory stand-ins (tests/integration/test_gateway.py runs the same paths against the real
servers)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import aiohttp
import orjson
import pytest
from aiohttp import web

from streams import metrics
from streams.domain.auth import sign
from streams.gateway import MAX_BODY, Unavailable, _read_body, add_intake_routes
from streams.integrations import Integration
from streams.settings import load_settings

DEADLINE = 20.0
TENANT = "on-call"
KEY = "cs_on-call_" + "K" * 32
SIGNED_KEY = "cs_on-call_" + "S" * 32
SECRET = "whsec_" + "x" * 32


def _integration(iid: str, secret: str | None = None) -> Integration:
    return Integration(iid, TENANT, "events", "test", {}, secret, datetime.now(timezone.utc), None)


class Store:
    """Known keys, and a count of look-ups (each would be a PostgreSQL query)."""

    def __init__(self):
        self.keys = {KEY: _integration("int_000000000001"), SIGNED_KEY: _integration("int_000000000002", SECRET)}
        self.lookups = 0

    async def authenticate(self, key):
        self.lookups += 1
        return self.keys.get(key)

    async def close(self):
        pass


class Publisher:
    def __init__(self):
        self.published: list = []
        self.down = False

    async def publish(self, tenant, records):
        if self.down:
            raise Unavailable("Kafka did not acknowledge: test")
        first = len(self.published)
        self.published.extend(records)
        return [(f"{tenant}.intake", 0, first + i) for i in range(len(records))]  # where Kafka placed them

    async def dead_letter(self, tenant, record):
        pass

    async def ready(self):
        return True

    async def close(self):
        pass


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return status, await asyncio.wait_for(reader.readexactly(length), DEADLINE)


# --------------------------------------------------------------------------
# the body reader
# --------------------------------------------------------------------------


def _reader_app(started: list) -> web.Application:
    """A route reading its body with the gateway's reader; ``started`` gets a future resolved when
    the handler starts (the first part of the body is in its buffer by then: aiohttp feeds the
    payload that came with the headers before the handler task runs)."""

    async def handler(request: web.Request) -> web.Response:
        started[0].set_result(None)
        body = await _read_body(request)
        if body is None:
            return web.Response(status=413, text="too large")
        return web.Response(status=200, body=orjson.dumps({"length": len(body), "json": _is_json(body)}))

    app = web.Application()
    app.router.add_post("/body", handler)
    return app


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
        return True
    except orjson.JSONDecodeError:
        return False


async def _two_writes(head: bytes, first: bytes, second: bytes) -> tuple[int, bytes]:
    """Send ``head + first``; once the handler has started (and done what it does with the first
    part alone), send ``second``; the answer."""
    started = [asyncio.get_running_loop().create_future()]
    runner, port = await _serve(_reader_app(started))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + first)
        await writer.drain()
        await asyncio.wait_for(started[0], DEADLINE)
        writer.write(second)
        await writer.drain()
        answer = await _response(reader)
        writer.close()
        return answer
    finally:
        await runner.cleanup()


BIG = orjson.dumps({"action": "trigger", "summary": "s", "custom_details": {"pad": "x" * (300 * 1024)}})


def test_a_valid_body_sent_in_two_writes_is_read_whole():
    head = (b"POST /body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(BIG)).encode() + b"\r\nConnection: close\r\n\r\n")
    status, body = asyncio.run(_two_writes(head, BIG[:1000], BIG[1000:]))
    assert status == 200 and orjson.loads(body) == {"length": len(BIG), "json": True}


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHUNKED_HEAD = (b"POST /body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")


def test_a_chunked_body_in_two_writes_is_read_whole():
    status, body = asyncio.run(_two_writes(CHUNKED_HEAD, _chunk(BIG[:1000]), _chunk(BIG[1000:]) + b"0\r\n\r\n"))
    assert status == 200 and orjson.loads(body) == {"length": len(BIG), "json": True}


def test_a_chunked_body_over_the_limit_is_413():
    part = b"y" * (MAX_BODY // 2 + 1024)      # each part alone is under the limit, both are over it
    status, _ = asyncio.run(_two_writes(CHUNKED_HEAD, _chunk(part), _chunk(part) + b"0\r\n\r\n"))
    assert status == 413


def test_a_body_of_exactly_the_limit_is_read():
    data = b"z" * MAX_BODY
    status, body = asyncio.run(_two_writes(CHUNKED_HEAD, _chunk(data[:10]), _chunk(data[10:]) + b"0\r\n\r\n"))
    assert status == 200 and orjson.loads(body)["length"] == MAX_BODY


# --------------------------------------------------------------------------
# the gateway's routes
# --------------------------------------------------------------------------


def _gateway_app(env: dict | None = None):
    settings = load_settings(dict(env or {}))
    app = web.Application()
    store, publisher = Store(), Publisher()
    gw = add_intake_routes(app, settings, store=store, publisher=publisher)
    return app, gw, store, publisher


async def _post(session, port: int, path: str, body: bytes, headers: dict | None = None):
    async with session.post(f"http://127.0.0.1:{port}{path}", data=body,
                            headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, orjson.loads(await r.read()), dict(r.headers)


ONE = orjson.dumps({"event_id": "e-1", "action": "trigger", "dedup_key": "k-1", "summary": "s"})


def _unknown(i: int, tenant: str = TENANT) -> str:
    return f"cs_{tenant}_{i:032d}"


def test_failed_authentications_are_limited_per_client_address():
    async def run():
        app, gw, store, _ = _gateway_app({"CASESTREAM_RATE_PER_ADDRESS": "0.001/20"})
        runner, port = await _serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(30):  # authenticated requests give their token back: they are never counted
                    assert (await _post(s, port, f"/v1/integrations/{KEY}/events", ONE))[0] == 202
                answers = [await _post(s, port, f"/v1/integrations/{_unknown(i)}/events", ONE) for i in range(50)]
                assert [a[0] for a in answers] == [401] * 20 + [429] * 30
                status, body, headers = answers[-1]
                assert int(headers["Retry-After"]) >= 1 and body["error"] == "rate_limited"
                assert "127.0.0.1" in body["message"] and "authentication" in body["message"]
                assert store.lookups == 30 + 20                    # a refused request looks nothing up
                # PagerDuty's route too (its key is in the body), in PagerDuty's format
                status, body, _ = await _post(s, port, "/v2/enqueue", orjson.dumps(
                    {"routing_key": _unknown(99), "event_action": "trigger",
                     "payload": {"summary": "s", "source": "x", "severity": "error"}}))
                assert status == 429 and body["status"] == "throttle event"
                # while the address is over its limit, a good key from it waits too (nothing is known yet)
                assert (await _post(s, port, f"/v1/integrations/{KEY}/events", ONE))[0] == 429
            # another address has its own bucket
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as s:
                assert (await _post(s, port, f"/v1/integrations/{_unknown(1000)}/events", ONE))[0] == 401
                assert (await _post(s, port, f"/v1/integrations/{KEY}/events", ONE))[0] == 202
        finally:
            await runner.cleanup()

    asyncio.run(run())


def test_the_address_limit_is_configurable_and_checked():
    from streams.config import ConfigError

    assert load_settings({}).rate_per_address == (10.0, 100.0)
    assert load_settings({"CASESTREAM_RATE_PER_ADDRESS": "1/5"}).rate_per_address == (1.0, 5.0)
    with pytest.raises(ConfigError, match="CASESTREAM_RATE_PER_ADDRESS"):
        load_settings({"CASESTREAM_RATE_PER_ADDRESS": "lots"})


def test_client_address_behind_trusted_proxies():
    from streams.gateway import client_address

    trusted = ("10.0.0.0/8",)
    assert client_address("203.0.113.9", None, ()) == "203.0.113.9"
    assert client_address("203.0.113.9", "198.51.100.1", ()) == "203.0.113.9"       # not from a proxy we trust
    assert client_address("10.1.1.1", "198.51.100.1", trusted) == "198.51.100.1"
    assert client_address("10.1.1.1", "6.6.6.6, 198.51.100.1, 10.2.2.2", trusted) == "198.51.100.1"
    assert client_address("10.1.1.1", "10.3.3.3", trusted) == "10.3.3.3"
    assert client_address("10.1.1.1", "not an address", trusted) == "10.1.1.1"
    assert client_address("10.1.1.1", None, trusted) == "10.1.1.1"
    # IPv6 clients share a bucket per /64 (one host usually holds a whole /64)
    assert client_address("2001:db8:1:2:3:4:5:6", None, ()) == "2001:db8:1:2::/64"
    assert client_address(None, None, ()) == "unknown"


def _tenant_labels() -> set[str]:
    return {s.labels["tenant"] for m in metrics.GATEWAY_REQUESTS.collect() for s in m.samples}


def test_metric_labels_name_configured_tenants_only():
    async def run():
        app, gw, _, _ = _gateway_app({"CASESTREAM_RATE_PER_ADDRESS": "1000/1000"})
        runner, port = await _serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(40):  # 40 made-up tenants, well-formed keys
                    assert (await _post(s, port, f"/v1/integrations/{_unknown(i, f'made-up-{i}')}/events",
                                        ONE))[0] == 401
                assert (await _post(s, port, f"/v1/integrations/{_unknown(1)}/events", ONE))[0] == 401
                assert (await _post(s, port, "/v1/integrations/nonsense/events", ONE))[0] == 401
                assert (await _post(s, port, f"/v1/integrations/{KEY}/events", ONE))[0] == 202
                body = {"routing_key": KEY, "event_action": "trigger"}
                assert (await _post(s, port, "/v2/enqueue", orjson.dumps(body)))[0] in (400, 403)
        finally:
            await runner.cleanup()
        labels = _tenant_labels()
        assert not {t for t in labels if t.startswith("made-up")}, labels
        assert {"unknown", TENANT} <= labels and labels <= {"unknown", TENANT, "case-management"}

    asyncio.run(run())


def test_a_signed_request_is_accepted_once_unless_it_was_not_accepted():
    async def run():
        app, gw, _, publisher = _gateway_app()
        runner, port = await _serve(app)
        url = f"/v1/integrations/{SIGNED_KEY}/events"
        try:
            async with aiohttp.ClientSession() as s:
                header = {"X-Casestream-Signature": sign(SECRET, ONE, int(gw.clock()))}
                publisher.down = True   # 503: nothing accepted, the same signed request may come again
                assert (await _post(s, port, url, ONE, header))[0] == 503
                publisher.down = False
                assert (await _post(s, port, url, ONE, header))[0] == 202
                status, body, _ = await _post(s, port, url, ONE, header)
                assert status == 401 and body["message"] == \
                    "X-Casestream-Signature: signature already used (a replay); sign each request anew"
                fresh = {"X-Casestream-Signature": sign(SECRET, ONE, int(gw.clock()) + 1)}
                assert (await _post(s, port, url, ONE, fresh))[0] == 202
                assert len(publisher.published) == 2
        finally:
            await runner.cleanup()

    asyncio.run(run())
