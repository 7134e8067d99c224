"""The delivery stage (streams/stage/deliver.py): what the notify agent decides, without Faust or HTTP."""

from __future__ import annotations

import orjson
import pytest

from helpers import OC
from streams.domain import delivery as policy
from streams.domain.intake import NOTIFICATION_FAILED, routing_token
from streams.domain.webhook import DELIVERY_ID_HEADER
from streams.oncall_config import load_oncall
from streams.stage.deliver import (
    DeadLetter, Deliverer, Put, Send, Store, Topic, attempt_request, result_record,
)

CFG = """\
endpoints:
  ops: {type: webhook, url: "https://hooks.example.com/ops"}
  chat: {type: slack, url: "https://hooks.slack.com/services/x"}
delivery: {disable_after: 2}
"""
NOW = 1_795_514_400.0
SOURCE = ("on-call.notifications", 0, 9)


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "on-call.yaml"
    p.write_text(CFG)
    return load_oncall(OC, p)


def request(did: str = "d-1", endpoint: str = "ops", channel: str = "webhook") -> dict:
    event = {"event_id": "e-1", "type": "CaseCreated", "tenant": "on-call", "case_id": "PG-x-1", "dedup_key": "k",
             "version": 1, "occurred_at": 1, "caused_by": "i-1", "actor": None, "summary": "s"}
    return {"kind": "request", "delivery_id": did, "tenant": "on-call", "case_id": "PG-x-1", "dedup_key": "k",
            "endpoint": endpoint, "channel": channel, "case": {"case_id": "PG-x-1", "summary": "s"},
            "notification_id": None, "user_id": None, "ref": 0, "event": event}


class World:
    """The two tables as dicts; each record's writes are applied before the next one, as the agent does."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tables = {Store.DELIVERIES: {}, Store.OUTCOMES: {}}
        self.d = Deliverer(rand=lambda: 0.5)

    def load(self, table: Store, key: str) -> dict | None:
        raw = self.tables[table].get(key)
        return orjson.loads(raw) if raw is not None else None

    def handle(self, msg: dict, now: float = NOW):
        fx = self.d.handle(msg, self.cfg, lambda: now, self.load, SOURCE)
        for a in fx.actions:
            if isinstance(a, Put):
                if a.value is None:
                    self.tables[a.table].pop(a.key, None)
                else:
                    self.tables[a.table][a.key] = a.value
        return fx

    def due(self, now: float = NOW):
        return self.d.due(self.cfg, now, list(self.tables[Store.DELIVERIES].items()), self.load)


def sends(fx, topic: Topic) -> list[dict]:
    return [orjson.loads(a.value) for a in fx.actions if isinstance(a, Send) and a.topic is topic]


def result(did: str, attempt: int, **kw) -> dict:
    return {"kind": "result", "delivery_id": did, "attempt": attempt, "at": NOW + attempt, **kw}


def test_a_request_becomes_a_pending_delivery_once(cfg):
    w = World(cfg)
    fx = w.handle(request())
    assert [(a.table, a.key) for a in fx.actions] == [(Store.DELIVERIES, "d-1")]
    pending = w.load(Store.DELIVERIES, "d-1")
    assert pending == {"delivery_id": "d-1", "state": "pending", "attempts": 0, "first_at": NOW, "next_at": NOW,
                       "request": request()}
    assert w.handle(request(), NOW + 5).actions == []   # a re-sent request: ignored


def test_due_attempts_once_while_in_flight_and_refuses_removed_endpoints(cfg):
    w = World(cfg)
    w.handle(request())
    w.handle(request("d-2", endpoint="gone"))
    due = w.due()
    assert due.pending == 2
    assert [(d["delivery_id"], ep.name, n) for d, ep, n in due.attempts] == [("d-1", "ops", 1)]
    (refusal,) = due.refusals
    assert (refusal.topic, refusal.key) == (Topic.NOTIFICATIONS, b"d-2")
    assert orjson.loads(refusal.value) == {"kind": "result", "delivery_id": "d-2", "attempt": 1, "at": NOW,
                                           "refused": True, "reason": "the endpoint is no longer configured",
                                           "count_failure": True}
    again = w.due()
    assert again.attempts == [] and again.refusals == [] and again.pending == 2   # both in flight


def test_a_delivered_result_finishes_the_delivery_and_reports_it(cfg):
    w = World(cfg)
    w.handle(request())
    w.due()
    fx = w.handle(result("d-1", 1, status=200, error=None, retry_after=None))
    assert fx.outcome == ("webhook", policy.DELIVERED) and fx.breaker == ("ops", policy.CLOSED)
    assert [type(a).__name__ for a in fx.actions] == ["Send", "Put", "Put", "Send"]
    (health,) = sends(fx, Topic.NOTIFICATIONS)
    assert (health["kind"], health["outcome"], health["url"]) == ("endpoint", "delivered",
                                                                  "https://hooks.example.com/ops")
    assert fx.actions[0].key == b"endpoint:ops"
    (report,) = sends(fx, Topic.TIMERS)
    assert fx.actions[-1].key == routing_token("k").encode()
    assert (report["outcome"], report["attempts"], report["status_code"], report["at"]) == \
        ("delivered", 1, 200, int((NOW + 1) * 1000))
    assert w.load(Store.DELIVERIES, "d-1") is None and w.load(Store.OUTCOMES, "d-1")["report"] == report
    assert "d-1" not in w.d.inflight
    # the same result redelivered (a crash may have lost the report): the report again, nothing else
    fx = w.handle(result("d-1", 1, status=200, error=None, retry_after=None))
    assert [type(a).__name__ for a in fx.actions] == ["Send"] and sends(fx, Topic.TIMERS) == [report]
    # a re-sent request for a finished delivery: ignored
    assert w.handle(request()).actions == []


def test_a_retryable_result_schedules_the_next_attempt(cfg):
    w = World(cfg)
    w.handle(request())
    fx = w.handle(result("d-1", 1, status=503, error=None, retry_after=None))
    assert fx.outcome == ("webhook", policy.RETRY)
    assert [(a.table, a.key) for a in fx.actions] == [(Store.DELIVERIES, "d-1")]   # no health update, no report
    pending = w.load(Store.DELIVERIES, "d-1")
    assert pending["attempts"] == 1 and pending["next_at"] > NOW + 1 and pending["last"] == "HTTP 503"
    assert w.due(NOW + 1.5).attempts == []                 # not due yet
    assert w.handle(result("d-1", 1, status=503)).actions == []   # an applied result, redelivered


def test_a_permanent_failure_is_dead_lettered_and_disables_the_endpoint(cfg):
    w = World(cfg)
    for did in ("d-1", "d-2"):
        w.handle(request(did))
        fx = w.handle(result(did, 1, status=410, error=None, retry_after=None))
        assert fx.outcome == ("webhook", policy.PERMANENT)
        (dl,) = [a for a in fx.actions if isinstance(a, DeadLetter)]
        assert dl.key == did.encode() and dl.record["reason"] == NOTIFICATION_FAILED
        assert dl.record["source"] == {"topic": SOURCE[0], "partition": SOURCE[1], "offset": SOURCE[2]}
        assert orjson.loads(dl.record["original"])["delivery_id"] == did
        (health,) = sends(fx, Topic.NOTIFICATIONS)
        first = w.handle(health)                         # the endpoint's health, under its own key
    assert first.disabled == ("ops", 2, "HTTP 410")
    (report,) = sends(first, Topic.TIMERS)
    assert (report["outcome"], report["consecutive_failures"]) == ("disabled", 2)
    assert w.load(Store.DELIVERIES, "endpoint:ops")["disabled"] is True
    # a disabled endpoint: deliveries to it are refused without counting
    w.handle(request("d-3"))
    (refusal,) = w.due().refusals
    assert orjson.loads(refusal.value)["count_failure"] is False
    # a new URL is a fresh start
    fx = w.handle(dict(health, url="https://hooks.example.com/new", outcome="delivered"))
    assert fx.disabled is None and w.load(Store.DELIVERIES, "endpoint:ops")["disabled"] is False


def test_a_retry_request_makes_a_failed_delivery_pending_again(cfg):
    w = World(cfg)
    w.handle(request())
    w.handle(result("d-1", 1, status=410))
    assert w.load(Store.OUTCOMES, "d-1")["state"] == "failed"
    retry = dict(request(), kind="retry")
    fx = w.handle(retry, NOW + 100)
    assert fx.retried == ("d-1", "ops")
    pending = w.load(Store.DELIVERIES, "d-1")
    assert pending["state"] == "pending" and pending["attempts"] == 0 and pending["request"] == request()
    assert w.handle(retry).actions == []   # only a failed delivery is retried


def test_the_breaker_opens_after_failures_and_holds_attempts(cfg):
    w = World(cfg)
    for n in range(5):
        did = f"d-{n}"
        w.handle(request(did))
        fx = w.handle(result(did, 1, status=None, error="timeout"))
    assert fx.breaker == ("ops", policy.OPEN)
    w.handle(request("d-9"))
    due = w.due(NOW + 10)
    assert "d-9" not in [d["delivery_id"] for d, _ep, _n in due.attempts] and due.refusals == []
    assert w.d.forget_removed(cfg) == []


def test_attempt_request_and_result_record():
    class Ep:
        channel, secret, name = "webhook", "whsec", "ops"

    d = {"delivery_id": "d-1", "request": request()}
    body, headers = attempt_request("on-call", d, Ep, 2, 1_795_514_400)
    assert headers[DELIVERY_ID_HEADER] == "d-1" and orjson.loads(body)
    Ep.channel = "slack"
    body, headers = attempt_request("on-call", d, Ep, 1, 0)
    assert headers == {"Content-Type": "application/json", DELIVERY_ID_HEADER: "d-1"} and orjson.loads(body)
    key, value = result_record("d-1", 2, NOW, {"status": 200})
    assert key == b"d-1" and orjson.loads(value) == {"kind": "result", "delivery_id": "d-1", "attempt": 2,
                                                     "at": NOW, "status": 200}
