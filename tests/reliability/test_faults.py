"""The fault suite: real worker processes and a real Kafka broker killed, stopped and scaled with real
signals, judged by a Jepsen-style checker (tests/reliability/checker.py: a history, a model, a verdict) on
the suite's harness (tests/reliability/harness.py: runs, the recorder, the consumer group).

1. Two workers of one tenant share its partitions; one is SIGKILLed while timers fire and deliveries
   are made: the survivor takes its partitions over (after the session timeout: static membership),
   every pending timer fires once, every pending delivery is made once, no (case, version) has two
   event ids, and the projections equal a replay of the log.
2. Workers scaled 1 -> 3 -> 1 under a steady feed: nothing lost, nothing doubled.
3. A worker SIGSTOPped past its session timeout while it has work in flight, then SIGCONTed: its
   late output (stale batches, HTTP answers, timers) harms nothing: projections, relay topic and
   notifications show each effect once, and the keys it handled decide right afterwards.
4. The broker SIGKILLed under load and restarted: every intake record acknowledged with acks=all is
   applied, and the consumer lag drains.

Every worker runs with a short Kafka session timeout (``CASESTREAM_SESSION_TIMEOUT``) and a file clock
(``CASESTREAM_CLOCK=file:``): timers come due when the test moves the clock, never by waiting. Waits
are polls with deadlines. Each test prints a ``faults:`` line (timings, repeats, watchdog restarts).
These tests need a broker that evicts a departed member (Apache Kafka), not the stand-in.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import orjson
import pytest

from streams.config import load_topics
from tests.receivers import Receiver
from tests.reliability.checker import INFO, OK
from tests.reliability.harness import MIN, SESSION, Run, group_lag, metric, partition_of, wait_owners, watchdog
from tests.reliability.report import PeakRss, Report, record

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _real_kafka(engine_set):
    if engine_set.profile != "apache":
        pytest.skip("needs Apache Kafka: the stand-in's group coordinator never evicts a departed member")


def _report(name: str, run: Run, verdict, **extra) -> None:
    """The ``faults:`` line (timings, repeats, watchdog restarts) and the scenario's ``reliability:`` line."""
    print(f"\nfaults: {name}: {dict(run.marks, **extra)}\n  {verdict}\n  watchdog {watchdog(run.stack)}")
    peak = PeakRss()
    peak.sample(*(w.proc.pid for w in run.stack.workers if w.proc is not None))
    record(Report(name, run.stack.profile, verdict.stats["acked"], verdict.stats["effects"], verdict.lost,
                  verdict.doubled, verdict.divergent, round(time.monotonic() - run.started, 1), peak.peak,
                  ", ".join(f"{k} {v}" for k, v in extra.items())))


# -- 1. SIGKILL one of two workers -------------------------------------------------------------------

PAGES = """\
ack_timeout: off
users:
  u-ann: {{name: Ann Fault, email: ann.fault@example.com}}
escalation_policies:
  every-5m:
    steps:
      - {{escalate_after_seconds: 300, targets: [{{user: u-ann}}]}}
    retries: 5
routing_rules:
  - {{id: pages, match: {{source: pager}}, escalation_policy: every-5m}}
endpoints:
  hook: {{type: webhook, url: "{hook}", secret: whsec_fault}}
notification_rules:
  - {{id: notify, event_types: [CaseCreated], match: {{source: notify}}, endpoints: [hook]}}
delivery:
  timeout: 5s
  retry_window: 1h
  breaker_failures: 1000
  allow_networks: ["127.0.0.0/8"]
  allow_http: true
{extra}"""


def _triggers(run: Run, kind: str, n: int, tag: str = "0") -> list[dict]:
    return [{"event_id": f"{run.run_id}-{kind}{i}-{tag}", "action": "trigger", "dedup_key": f"{run.prefix}{kind}{i}",
             "summary": f"{kind} {i}", "source": "pager" if kind == "p" else "notify"} for i in range(n)]


def test_sigkill_one_of_two_workers_survivor_takes_over(fresh_stack, tmp_path, run_id):
    rx = Receiver(script={"/hook": [503]}).start()           # every first attempt fails: deliveries pending
    try:
        run = Run(fresh_stack, "on-call", tmp_path, run_id, PAGES.format(hook=rx.url("/hook"), extra=""))
        stack, t0, n = fresh_stack, run.now, 24
        a, b = run.worker("a"), run.worker("b")
        before = wait_owners(stack, "on-call", [a, b], "two workers sharing the partitions")
        run.mark("two members")
        parts = load_topics("on-call").partitions
        b_pages = [i for i in range(n) if partition_of(f"{run.prefix}p{i}", parts) in before[b.instance_id]]
        run.send(_triggers(run, "p", n) + _triggers(run, "n", n))
        run.events()                                           # created, step 1 paged; timers pending
        retry = 'casestream_notification_deliveries_total{channel="webhook",outcome="retry"'
        stack.poll(lambda: metric(a, retry) + metric(b, retry), lambda k: k >= n, what="every first attempt failed")
        run.mark("timers and deliveries pending")

        rx.script["/hook"] = [("sleep", 0.2, 200)]             # the endpoint recovers ...
        run.at(t0 + 5 * MIN)                                   # ... and the second page is due everywhere
        stack.poll(lambda: (len(rx.hits), len(run.events(0))), lambda k: k[0] > n and k[1] > 5 * n,
                   what="retries and timers under way")
        b.kill()                                               # SIGKILL: mid-timers, mid-deliveries
        killed = time.monotonic()
        run.mark("b killed")
        run.at(t0 + 10 * MIN)                                  # the third page comes due while b's partitions wait
        after = wait_owners(stack, "on-call", [a], "the survivor to own every partition")
        takeover = round(time.monotonic() - killed, 1)
        run.mark("a owns all")
        verdict = run.verdict(rx)
        _report("sigkill one of two", run, verdict, takeover_s=takeover, b_pages=len(b_pages),
                b_partitions=sorted(before[b.instance_id]))
        assert verdict.ok, str(verdict)
        assert b_pages, "b owned none of the pages: nothing was taken over"
        assert after == {a.instance_id: set(range(parts))} and a.alive(), a.log()
        # with static membership the partitions move only once the session timeout has passed
        assert takeover >= SESSION - 1, takeover
        assert verdict.stats["deliveries"] == n and verdict.stats["model_events"] == n * 10 + n
        # the survivor's timer index holds exactly the timers still pending, the next retry of each page,
        # once any fired timer a crash left in it has been sent again (every 30 s) and dropped
        pending = 'casestream_timers_pending{kind="escalation"'
        stack.poll(lambda: metric(a, pending), lambda k: k == n, deadline=45, what="one pending timer per page")
    finally:
        rx.stop()


# -- a steady feed ------------------------------------------------------------------------------------

class Feeder(threading.Thread):
    """A steady producer (acks=all) of intake messages: rounds of ``per_round`` keys, each key taking
    the next action of its cycle (trigger, trigger, acknowledge, resolve). A round is recorded once Kafka
    acknowledged it; a failed send is recorded as indeterminate and the same round sent again until it
    is acknowledged (as a client retries), so every message is acknowledged in the end, in key order."""

    CYCLE = ("trigger", "trigger", "acknowledge", "resolve")

    def __init__(self, run: Run, keys: int, per_round: int, pause: float, request_timeout_ms: int = 40_000):
        super().__init__(daemon=True)
        self.r, self.keys, self.per_round, self.pause = run, keys, per_round, pause
        self.request_timeout_ms = request_timeout_ms
        self.halt = threading.Event()
        self.rounds = self.failures = 0
        self.error: BaseException | None = None
        self.step = [0] * keys

    def round(self, i: int) -> list[dict]:
        out = []
        for j in range(self.per_round):
            k = (i * self.per_round + j) % self.keys
            action, n = self.CYCLE[self.step[k] % 4], self.step[k]
            self.step[k] += 1
            m = {"event_id": f"{self.r.run_id}-{k}-{n}", "action": action, "dedup_key": f"{self.r.prefix}k{k}"}
            out.append(dict(m, summary=f"k{k}") if action == "trigger" else m)
        return out

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        topic = self.r.stack.topic(self.r.tenant_name, "intake")
        producer = AIOKafkaProducer(bootstrap_servers=self.r.stack.kafka, acks="all", linger_ms=5,
                                    request_timeout_ms=self.request_timeout_ms)
        await producer.start()
        try:
            while not self.halt.is_set():
                batch, at = self.round(self.rounds), self.r.now
                while True:
                    try:
                        futs = [await producer.send(topic, orjson.dumps(m), key=m["dedup_key"].encode(),
                                                    timestamp_ms=at) for m in batch]
                        await asyncio.gather(*futs)
                        self.r.history.send(batch, at, OK)
                        break
                    except KafkaError:     # the broker is away: maybe written, maybe not; send again
                        self.r.history.send(batch, at, INFO)
                        self.failures += 1
                self.rounds += 1
                await asyncio.sleep(self.pause)  # the feed's pace, not a wait for anything
        finally:
            await producer.stop()

    def acked(self) -> int:
        return self.r.history.acked()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=120)
        assert not self.is_alive(), "the feeder did not stop"
        if self.error is not None:
            raise self.error


# -- 2. scale 1 -> 3 -> 1 under a steady feed ------------------------------------------------------------

def test_scale_one_three_one_under_steady_feed(fresh_stack, tmp_path, run_id):
    stack, tenant = fresh_stack, "case-management"
    run = Run(stack, tenant, tmp_path, run_id)
    w1 = run.worker("w1")
    wait_owners(stack, tenant, [w1], "the first worker")
    feed = Feeder(run, keys=40, per_round=10, pause=0.2)
    feed.start()
    try:
        stack.poll(lambda: feed.acked(), lambda n: n >= 100, what="the feed under way")
        run.events(100)
        run.mark("1 worker")
        w2, w3 = run.worker("w2"), run.worker("w3")
        wait_owners(stack, tenant, [w1, w2, w3], "three workers sharing the partitions")
        run.mark("3 workers")
        run.events()                               # everything acknowledged so far, applied by three
        run.mark("3 workers applied")
        stopping = time.monotonic()
        w2.stop()                                  # SIGTERM: a graceful scale-down
        w3.stop()
        wait_owners(stack, tenant, [w1], "the one remaining worker to own every partition")
        scale_down = round(time.monotonic() - stopping, 1)
        run.mark("1 worker again")
        run.events()
        run.mark("1 worker applied")
    finally:
        feed.stop()
    verdict = run.verdict()
    lag = stack.poll(lambda: group_lag(stack, tenant), lambda lag: lag == {}, what="the lag to drain")
    _report("scale 1-3-1", run, verdict, acked=feed.acked(), rounds=feed.rounds, scale_down_s=scale_down)
    assert verdict.ok, str(verdict)
    assert verdict.stats["model_events"] == feed.acked() and lag == {}
    assert w1.alive() and w2.proc.returncode == 0 and w3.proc.returncode == 0, stack.diagnostics()


# -- 3. SIGSTOP past the session timeout, then SIGCONT ---------------------------------------------------

def _sig(worker, sig) -> None:
    import os

    os.killpg(worker.proc.pid, sig)


def test_sigstop_past_session_timeout_then_sigcont(fresh_stack, tmp_path, run_id):
    rx = Receiver(script={"/hook": [("sleep", 1.0, 200)]}).start()   # slow answers: requests in flight
    try:
        config = PAGES.format(hook=rx.url("/hook"), extra="subscriptions:\n  - {id: all, format: json}\n")
        run = Run(fresh_stack, "on-call", tmp_path, run_id, config)
        stack, t0, n = fresh_stack, run.now, 16
        a, b = run.worker("a"), run.worker("b")
        wait_owners(stack, "on-call", [a, b], "two workers sharing the partitions")
        pages = _triggers(run, "p", n)
        run.send(pages + _triggers(run, "n", n))
        run.events()
        run.mark("two members, first pages")
        # a burst for b to be in the middle of: repeats of every page, new cases to notify
        before = run.want()
        run.send([dict(m, event_id=f"{m['event_id']}-{j}") for j in range(15) for m in pages] + _triggers(run, "m", n))
        stack.poll(lambda: len({(e["case_id"], e["version"]) for e in run.events(0)}), lambda k: k >= before + 20,
                   what="the burst under way")
        _sig(b, signal.SIGSTOP)
        stopped = time.monotonic()
        run.mark("b stopped")
        wait_owners(stack, "on-call", [a], "the survivor to own every partition")
        takeover = round(time.monotonic() - stopped, 1)
        run.events()                               # a decided b's share too (the rest of the burst)
        # then the pages' next step comes due (not during the takeover: a timer firing while older
        # alerts still wait behind a stalled worker is applied before them, a different order than a
        # worker that never stalled would see; README "Fault suite", known limits)
        run.at(t0 + 5 * MIN)
        run.events()
        run.send([{"event_id": f"{run_id}-ack{i}", "action": "acknowledge", "dedup_key": f"{run.prefix}p{i}"}
                  for i in range(0, n, 2)])
        run.events()
        run.mark("a did b's share")
        _sig(b, signal.SIGCONT)                    # b's late output: stale batch, HTTP answers, timers
        wait_owners(stack, "on-call", [a, b], "b back in the group")
        run.mark("b back")
        # the keys b handled before its pause decide right: repeats count on, resolves close
        run.send([dict(m, event_id=f"{m['event_id']}-again") for m in pages] +
                 [{"event_id": f"{run_id}-res{i}", "action": "resolve", "dedup_key": f"{run.prefix}p{i}"}
                  for i in range(0, n, 2)])
        run.events()
        run.at(t0 + 10 * MIN)                      # the unacknowledged pages page again
        verdict = run.verdict(rx, relay=("all",))
        _report("sigstop past the session timeout", run, verdict, takeover_s=takeover)
        assert verdict.ok, str(verdict)
        assert a.alive() and b.alive(), stack.diagnostics()
        assert takeover >= SESSION - 1, takeover
        assert verdict.stats["deliveries"] == 2 * n
    finally:
        rx.stop()


# -- 4. the broker SIGKILLed under load and restarted ------------------------------------------------------

def test_broker_sigkill_under_load_then_restart(fresh_stack, tmp_path, run_id):
    stack, tenant = fresh_stack, "case-management"
    run = Run(stack, tenant, tmp_path, run_id)
    w = run.worker("w")
    wait_owners(stack, tenant, [w], "the worker")
    feed = Feeder(run, keys=40, per_round=10, pause=0.1, request_timeout_ms=3000)
    feed.start()
    try:
        stack.poll(lambda: feed.acked(), lambda k: k >= 200, what="the feed under way")
        run.events(100)
        run.mark("under load")
        stack.stop_engine("kafka", sig=signal.SIGKILL)
        killed = time.monotonic()
        run.mark("broker killed")
        stack.poll(lambda: feed.failures, lambda k: k >= 1, what="the feed to notice")
        stack.start_engine("kafka")
        down = round(time.monotonic() - killed, 1)
        run.mark("broker back")
        after = feed.acked()
        stack.poll(lambda: feed.acked(), lambda k: k >= after + 200, what="the feed acknowledged again")
    finally:
        feed.stop()
    run.events(deadline=180)
    run.mark("applied")
    lag = stack.poll(lambda: group_lag(stack, tenant), lambda lag: lag == {}, what="the lag to drain")
    run.mark("lag drained")
    verdict = run.verdict()
    _report("broker sigkill", run, verdict, acked=feed.acked(), failed_sends=feed.failures, broker_down_s=down,
            worker_restarts=w.restarts)
    assert verdict.ok, str(verdict)
    assert verdict.stats["model_events"] == feed.acked() and lag == {}
    assert w.alive(), stack.diagnostics()
