"""Notifications with a real worker and local HTTP receivers on a file clock: retries with backoff and
Retry-After, permanent failures and endpoint disabling, the outbound policy (private address,
redirect), Slack messages, escalation notifications to a person's contact, shadow pages never sent,
and a worker SIGKILLed with deliveries pending that loses none."""

from __future__ import annotations

import time

import pytest

from streams.domain.auth import verify_signature
from streams.engines import free_port
from tests.receivers import Receiver
from tests.integration.test_paging_e2e import Pager, _metric

pytestmark = pytest.mark.integration

SEC = 1000
TENANT = "on-call"


def config(rx: Receiver, dead_port: int, extra: str = "") -> str:
    return f"""\
ack_timeout: off
users:
  u-ann: {{name: Ann Notify, email: ann@example.com, contact: {{webhook: "{rx.url('/ann')}"}}}}
escalation_policies:
  p:
    steps:
      - {{escalate_after_seconds: 300, targets: [{{user: u-ann}}]}}
routing_rules:
  - {{id: pages, match: {{source: pager}}, escalation_policy: p}}
endpoints:
  ok: {{type: webhook, url: "{rx.url('/ok')}", secret: whsec_test}}
  flaky: {{type: webhook, url: "{rx.url('/flaky')}"}}
  throttled: {{type: webhook, url: "{rx.url('/throttle')}"}}
  gone: {{type: webhook, url: "{rx.url('/gone')}"}}
  redirect: {{type: webhook, url: "{rx.url('/redirect')}"}}
  dead: {{type: webhook, url: "http://127.0.0.1:{dead_port}/x"}}
  private: {{type: webhook, url: "http://10.255.255.1:8080/x"}}
  slack: {{type: slack, url: "{rx.url('/slack')}"}}
  slow: {{type: webhook, url: "{rx.url('/slow')}"}}
notification_rules:
  - id: new-cases
    event_types: [CaseCreated]
    match: {{source: notify-test}}
    endpoints: [ok, flaky, throttled, gone, redirect, dead, private, slack, slow]
delivery:
  timeout: 1s
  retry_window: 10m
  disable_after: 2
  breaker_failures: 3
  allow_networks: ["127.0.0.0/8"]
  allow_http: true
{extra}"""


def outcomes(pg: Pager, prefix: str, count: int) -> list[dict]:
    kinds = ("NotificationDelivered", "NotificationFailed", "EndpointDisabled")
    return pg.stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key", "").startswith(prefix)
                         and r["type"] in kinds, count=count)


@pytest.fixture
def rx():
    r = Receiver(script={"/flaky": [500, 500, 200], "/throttle": [(429, {"Retry-After": "120"}), 200],
                         "/gone": [410], "/redirect": [302], "/slow": [("sleep", 3, 200), 200]}).start()
    yield r
    r.stop()


def test_deliveries_retries_failures_and_policy(fresh_stack, tmp_path, rx, run_id):
    start = (int(time.time() * 1000) // 60_000) * 60_000
    pg = Pager(fresh_stack, TENANT, config(rx, free_port()), tmp_path, start)
    pg.start()
    t0 = start
    a = f"{run_id}/a"
    pg.send([{"event_id": f"{run_id}-a", "action": "trigger", "dedup_key": a, "summary": "notify me",
              "source": "notify-test", "severity": "critical"}])
    stack = pg.stack
    # first attempts everywhere (nothing for the private address; the redirect is not followed)
    stack.poll(lambda: {p: len(rx.on(p)) for p in ("/ok", "/flaky", "/throttle", "/gone", "/redirect", "/slack",
                                                    "/slow")},
               lambda n: all(v == 1 for v in n.values()), what="first attempts")
    got = {e["endpoint"]: e for e in outcomes(pg, a, 5)}
    assert got["ok"]["type"] == "NotificationDelivered" and got["ok"]["attempts"] == 1
    assert got["slack"]["type"] == "NotificationDelivered"
    assert got["gone"]["type"] == "NotificationFailed" and got["gone"]["permanent"] and got["gone"]["status_code"] == 410
    assert got["redirect"]["type"] == "NotificationFailed" and got["redirect"]["permanent"]
    assert got["private"]["type"] == "NotificationFailed" and "outbound policy" in got["private"]["reason"]
    redirected = rx.on("/redirect")[0].delivery_id
    assert redirected not in rx.delivery_ids("/ok")            # the 302 was not followed

    # the webhook is signed and carries its delivery id; Slack gets Block Kit with buttons
    hit = rx.on("/ok")[0]
    assert verify_signature("whsec_test", hit.headers["X-Casestream-Signature"], hit.body, int(time.time())) is None
    assert hit.json["delivery"]["id"] == hit.delivery_id and hit.json["event"]["type"] == "CaseCreated"
    blocks = rx.on("/slack")[0].json["blocks"]
    buttons = [el["action_id"] for b in blocks if b["type"] == "actions" for el in b["elements"]]
    assert buttons == ["casestream_acknowledge", "casestream_resolve"]

    # retries happen on the clock: Retry-After 120 s, backoff for the 500s, the slow answer that timed out,
    # the dead port until the window ends. First every first attempt's result is in (4 to retry):
    retries = 'casestream_notification_deliveries_total{channel="webhook",outcome="retry"'
    stack.poll(lambda: _metric(pg.worker.metrics_port, retries), lambda n: n >= 4, what="the first retry results")
    pg.at(t0 + 121 * SEC)
    stack.poll(lambda: (len(rx.on("/flaky")), len(rx.on("/throttle"))), lambda n: n == (2, 2), what="retries")
    pg.at(t0 + 200 * SEC)
    stack.poll(lambda: (len(rx.on("/flaky")), len(rx.on("/slow"))), lambda n: n == (3, 2),
               what="the third flaky attempt and the second slow one")
    pg.at(t0 + 11 * 60 * SEC)
    got = {e["endpoint"]: e for e in outcomes(pg, a, 9)}
    assert (got["flaky"]["type"], got["flaky"]["attempts"]) == ("NotificationDelivered", 3)
    assert (got["throttled"]["type"], got["throttled"]["attempts"]) == ("NotificationDelivered", 2)
    assert (got["slow"]["type"], got["slow"]["attempts"]) == ("NotificationDelivered", 2), got["slow"]["reason"]  # 3 s: timed out
    assert got["dead"]["type"] == "NotificationFailed" and not got["dead"]["permanent"]
    assert "retry window" in got["dead"]["reason"]
    assert len(rx.on("/flaky")) == 3 and len(rx.on("/throttle")) == 2   # nothing after success

    # a second permanent failure disables 'gone'; a third delivery is refused without a request
    b, c = f"{run_id}/b", f"{run_id}/c"
    pg.send([{"event_id": f"{run_id}-b", "action": "trigger", "dedup_key": b, "summary": "again",
              "source": "notify-test"}])
    disabled = stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") == b
                          and r["type"] == "EndpointDisabled", count=3)
    # every endpoint that failed permanently twice: the 410, the redirect, the refused private address
    assert {(d["endpoint"], d["consecutive_failures"]) for d in disabled} == {("gone", 2), ("redirect", 2),
                                                                            ("private", 2)}
    pg.send([{"event_id": f"{run_id}-c", "action": "trigger", "dedup_key": c, "summary": "and again",
              "source": "notify-test"}])
    failed = stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") == c
                        and r["type"] == "NotificationFailed" and r["endpoint"] == "gone", count=1)[0]
    assert "disabled" in failed["reason"] and len(rx.on("/gone")) == 2

    # escalation notifies the person's contact; a shadow page's notification is never sent
    page, shadow = f"{run_id}/page", f"{run_id}/shadow"
    pg.send([{"event_id": f"{run_id}-p", "action": "trigger", "dedup_key": page, "summary": "page", "source": "pager"},
             {"event_id": f"{run_id}-s", "action": "trigger", "dedup_key": shadow, "summary": "shadow",
              "source": "pager", "is_shadow": True}])
    delivered = stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") == page
                           and r["type"] == "NotificationDelivered", count=1)[0]
    assert (delivered["endpoint"], delivered["user_id"]) == ("user:u-ann:webhook", "u-ann")
    assert delivered["notification_id"]
    requested = stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") == shadow
                           and r["type"] == "NotificationRequested", count=1, settle=2.0)
    assert requested[0]["is_shadow"] is True
    bodies = [h.json for h in rx.on("/ann")]
    assert [b["event"]["type"] for b in bodies] == ["NotificationRequested"]
    assert all(b["event"]["dedup_key"] == page for b in bodies)
    port = pg.worker.metrics_port
    assert _metric(port, 'casestream_notification_deliveries_total{channel="webhook",outcome="delivered"') >= 4
    assert _metric(port, retries) >= 4
    assert _metric(port, "casestream_notification_delivery_duration_seconds_count") >= 8
    # the dead port opened its breaker (3 failures in a row); the probe after the pause failed too
    assert _metric(port, 'casestream_notification_breaker_state{endpoint="dead"') == 2


def test_worker_killed_with_deliveries_pending_loses_none(fresh_stack, tmp_path, run_id):
    rx = Receiver(script={"/slow": [("sleep", 0.5, 200)]}).start()
    try:
        start = (int(time.time() * 1000) // 60_000) * 60_000
        cfg = config(rx, free_port()).replace(
            "endpoints: [ok, flaky, throttled, gone, redirect, dead, private, slack, slow]", "endpoints: [slow]")
        pg = Pager(fresh_stack, TENANT, cfg, tmp_path, start)
        worker = pg.start(instance_id=f"notify-{run_id}")
        n = 40
        pg.send([{"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": f"{run_id}/{i}", "summary": "x",
                  "source": "notify-test"} for i in range(n)])
        fresh_stack.poll(lambda: len(rx.delivery_ids("/slow")), lambda k: k >= 3, what="some deliveries")
        worker.kill()
        assert len(rx.delivery_ids("/slow")) < n   # killed with deliveries pending
        pg.start(instance_id=worker.instance_id, data_dir=worker.data_dir)
        fresh_stack.poll(lambda: len(rx.delivery_ids("/slow")), lambda k: k == n, what="every delivery")
        done = outcomes(pg, f"{run_id}/", n)
        assert len({e["delivery_id"] for e in done if e["type"] == "NotificationDelivered"}) == n
        # once per delivery id on the timeline (by content), whatever the receiver saw twice
        assert len({(e["case_id"], e["version"]) for e in done}) == n
        assert len({e["event_id"] for e in done}) == n
    finally:
        rx.stop()


def _slack_request(secret: str, payload: dict, ts: int) -> tuple[bytes, dict]:
    import hashlib
    import hmac
    import json
    import urllib.parse

    body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
    sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return body, {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sig,
                  "Content-Type": "application/x-www-form-urlencoded"}


def test_slack_button_acknowledges_the_page_and_updates_the_message(fresh_stack, tmp_path, run_id):
    import asyncio
    import urllib.error
    import urllib.request

    from streams.integrations import IntegrationStore
    from tests.integration.test_gateway import start_gateway

    rx = Receiver().start()
    try:
        stack = fresh_stack
        start = (int(time.time() * 1000) // 60_000) * 60_000
        cfg = config(rx, free_port()).replace(
            "endpoints: [ok, flaky, throttled, gone, redirect, dead, private, slack, slow]", "endpoints: [slack]")
        pg = Pager(stack, TENANT, cfg, tmp_path, start)
        pg.start()
        secret = "8f742231b10e8888abcd99yyyzzz85a5"

        async def make():
            store = IntegrationStore(stack.postgres_dsn, stack.db_prefix, [TENANT])
            try:
                return (await store.create(TENANT, "slack", "slack app", signing_secret=secret))[1]
            finally:
                await store.close()

        key = asyncio.run(make())
        base, gw = start_gateway(stack, tmp_path, CASESTREAM_SLACK_RESPONSE_PREFIXES=rx.url("/"))
        try:
            dedup = f"{run_id}/slack"
            pg.send([{"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": dedup, "summary": "checkout down",
                      "source": "notify-test", "severity": "critical"}])
            stack.poll(lambda: rx.on("/slack"), lambda h: len(h) == 1, what="the Slack message")
            message = rx.on("/slack")[0].json
            ack = next(el for b in message["blocks"] if b["type"] == "actions" for el in b["elements"]
                       if el["action_id"] == "casestream_acknowledge")
            payload = {"type": "block_actions", "user": {"id": "U0ANN", "username": "ann", "name": "ann"},
                       "team": {"id": "T0"}, "channel": {"id": "C0"}, "response_url": rx.url("/response"),
                       "message": {"ts": "1.2", "blocks": message["blocks"]},
                       "actions": [{"action_id": "casestream_acknowledge", "value": ack["value"],
                                    "block_id": "casestream_actions", "type": "button", "action_ts": "3.4"}]}
            url = f"{base}/v1/integrations/{key}/slack/actions"

            def post(body, headers):
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        return r.status
                except urllib.error.HTTPError as exc:
                    return exc.code

            now = int(time.time())
            body, headers = _slack_request("wrong-secret", payload, now)
            assert post(body, headers) == 401                                  # bad signature
            body, headers = _slack_request(secret, payload, now - 600)
            assert post(body, headers) == 401                                  # stale
            body, headers = _slack_request(secret, payload, now)
            assert post(body, dict(headers, **{"X-Slack-Signature": "v0=" + "0" * 64})) == 401
            assert post(body, headers) == 200
            assert post(body, headers) == 401                                  # the same press again: a replay
            changed = stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") == dedup
                                 and r["type"] == "StatusChanged", count=1, settle=1.5)
            assert len(changed) == 1                                            # the refused presses did nothing
            assert changed[0]["to_status"] == "ACKNOWLEDGED" and changed[0]["actor"]["id"] == "slack:U0ANN"
            stack.poll(lambda: rx.on("/response"), lambda h: len(h) == 1, what="the message update")
            update = rx.on("/response")[0].json
            assert update["replace_original"] is True and "U0ANN" in orjson_text(update)
            remaining = [el["action_id"] for b in update["blocks"] if b["type"] == "actions" for el in b["elements"]]
            assert "casestream_acknowledge" not in remaining
        finally:
            gw.terminate()
            gw.wait(20)
    finally:
        rx.stop()


def orjson_text(obj) -> str:
    import orjson

    return orjson.dumps(obj).decode()


def test_a_failed_notification_is_dead_lettered_and_replayed_after_a_fix(fresh_stack, tmp_path, run_id):
    import subprocess
    import sys

    from streams.config import PROJECT_ROOT

    rx = Receiver(script={"/fixme": [410, 200]}).start()   # wrong at first, fixed by the time of the replay
    try:
        stack = fresh_stack
        start = (int(time.time() * 1000) // 60_000) * 60_000
        cfg = config(rx, free_port()).replace(
            "endpoints: [ok, flaky, throttled, gone, redirect, dead, private, slack, slow]", "endpoints: [fixme]")
        cfg = cfg.replace("endpoints:\n", f"endpoints:\n  fixme: {{type: webhook, url: \"{rx.url('/fixme')}\"}}\n", 1)
        pg = Pager(stack, TENANT, cfg, tmp_path, start)
        pg.start()
        key = f"{run_id}/fix"
        pg.send([{"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": key, "summary": "x",
                  "source": "notify-test"}])
        failed = outcomes(pg, key, 1)[0]
        assert failed["type"] == "NotificationFailed" and failed["status_code"] == 410
        dead = stack.read(TENANT, "dlq", lambda r: r.get("reason") == "notification_failed"
                          and key in (r.get("original") or ""), count=1)[0]
        assert failed["delivery_id"] in dead["detail"]

        def replay():
            out = subprocess.run([sys.executable, "-m", "streams.cli", "dlq", "replay", "--tenant", TENANT,
                                  "--reason", "notification_failed", "--match", key, "--json"],
                                 env=stack.env, cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr

        replay()
        delivered = stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") == key
                               and r["type"] == "NotificationDelivered", count=1)[0]
        assert delivered["delivery_id"] == failed["delivery_id"]
        replay()                                                   # idempotent: delivered stays delivered
        again = stack.read(TENANT, "domain-events", lambda r: r.get("dedup_key") == key
                           and r["type"] == "NotificationDelivered", count=1, settle=2.0)
        assert len(again) == 1 and len(rx.on("/fixme")) == 2
        assert rx.delivery_ids("/fixme") == {failed["delivery_id"]}   # the same delivery id both times
    finally:
        rx.stop()
