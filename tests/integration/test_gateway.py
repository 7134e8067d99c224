"""The intake gateway (`casestream api --routes intake`) over real sockets: unmodified monitor
payloads become the right cases end to end through the worker; every refusal path answers its
documented status (checked against schemas/openapi.json) and publishes nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from streams.config import PROJECT_ROOT
from streams.domain.auth import sign
from streams.integrations import IntegrationStore
from streams.engines import free_port

pytestmark = pytest.mark.integration

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "monitors"
DOC = json.loads((PROJECT_ROOT / "schemas" / "openapi.json").read_text())
TENANT = "on-call"


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def post(base: str, path: str, body: bytes, headers: dict | None = None):
    req = urllib.request.Request(base + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        status, raw, hdrs = exc.code, exc.read(), dict(exc.headers)
    body = orjson.loads(raw)
    _check_documented(path, status, body)
    return status, body, hdrs


def _check_documented(path: str, status: int, body: dict) -> None:
    """The answer is one the OpenAPI document declares for that route, with its required fields."""
    route = "/v2/enqueue" if path == "/v2/enqueue" else "/v1/integrations/{key}/{kind}"
    responses = DOC["paths"][route]["post"]["responses"]
    assert str(status) in responses, (path, status, body)
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = DOC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    missing = set(schema.get("required", ())) - set(body)
    assert not missing, (path, status, body, missing)


def start_gateway(stack, tmp: Path, **env) -> tuple[str, subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "api", "--routes", "intake", "--port", str(port)],
                            env=dict(stack.env, **env), cwd=str(PROJECT_ROOT),
                            stdout=open(tmp / f"gateway-{port}.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def health():
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                return r.status
        except OSError:
            return None

    stack.poll(health, lambda s: s == 200, what="the gateway to answer")
    return base, proc


@pytest.fixture(scope="module")
def gw(stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")

    async def make():
        store = IntegrationStore(stack.postgres_dsn, stack.db_prefix, [TENANT, "case-management"])
        try:
            keys = {}
            for kind in ("pagerduty", "alertmanager", "grafana", "datadog", "events"):
                keys[kind] = (await store.create(TENANT, kind, f"test {kind}"))[1]
            signed, keys["signed"] = await store.create(TENANT, "events", "signed events", signed=True)
            revoked, keys["revoked"] = await store.create(TENANT, "events", "revoked")
            await store.revoke(TENANT, revoked.id)
            keys["cm-events"] = (await store.create("case-management", "events", "cm events"))[1]
            return keys, signed.signing_secret
        finally:
            await store.close()

    keys, secret = asyncio.run(make())
    base, proc = start_gateway(stack, tmp)
    yield {"base": base, "keys": keys, "secret": secret, "tmp": tmp}
    proc.terminate()
    proc.wait(20)


def events_for(stack, keys: set[str], count: int) -> list[dict]:
    return stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") in keys, count=count)


def statuses(events: list[dict]) -> dict[str, str]:
    """dedup key -> status after the last StatusChanged (or TRIGGERED)."""
    out: dict[str, tuple[int, str]] = {}
    for e in events:
        st = e.get("to_status") or (e.get("status") if e["type"] == "CaseCreated" else None)
        if st and e["version"] >= out.get(e["dedup_key"], (0, ""))[0]:
            out[e["dedup_key"]] = (e["version"], st)
    return {k: v[1] for k, v in out.items()}


def test_alertmanager_group_firing_then_resolved(stack, gw):
    status, body, _ = post(gw["base"], f"/v1/integrations/{gw['keys']['alertmanager']}/alertmanager",
                           fixture("alertmanager_firing"))
    assert status == 202 and body["events"] == 3
    keys = set(body["dedup_keys"])
    created = events_for(stack, keys, 3)
    assert {e["type"] for e in created} == {"CaseCreated"}
    assert {e["severity"] for e in created} == {"critical", "warning"}
    # the same notification again (Alertmanager repeats it): no second effect
    assert post(gw["base"], f"/v1/integrations/{gw['keys']['alertmanager']}/alertmanager",
                fixture("alertmanager_firing"))[0] == 202
    status, body, _ = post(gw["base"], f"/v1/integrations/{gw['keys']['alertmanager']}/alertmanager",
                           fixture("alertmanager_resolved"))
    assert status == 202 and set(body["dedup_keys"]) == keys
    events = events_for(stack, keys, 6)
    assert statuses(events) == dict.fromkeys(keys, "RESOLVED")
    assert not [e for e in events if e["type"] == "AlertDeduplicated"]


def test_grafana_alerting_then_ok(stack, gw):
    url = f"/v1/integrations/{gw['keys']['grafana']}/grafana"
    status, body, _ = post(gw["base"], url, fixture("grafana_alerting"))
    assert status == 202 and body["events"] == 2
    keys = set(body["dedup_keys"])
    assert post(gw["base"], url, fixture("grafana_ok"))[0] == 202
    assert statuses(events_for(stack, keys, 4)) == dict.fromkeys(keys, "RESOLVED")


def test_datadog_triggered_then_recovered(stack, gw):
    url = f"/v1/integrations/{gw['keys']['datadog']}/datadog"
    status, body, _ = post(gw["base"], url, fixture("datadog_triggered"))
    assert status == 202
    (key,) = body["dedup_keys"]
    created = events_for(stack, {key}, 1)[0]
    assert created["type"] == "CaseCreated" and created["priority"] == "P1"
    assert post(gw["base"], url, fixture("datadog_recovered"))[0] == 202
    assert statuses(events_for(stack, {key}, 2)) == {key: "RESOLVED"}


def test_pagerduty_resolve_before_trigger_then_trigger_ack_resolve(stack, gw):
    def enqueue(name: str):
        body = orjson.loads(fixture(name))
        body["routing_key"] = gw["keys"]["pagerduty"]
        return post(gw["base"], "/v2/enqueue", orjson.dumps(body))

    status, body, _ = enqueue("pagerduty_resolve")       # PagerDuty accepts it; nothing is open
    assert (status, body["status"], body["message"]) == (202, "success", "Event processed")
    key = body["dedup_key"]
    stack.read(TENANT, "dlq", lambda r: key in (r.get("original") or "") and r["reason"] == "no_open_case", count=1)
    for name in ("pagerduty_trigger", "pagerduty_acknowledge", "pagerduty_resolve"):
        status, body, _ = enqueue(name)
        assert status == 202 and body["dedup_key"] == key, body
    events = events_for(stack, {key}, 3)
    assert [e["type"] for e in sorted(events, key=lambda e: e["version"])] == \
        ["CaseCreated", "StatusChanged", "StatusChanged"]
    assert statuses(events) == {key: "RESOLVED"}


def test_pagerduty_validation_errors_in_pagerduty_format(gw):
    body = {"routing_key": gw["keys"]["pagerduty"], "event_action": "trigger",
            "payload": {"summary": "x" * 1025, "severity": "fatal"}}
    status, answer, _ = post(gw["base"], "/v2/enqueue", orjson.dumps(body))
    assert status == 400 and answer["status"] == "invalid event" and answer["message"] == "Event object is invalid"
    text = " ".join(answer["errors"])
    assert "summary" in text and "severity" in text and "source" in text


def test_canonical_events_both_tenants_keep_to_their_own(stack, gw, run_id):
    msgs = [{"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": f"{run_id}/gw-{i}", "summary": "via gw"}
            for i in range(3)]
    status, body, _ = post(gw["base"], f"/v1/integrations/{gw['keys']['events']}/events", orjson.dumps(msgs))
    assert status == 202 and body["events"] == 3
    assert len(events_for(stack, {m["dedup_key"] for m in msgs}, 3)) == 3
    status, _, _ = post(gw["base"], f"/v1/integrations/{gw['keys']['cm-events']}/events",
                        orjson.dumps({"event_id": f"{run_id}-cm", "action": "trigger",
                                      "dedup_key": f"{run_id}/cm", "summary": "cm"}))
    assert status == 202
    assert stack.read("case-management", "domain-events", lambda r: r.get("dedup_key") == f"{run_id}/cm", count=1)


def _nothing_published(stack, marker: str) -> None:
    assert stack.read(TENANT, "intake", lambda r: marker in orjson.dumps(r).decode(), count=0, settle=1.5) == []


def test_refusals_publish_nothing(stack, gw, run_id):
    keys, base = gw["keys"], gw["base"]
    one = orjson.dumps({"event_id": f"{run_id}-x", "action": "trigger", "dedup_key": f"{run_id}/x", "summary": "x"})
    cases = [
        ("unknown key", f"/v1/integrations/cs_on-call_{'A' * 32}/events", one, {}, 401),
        ("not a key", "/v1/integrations/nonsense/events", one, {}, 401),
        ("revoked key", f"/v1/integrations/{keys['revoked']}/events", one, {}, 401),
        ("key of another kind", f"/v1/integrations/{keys['alertmanager']}/events", one, {}, 403),
        ("too large", f"/v1/integrations/{keys['events']}/events",
         orjson.dumps({"action": "trigger", "summary": run_id, "custom_details": {"x": "y" * (513 * 1024)}}), {}, 413),
        ("too deep", f"/v1/integrations/{keys['events']}/events",
         b'{"summary": "' + run_id.encode() + b'", "d": ' + b"[" * 70 + b"]" * 70 + b"}", {}, 400),
        ("not JSON", f"/v1/integrations/{keys['events']}/events", run_id.encode() + b"{", {}, 400),
        ("invalid event", f"/v1/integrations/{keys['events']}/events",
         orjson.dumps([orjson.loads(one), {"action": "trigger", "dedup_key": run_id}]), {}, 400),
        ("unsigned", f"/v1/integrations/{keys['signed']}/events", one, {}, 401),
        ("bad signature", f"/v1/integrations/{keys['signed']}/events", one,
         {"X-Casestream-Signature": sign("whsec_wrong", one, int(time.time()))}, 401),
        ("replayed (stale) signature", f"/v1/integrations/{keys['signed']}/events", one,
         {"X-Casestream-Signature": sign(gw["secret"], one, int(time.time()) - 600)}, 401),
    ]
    for what, path, body, headers, want in cases:
        status, answer, _ = post(base, path, body, headers)
        assert status == want, (what, status, answer)
        if want == 400 and what == "invalid event":
            assert answer["errors"][0]["field"] == "[1]" and "summary" in answer["errors"][0]["message"]
    _nothing_published(stack, run_id)
    # the good signature passes
    status, _, _ = post(base, f"/v1/integrations/{keys['signed']}/events", one,
                        {"X-Casestream-Signature": sign(gw["secret"], one, int(time.time()))})
    assert status == 202
    assert events_for(stack, {f"{run_id}/x"}, 1)


def test_a_signed_request_sent_twice_is_a_replay(stack, gw, run_id):
    """The same signed request, within its window: accepted once, then refused like a stale one."""
    url = f"/v1/integrations/{gw['keys']['signed']}/events"
    one = orjson.dumps({"event_id": f"{run_id}-r", "action": "trigger", "dedup_key": f"{run_id}/r", "summary": "r"})
    headers = {"X-Casestream-Signature": sign(gw["secret"], one, int(time.time()))}
    assert post(gw["base"], url, one, headers)[0] == 202
    status, body, _ = post(gw["base"], url, one, headers)
    assert status == 401 and body["error"] == "unauthorized"
    assert body["message"] == "X-Casestream-Signature: signature already used (a replay); sign each request anew"
    assert len(events_for(stack, {f"{run_id}/r"}, 1)) == 1


def _raw_post(base: str, path: str, head: dict, parts: list[bytes]) -> tuple[int, dict]:
    """POST over a plain socket, the body in several writes; the status and JSON answer."""
    import http.client
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in head.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for part in parts:
            sock.sendall(part)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        answer = orjson.loads(resp.read())
    _check_documented(path, resp.status, answer)
    return resp.status, answer


def test_bodies_in_several_writes_and_chunked(stack, gw, run_id):
    url = f"/v1/integrations/{gw['keys']['events']}/events"
    big = orjson.dumps({"event_id": f"{run_id}-big", "action": "trigger", "dedup_key": f"{run_id}/big",
                        "summary": "big", "custom_details": {"pad": "x" * (300 * 1024)}})
    status, body = _raw_post(gw["base"], url, {"Content-Length": len(big)}, [big[:1000], big[1000:]])
    assert status == 202, body

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    status, body = _raw_post(gw["base"], url, {"Transfer-Encoding": "chunked"},
                             [chunk(big[:1000]), chunk(big[1000:]), b"0\r\n\r\n"])
    assert status == 202, body
    huge = orjson.dumps({"action": "trigger", "summary": run_id, "custom_details": {"x": "y" * (600 * 1024)}})
    status, body = _raw_post(gw["base"], url, {"Transfer-Encoding": "chunked"},
                             [chunk(huge[:300 * 1024]), chunk(huge[300 * 1024:]), b"0\r\n\r\n"])
    assert status == 413 and body["error"] == "too_large"
    assert len(events_for(stack, {f"{run_id}/big"}, 1)) == 1
    _nothing_published(stack, run_id + '"')


def test_rate_limit_answers_429_and_dead_letters(stack, gw, run_id):
    base, proc = start_gateway(stack, gw["tmp"], CASESTREAM_RATE_PER_INTEGRATION="0.01/3")
    try:
        url = f"/v1/integrations/{gw['keys']['events']}/events"
        msgs = [{"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": f"{run_id}/rl-{i}", "summary": "rl"}
                for i in range(5)]
        assert post(base, url, orjson.dumps(msgs[:3]))[0] == 202          # the burst
        status, body, headers = post(base, url, orjson.dumps(msgs[3]))
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["limit"]["scope"] == "integration" and body["integration"].startswith("int_")
        assert gw["keys"]["events"] not in orjson.dumps(body).decode()  # the key itself is never echoed
        dead = stack.read(TENANT, "dlq", lambda r: r.get("reason") == "rate_limited"
                          and f"{run_id}-3" in (r.get("original") or ""), count=1)
        assert gw["keys"]["events"] not in orjson.dumps(dead).decode()
        status, body, _ = post(base, url, orjson.dumps(msgs))              # more than the burst, ever
        assert status == 429 and "burst" in body["message"]
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'casestream_gateway_events_total{kind="events",outcome="rate_limited",tenant="on-call"}' in text
        assert len(events_for(stack, {m["dedup_key"] for m in msgs}, 3)) == 3
        _nothing_published(stack, f"{run_id}-4")
    finally:
        proc.terminate()
        proc.wait(20)


def test_kafka_unreachable_is_503_and_not_ready(stack, gw, run_id):
    base, proc = start_gateway(stack, gw["tmp"], KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    try:
        status, body, _ = post(base, f"/v1/integrations/{gw['keys']['events']}/events",
                               orjson.dumps({"action": "trigger", "dedup_key": f"{run_id}/down", "summary": "x"}))
        assert status == 503 and body["error"] == "unavailable"
        try:
            urllib.request.urlopen(base + "/ready", timeout=30)
            ready = 200
        except urllib.error.HTTPError as exc:
            ready = exc.code
        assert ready == 503
    finally:
        proc.terminate()
        proc.wait(20)
    with urllib.request.urlopen(gw["base"] + "/ready", timeout=30) as r:
        assert r.status == 200


def test_openapi_is_served(gw):
    with urllib.request.urlopen(gw["base"] + "/openapi.json", timeout=5) as r:
        assert orjson.loads(r.read()) == DOC
