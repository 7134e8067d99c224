"""Scenarios 14 and 15: notifications to forbidden targets, and many short gateway requests while the
endpoints churn. Both run against one on-call worker of their own (a Kafka of its own: the worker needs
its own consumer group and on-call file), which each test reconfigures by rewriting that file (hot
reload, no restart).

14. Endpoints (webhook and Slack) at loopback addresses and their aliases (``127.1``, ``0x7f000001``,
    ``2130706433``, ``0x7f.0.0.1``, ``127.0.0.1.``, ``[::ffff:127.0.0.1]``, ``0.0.0.0``, ``[::1]``), a name
    that resolves to loopback (``localhost``: the rebinding stand-in; the product resolves once and pins
    the address), private and link-local addresses, and redirects (an allowed receiver answering 30x to a
    forbidden target, and to an allowed one): every delivery fails permanently for the policy's reason
    (the redirect with its 30x status, never followed), and the receivers listening on the forbidden
    loopback addresses accept ZERO connections. The allowlist names one address (``127.0.0.2/32``), not
    ``127.0.0.0/8``, and plain http is allowed, so what refuses is the address policy; the control
    endpoints there are delivered to. Private and link-local targets have no receiver (nothing may
    leave the machine): their evidence is the refusal's reason.
    Counts: events_in = deliveries attempted (cases x endpoints); effects_out = connections the
    receivers accepted; lost = control deliveries not delivered; doubled = connections accepted by a
    forbidden receiver, requests at a redirect's target, forbidden deliveries recorded as delivered;
    divergent = deliveries with another outcome or reason than expected (or none).

15. Thousands of gateway requests, each on a new connection (accepted events and PagerDuty events, and
    refused ones with ever new unknown keys, each a key lookup), in rounds; before each round the on-call
    file changes its endpoints (new names, a moved URL, webhook and Slack), and every round's
    notifications reach that round's endpoints. The gateway's and the worker's Kafka connections
    (sampled from /proc while the requests run: a producer per request would show up as new ones), the
    gateway's PostgreSQL connections, both processes' file descriptors and resident memory, and the
    worker's circuit breakers (one per endpoint configured, and a metric series each) stay bounded.
    Counts: events_in = requests made; effects_out = intake records of the run plus deliveries received;
    lost = valid requests missing from the topic plus deliveries not received; doubled = records of
    refused requests, second copies, deliveries received twice; divergent = answers with another status
    plus every bound exceeded (each bound and both figures are in the notes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from streams.domain.auth import new_key
from streams.integrations import IntegrationStore
from tests.integration.test_gateway import start_gateway
from tests.integration.test_paging_e2e import MIN, Pager, _metric
from tests.receivers import Receiver
from tests.reliability.report import PeakRss, Report, record, scale
from tests.reliability.test_gateway_faults import GATEWAY_ENV, make_keys, read_marked, warm_up

pytestmark = pytest.mark.integration

TENANT = "on-call"
OUTCOMES = ("NotificationDelivered", "NotificationFailed")


@pytest.fixture(scope="module")
def pager(engine_set, tmp_path_factory):
    """A Kafka of its own, and one on-call worker with an on-call file of its own and a file clock."""
    from tests.conftest import _start_stack, _stop_stack

    base = tmp_path_factory.mktemp("outbound")
    stack, own, root = _start_stack(base, engine_set, own_kafka=True)
    pg = Pager(stack, TENANT, "ack_timeout: off\n", base, (int(time.time() * 1000) // MIN) * MIN)
    pg.start()
    # its metrics answer once its on-call file is watched: a change made earlier could go unnoticed
    stack.poll(lambda: _metric(pg.worker.metrics_port, "casestream_config_reloads_total"), lambda _: True,
               what="the worker to start")
    yield pg
    _stop_stack(stack, own, root)


def configure(pg: Pager, text: str) -> None:
    """Replace the worker's on-call file (atomically: a reload never sees half a file) and wait until the
    worker runs it (its log names the sha256 of every configuration it loads)."""
    new = pg.dir.parent / f"{pg.file.name}.new"
    new.write_text(text)
    os.replace(new, pg.file)
    digest = hashlib.sha256(text.encode()).hexdigest()
    pg.stack.poll(lambda: f"(sha256 {digest})" in pg.worker.log_path.read_text(errors="replace"), bool,
                  what="the worker to reload its on-call config")


def outcomes(pg: Pager, prefix: str, count: int, deadline: float = 90.0) -> dict[str, dict]:
    """delivery id -> its outcome event, once ``count`` are on the log (or what is there at the deadline)."""
    def mine(r):
        return r.get("dedup_key", "").startswith(prefix) and r["type"] in OUTCOMES

    def done(found):
        return len({e["delivery_id"] for e in found}) >= count
    try:
        found = pg.stack.read(TENANT, "domain-events", mine, until=done, deadline=deadline, settle=1.0)
    except AssertionError:  # the verdict says which are missing
        found = pg.stack.read(TENANT, "domain-events", mine, until=lambda f: True, settle=1.0)
    return {e["delivery_id"]: e for e in found}


# -- 14. notifications to forbidden targets ------------------------------------------------------------

FORBIDDEN_CONFIG = """\
ack_timeout: off
endpoints:
{endpoints}
notification_rules:
  - {{id: everything, event_types: [CaseCreated], match: {{source: rel14}}, endpoints: [{names}]}}
delivery:
  timeout: 2s
  disable_after: 1000          # every delivery is judged by the policy, none skipped as "disabled"
  breaker_failures: 1000
  allow_networks: ["127.0.0.2/32"]
  allow_http: true
"""


def test_notifications_to_forbidden_targets_make_no_connection(pager, engine_set, run_id):
    started = time.monotonic()
    allowed, lo, lo3 = (Receiver(host=h).start() for h in ("127.0.0.2", "127.0.0.1", "127.0.0.3"))
    try:
        p = lo.port
        # name -> (type, url, what its outcome must be: a reason's part, or a redirect's status)
        forbidden = {
            "loopback": ("webhook", lo.url("/hook"), "127.0.0.1: forbidden address (loopback)"),
            "loopback-3": ("webhook", lo3.url("/hook"), "127.0.0.3: forbidden address (loopback)"),
            "short-form": ("webhook", f"http://127.1:{p}/hook", "non-canonical numeric host"),
            "hex": ("webhook", f"http://0x7f000001:{p}/hook", "non-canonical numeric host"),
            "decimal": ("webhook", f"http://2130706433:{p}/hook", "non-canonical numeric host"),
            "dotted-hex": ("webhook", f"http://0x7f.0.0.1:{p}/hook", "non-canonical numeric host"),
            "trailing-dot": ("webhook", f"http://127.0.0.1.:{p}/hook", "non-canonical numeric host"),
            "mapped": ("webhook", f"http://[::ffff:127.0.0.1]:{p}/hook", "(IPv4-mapped loopback)"),
            "unspecified": ("webhook", f"http://0.0.0.0:{p}/hook", "(unspecified)"),
            "ipv6-loopback": ("webhook", f"http://[::1]:{p}/hook", "::1: forbidden address (loopback)"),
            "localhost": ("webhook", f"http://localhost:{p}/hook", "localhost resolves to"),
            "private": ("webhook", f"http://10.255.255.1:{p}/hook", "(private)"),
            "private-192": ("webhook", f"http://192.168.255.1:{p}/hook", "(private)"),
            "link-local": ("webhook", f"http://169.254.0.1:{p}/hook", "(link-local)"),
            "slack-localhost": ("slack", f"http://localhost:{p}/slack", "localhost resolves to"),
            "slack-mapped": ("slack", f"http://[::ffff:7f00:1]:{p}/slack", "(IPv4-mapped loopback)"),
            "redirect-302": ("webhook", allowed.url("/302"), 302),
            "redirect-307": ("webhook", allowed.url("/307"), 307),
            "redirect-308": ("slack", allowed.url("/308"), 308),
            "redirect-allowed": ("webhook", allowed.url("/301"), 301),
        }
        allowed.script.update({"/302": [(302, {"Location": lo.url("/hook")})],
                               "/307": [(307, {"Location": f"http://localhost:{p}/hook"})],
                               "/308": [(308, {"Location": lo3.url("/slack")})],
                               "/301": [(301, {"Location": allowed.url("/landing")})]})
        controls = {"control": ("webhook", allowed.url("/control"), None),
                    "control-slack": ("slack", allowed.url("/control-slack"), None)}
        endpoints = {**forbidden, **controls}
        configure(pager, FORBIDDEN_CONFIG.format(
            endpoints="\n".join(f'  {n}: {{type: {t}, url: "{u}"}}' for n, (t, u, _) in endpoints.items()),
            names=", ".join(endpoints)))

        prefix, n = f"{run_id}/", scale(2)
        pager.send([{"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": f"{prefix}{i}",
                     "summary": "forbidden targets", "source": "rel14"} for i in range(n)])
        got = outcomes(pager, prefix, n * len(endpoints))
        by_endpoint: dict[str, list[dict]] = {name: [] for name in endpoints}
        for e in got.values():
            by_endpoint[e["endpoint"]].append(e)

        def wrong(name: str, e: dict) -> bool:
            want = endpoints[name][2]
            if want is None:
                return e["type"] != "NotificationDelivered"
            if e["type"] != "NotificationFailed" or not e["permanent"]:
                return True
            return e["status_code"] != want if isinstance(want, int) else want not in e["reason"]

        divergent = {name: [(e["type"], e.get("status_code"), e.get("reason")) for e in es if wrong(name, e)]
                     + ["no outcome"] * (n - len(es)) for name, es in by_endpoint.items()}
        divergent = {name: v for name, v in divergent.items() if v}
        delivered = {name: {e["delivery_id"] for e in by_endpoint[name] if e["type"] == "NotificationDelivered"}
                     for name in controls}
        received = {name: allowed.delivery_ids(urlsplit(controls[name][1]).path) for name in controls}
        lost = sum(n - len(delivered[name] & received[name]) for name in controls)
        leaks = {"127.0.0.1 connections": lo.connections, "127.0.0.3 connections": lo3.connections,
                 "redirect target requests": len(allowed.on("/landing")),
                 "forbidden delivered": sum(1 for name in forbidden for e in by_endpoint[name]
                                            if e["type"] == "NotificationDelivered")}
        report = record(Report(
            "14 notifications to forbidden targets", engine_set.profile, events_in=n * len(endpoints),
            effects_out=allowed.connections + lo.connections + lo3.connections, lost=lost,
            doubled=sum(leaks.values()), divergent=sum(len(v) for v in divergent.values()),
            duration_s=round(time.monotonic() - started, 1), peak_rss_mib=PeakRss().sample(pager.worker.proc.pid),
            notes=f"{n} cases x {len(endpoints)} endpoints ({len(forbidden)} forbidden, {len(controls)} "
                  f"allowed controls); allowlist 127.0.0.2/32; allowed receiver: {allowed.connections} "
                  f"connections, {len(allowed.hits)} requests; peak RSS: the worker's"))
        report.assert_clean(f"wrong outcomes: {divergent}\nleaks: {leaks}\ndelivered: {delivered}\n"
                            f"received: {received}")
    finally:
        for rx in (allowed, lo, lo3):
            rx.stop()


# -- 15. many short gateway requests, a churn of endpoints ---------------------------------------------

CHURN_CONFIG = """\
ack_timeout: off
endpoints:
  hook-{j}: {{type: webhook, url: "{hook}", secret: whsec_churn{j}}}
  slack-{j}: {{type: slack, url: "{slack}"}}
  moving: {{type: webhook, url: "{moving}"}}
notification_rules:
  - id: round-{j}
    event_types: [CaseCreated]
    match: {{source: rel15-notify}}
    endpoints: [hook-{j}, slack-{j}, moving]
delivery:
  timeout: 5s
  allow_networks: ["127.0.0.0/8"]
  allow_http: true
"""


def usage(pid: int, ports: dict[str, int]) -> dict:
    """From /proc: a process's open file descriptors, resident set (MiB), and for each of ``ports``
    (name -> port) the local ports of its established TCP connections to it (one per connection)."""
    inodes, fds = set(), 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        fds += 1
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out: dict = {"fds": fds, **{name: set() for name in ports}}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "01" or f[9] not in inodes:          # 01: ESTABLISHED
                continue
            remote, local = int(f[2].rsplit(":", 1)[1], 16), int(f[1].rsplit(":", 1)[1], 16)
            for name, port in ports.items():
                if remote == port:
                    out[name].add(local)
    status = Path(f"/proc/{pid}/status").read_text()
    out["rss"] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return out


def series(port: int, name: str) -> int:
    """How many series of the metric ``name`` a process exposes (one per set of labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return sum(1 for line in r.read().decode().splitlines() if line.startswith(name + "{"))


class Sampler(threading.Thread):
    """Samples processes' ``usage`` every ``every`` seconds until stopped: the most connections to each
    port at once, and every connection seen (one opened per request shows up as ever new local ports)."""

    def __init__(self, pids: dict[str, int], ports: dict[str, int], every: float = 0.2):
        super().__init__(daemon=True)
        self.pids, self.ports, self.every = pids, ports, every
        self.halt = threading.Event()
        self.peak: Counter = Counter()
        self.seen: dict[tuple[str, str], set] = {(p, n): set() for p in pids for n in ports}
        self.samples = 0

    def sample(self) -> dict[str, dict]:
        now = {proc: usage(pid, self.ports) for proc, pid in self.pids.items()}
        for proc, u in now.items():
            for name in self.ports:
                self.seen[proc, name] |= u[name]
                self.peak[proc, name] = max(self.peak[proc, name], len(u[name]))
        self.samples += 1
        return now

    def run(self) -> None:
        while not self.halt.wait(self.every):  # the sampling pace, not a wait for anything
            self.sample()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


async def _storm(base: str, requests: list[tuple[str, bytes, int]], concurrency: int = 16) -> list[int]:
    """POST each (path, body, _) on a connection of its own; the statuses, in order."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(force_close=True, limit=concurrency)   # no keep-alive: one request each
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(path: str, body: bytes) -> int:
            async with sem:
                try:
                    async with session.post(base + path, data=body,
                                            headers={"Content-Type": "application/json"}) as resp:
                        await resp.read()
                        return resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return 0
        return await asyncio.gather(*(one(path, body) for path, body, _ in requests))


class Storm:
    """The requests of each round: mostly accepted events (on a few dedup keys: occurrences), a tenth
    PagerDuty events, a tenth refused with a new unknown key each, and two triggers that notify."""

    def __init__(self, keys: dict[str, str], run_id: str):
        self.keys, self.run_id = keys, run_id
        self.pattern = re.compile(rf"{run_id}-\d{{3}}-\d{{5}}")

    def round(self, j: int, size: int) -> list[tuple[str, bytes, int]]:
        out = []
        for i in range(size):
            m = f"{self.run_id}-{j:03d}-{i:05d}"
            event = {"event_id": m, "action": "trigger", "dedup_key": f"{self.run_id}/k{i % 20}", "summary": m,
                     "source": "rel15"}
            if i < 2:
                event.update(dedup_key=f"{self.run_id}/notify-{j}-{i}", source="rel15-notify")
            if i % 10 == 8:
                out.append(("/v2/enqueue", orjson.dumps(
                    {"routing_key": self.keys["pagerduty"], "event_action": "trigger",
                     "dedup_key": f"{self.run_id}/pd{i % 5}", "payload": {"summary": m, "source": "rel15",
                                                                          "severity": "info"}}), 202))
            elif i % 10 == 9:
                unknown = new_key(TENANT, "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=32)))
                out.append((f"/v1/integrations/{unknown}/events", orjson.dumps(event), 401))
            else:
                out.append((f"/v1/integrations/{self.keys['events']}/events", orjson.dumps(event), 202))
        return out


def test_many_short_gateway_requests_and_endpoint_churn_stay_bounded(pager, engine_set, tmp_path, run_id):
    started = time.monotonic()
    stack = pager.stack
    keys = make_keys(stack, {"events": "events", "pagerduty": "pagerduty"})
    base, gateway = start_gateway(stack, tmp_path, **GATEWAY_ENV, CASESTREAM_RATE_PER_INTEGRATION="100000/100000",
                                  CASESTREAM_RATE_PER_TENANT="100000/100000")
    rx, rss = Receiver().start(), PeakRss()
    try:
        rounds, total = scale(10), scale(2000)
        storm = Storm(keys, run_id)
        warm_up(stack, base, keys["events"], run_id)
        ports = {"kafka": int(stack.kafka.rsplit(":", 1)[1]), "postgres": urlsplit(stack.postgres_dsn).port}
        sampler = Sampler({"gateway": gateway.pid, "worker": pager.worker.proc.pid}, ports)
        sent: list[tuple[tuple[str, bytes, int], int]] = []
        want_hits: list[str] = []
        for j in range(rounds):
            paths = (f"/r{j}/hook", f"/r{j}/slack", f"/moving/{j}")
            configure(pager, CHURN_CONFIG.format(j=j, hook=rx.url(paths[0]), slack=rx.url(paths[1]),
                                                 moving=rx.url(paths[2])))
            reqs = storm.round(j, total // rounds)
            sent += zip(reqs, asyncio.run(_storm(base, reqs)))
            want_hits += [p for p in paths for _ in range(2)]   # each round's two notifying triggers
            # this round's deliveries made before the next reload changes the endpoints
            stack.poll(lambda: Counter(h.path for h in list(rx.hits)), lambda c: c >= Counter(want_hits),
                       deadline=120, what=f"round {j}'s deliveries")
            if j == 0:                        # the figures to compare with: everything started, warmed up
                before = sampler.sample()
                sampler.start()
        sampler.stop()
        after = sampler.sample()
        breakers = series(pager.worker.metrics_port, "casestream_notification_breaker_state")
        rss.sample(gateway.pid, pager.worker.proc.pid)                 # their high-water marks
    finally:
        gateway.terminate()
        gateway.wait(20)
        rx.stop()

    def marker(body: bytes) -> str:
        return storm.pattern.search(body.decode()).group()
    legit = {marker(body) for (_, body, want), _ in sent if want == 202}
    refused = {marker(body) for (_, body, want), _ in sent if want != 202}
    effects, on_topic = read_marked(stack, TENANT, storm.pattern, legit, settle=1.0)
    wrong = Counter((want, status) for (_, _, want), status in sent if status != want)
    hits = Counter(h.path for h in rx.hits)
    ids = Counter(h.delivery_id for h in rx.hits)
    g, w = "gateway", "worker"
    limits = {  # name -> (figure, bound)
        "gateway Kafka connections seen": (len(sampler.seen[g, "kafka"]), len(before[g]["kafka"]) + 2),
        "gateway PostgreSQL connections (peak)": (sampler.peak[g, "postgres"], IntegrationStore.POOL_MAX),
        "gateway fds after": (after[g]["fds"], before[g]["fds"] + 10),
        "gateway RSS MiB after": (round(after[g]["rss"]), round(before[g]["rss"]) + 64),
        "worker Kafka connections seen": (len(sampler.seen[w, "kafka"]), len(before[w]["kafka"]) + 4),
        "worker fds after": (after[w]["fds"], before[w]["fds"] + 32),           # its stores may add a file
        "worker RSS MiB after": (round(after[w]["rss"]), round(before[w]["rss"]) + 256),  # and their state grows
        "worker breaker series after": (breakers, 3),                           # one per endpoint configured
    }
    exceeded = {name: v for name, v in limits.items() if v[0] > v[1]}
    figures = {when: {p: {k: len(v) if isinstance(v, set) else round(v) for k, v in u[p].items()} for p in (g, w)}
               for when, u in (("before", before), ("after", after))}
    report = record(Report(
        "15 short gateway requests, endpoint churn", engine_set.profile, events_in=len(sent),
        effects_out=effects + sum(hits.values()),
        lost=sum(1 for m in legit if on_topic[m] == 0) + sum((Counter(want_hits) - hits).values()),
        doubled=sum(on_topic[m] for m in refused) + sum(n - 1 for n in on_topic.values() if n > 1)
        + sum(n - 1 for n in ids.values() if n > 1),
        divergent=sum(wrong.values()) + len(exceeded), duration_s=round(time.monotonic() - started, 1),
        peak_rss_mib=rss.peak,
        notes=f"{rounds} reloads, {len(legit)} valid and {len(refused)} refused requests, "
              f"{sampler.samples} samples; bounds (figure, bound): {limits}; {figures}; "
              f"peak RSS: the higher of the gateway's and the worker's"))
    report.assert_clean(f"wrong statuses (want, got): {dict(wrong)}\nbounds exceeded: {exceeded}\n"
                        f"deliveries missing: {dict(Counter(want_hits) - hits)}")
