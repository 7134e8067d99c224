"""The reliability suite's harness: the consumer group as the broker sees it, a run (its workers'
clock and on-call file, the history it sends, the model), the recorder (everything that came out,
read at the end) and the projections, live and rebuilt.

* ``Run.send`` publishes intake messages straight to Kafka (``acks=all``) and records them with
  their records' identities; ``Run.perform`` performs a generator step (``generator.Step``): Kafka,
  or a request to the gateway (``Gateway``). A gateway request is recorded once answered 202 and
  placed on ``T.intake`` by the gateway: its records' bytes, timestamps and identities are read
  back from the topic (``Run.resolve``) before the model is run.
* ``Run.verdict`` reads everything that came out -- the domain-event log (repeats included), the
  relay topics, the webhook receiver's requests, the run's dead letters, PostgreSQL (states, every
  row of ``cases`` and ``timeline``) and Elasticsearch documents, and what a rebuild from the log
  (``casestream replay --from-beginning`` into a side prefix) makes of them -- and judges it
  (``checker.check``).
* ``Kills`` SIGKILLs workers mid-batch, spaced by progress, and restarts them in place.

Waits are polls with deadlines; workers run on a file clock (timers come due when the test moves it).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson

from streams.clock import FileClock
from streams.config import PROJECT_ROOT, get_tenant, load_topics
from streams.domain.intake import record_event_id
from streams.oncall_config import load_oncall
from tests.receivers import Receiver
from tests.reliability.checker import OK, Hit, History, check, missing_dead_letters, run_model
from tests.reliability.generator import EVENTS, KAFKA, PAGERDUTY, Step

SESSION = 6.0     # seconds: the workers' Kafka session timeout here (Faust's default is 60)
MIN = 60_000


# -- the consumer group, as the broker sees it -----------------------------------------------------

def group_members(stack, tenant: str) -> tuple[str, dict[str, set[tuple[str, int]]]]:
    """(group state, member id -> assigned (topic, partition)) of the tenant's worker group."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
        await admin.start()
        try:
            group = (await admin.describe_consumer_groups([load_topics(tenant).app_id]))[0].groups[0]
        finally:
            await admin.close()
        _err, _gid, state, _ptype, _proto, members = group[:6]
        out = {}
        for member_id, _client, _host, _meta, assignment in members:
            a = ConsumerProtocolMemberAssignment.decode(assignment) if assignment else None
            out[member_id] = {(t, p) for t, ps in (a.assignment if a else []) for p in ps}
        return state, out

    return asyncio.run(run())


def owners(stack, tenant: str, workers) -> dict[str, set[int]]:
    """instance id -> partitions of T.intake-routed it owns, when the group is stable (else {})."""
    state, members = group_members(stack, tenant)
    if state != "Stable":
        return {}
    routed = load_topics(tenant).name("intake-routed")
    out = {}
    for member_id, tps in members.items():
        # a static member's id is "<group.instance.id>-<uuid>"
        iid = next((w.instance_id for w in workers if member_id.startswith(w.instance_id + "-")), member_id)
        out[iid] = {p for t, p in tps if t == routed}
    return out


def wait_owners(stack, tenant: str, workers, what: str, deadline: float = 90.0) -> dict[str, set[int]]:
    """Until exactly ``workers`` are members, each owning partitions, all of them between them."""
    n = load_topics(tenant).partitions
    want = {w.instance_id for w in workers}
    return stack.poll(lambda: owners(stack, tenant, workers),
                      lambda o: set(o) == want and all(o.values()) and set().union(*o.values()) == set(range(n)),
                      deadline=deadline, what=what)


def group_lag(stack, tenant: str) -> dict[str, int]:
    """``topic:partition`` -> records not yet committed by the tenant's worker group (end - committed)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka, enable_auto_commit=False)
        await admin.start()
        await consumer.start()
        try:
            committed = await admin.list_consumer_group_offsets(load_topics(tenant).app_id)
            ends = await consumer.end_offsets([TopicPartition(tp.topic, tp.partition) for tp in committed])
        finally:
            await consumer.stop()
            await admin.close()
        return {f"{tp.topic}:{tp.partition}": ends[TopicPartition(tp.topic, tp.partition)] - meta.offset
                for tp, meta in committed.items()
                if ends[TopicPartition(tp.topic, tp.partition)] - meta.offset}

    return asyncio.run(run())


def partition_of(key: str, partitions: int) -> int:
    """The T.intake-routed partition of a dedup key (Kafka's default partitioner on the routing token)."""
    from aiokafka.partitioner import murmur2

    from streams.domain.intake import routing_token

    return (murmur2(routing_token(key).encode()) & 0x7FFFFFFF) % partitions


def metric(worker, name: str) -> float:
    import urllib.request

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def watchdog(stack) -> dict:
    """Did the stall watchdog fire (exit code 3, restarted by the harness)?"""
    return {w.instance_id: {"restarts": w.restarts, "stall_lines": w.log_path.read_text(errors="replace")
                            .count("stall: ")} for w in stack.workers}


# -- the gateway, with an integration key of each kind the generator uses, per tenant --------------

class Gateway:
    """``casestream api --routes intake`` on a free port, with an ``events`` and a ``pagerduty``
    integration key for each tenant (in the stack's database prefix). Its rate limits are raised
    out of the way: a run sends its history as fast as it can (the soak: some 6 000 requests in a
    few minutes), and a 429 is not what the suite checks (tests/integration/test_gateway.py does)."""

    UNLIMITED = {"CASESTREAM_RATE_PER_INTEGRATION": "1000000/10000000",
                 "CASESTREAM_RATE_PER_TENANT": "1000000/10000000"}

    def __init__(self, stack, tmp: Path, tenants: tuple[str, ...]):
        from streams.integrations import IntegrationStore
        from tests.integration.test_gateway import start_gateway

        async def make():
            store = IntegrationStore(stack.postgres_dsn, stack.db_prefix, list(tenants))
            try:
                return {(t, kind): (await store.create(t, kind, f"reliability {kind}"))[1]
                        for t in tenants for kind in (EVENTS, PAGERDUTY)}
            finally:
                await store.close()

        self.keys = asyncio.run(make())
        self.base, self.proc = start_gateway(stack, tmp, **self.UNLIMITED)
        self.requests = 0

    def post(self, step: Step) -> None:
        """One step's request, answered 202 (accepted: published with acks=all)."""
        from tests.integration.test_gateway import post

        key = self.keys[(step.tenant, step.source)]
        if step.source == PAGERDUTY:
            status, body, _ = post(self.base, "/v2/enqueue", orjson.dumps(dict(step.messages[0], routing_key=key)))
        else:
            status, body, _ = post(self.base, f"/v1/integrations/{key}/events", orjson.dumps(step.messages))
        self.requests += 1
        assert status == 202, (status, body)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- a run: the workers' clock and on-call file, the history, the model -------------------------------

class Run:
    """``session``: the Kafka session timeout of the run's workers (seconds; short, so that a departed
    member's partitions move soon; None: the default, 60 s -- a worker restarted in place takes its
    partitions back at once by its instance id, and a loaded machine does not get it evicted)."""

    def __init__(self, stack, tenant: str, base: Path, run_id: str, config: str | None = None,
                 session: float | None = SESSION):
        self.stack, self.tenant_name, self.run_id = stack, tenant, run_id
        self.tenant = get_tenant(tenant)
        self.prefix = f"{run_id}/"
        self.now = (int(time.time() * 1000) // MIN) * MIN
        base.mkdir(parents=True, exist_ok=True)
        self.clock = FileClock(base / "clock")
        self.clock.set(self.now)
        self.env = {"CASESTREAM_CLOCK": f"file:{self.clock.path}", "CASESTREAM_TIMER_TICK": "0.1"}
        if session is not None:
            self.env["CASESTREAM_SESSION_TIMEOUT"] = str(session)
        self.oncall = None
        if config is not None:
            d = base / "oncall"
            d.mkdir()
            (d / f"{tenant}.yaml").write_text(config)
            self.env["CASESTREAM_ONCALL_DIR"] = str(d)
            self.oncall = load_oncall(self.tenant, d / f"{tenant}.yaml")
        self.history = History()
        self.started = time.monotonic()
        self.marks: dict[str, float] = {}
        self.keys: set[str] = set()    # dedup keys of the run outside its prefix (gateway triggers without one)
        self.pending: list[tuple[int, bytes]] = []   # gateway records not yet read back: (op index, bytes)
        self.records: set[str] = set()               # the identities of the run's records known so far

    def mark(self, what: str) -> None:
        self.marks[what] = round(time.monotonic() - self.started, 1)

    def mine(self, r: dict) -> bool:
        key = r.get("dedup_key", "")
        return key.startswith(self.prefix) or key in self.keys

    def worker(self, name: str):
        return self.stack.worker(self.tenant_name, instance_id=f"{name}-{self.run_id}", env=self.env)

    def send(self, msgs: list[dict]) -> None:
        """Publish at the current clock time (acks=all) and record it: acknowledged."""
        ids = self.stack.send(self.tenant_name, msgs, timestamp_ms=self.now)
        self.history.send(msgs, self.now, OK, record_ids=ids)
        self.records.update(ids)

    def perform(self, step: Step, gateway: Gateway | None = None) -> None:
        """One generator step: published to Kafka, or one gateway request answered 202 (its
        records recorded once read back, ``resolve``)."""
        assert step.tenant == self.tenant_name, (step.tenant, self.tenant_name)
        if step.source == KAFKA:
            self.send(step.messages)
            return
        gateway.post(step)
        for raw in step.published():
            self.pending.append((len(self.history.ops), raw))
            self.history.ops.append(("send", OK, [raw], None, None))   # placed once read back

    def resolve(self, deadline: float = 90.0) -> None:
        """Read the gateway's records back from T.intake: each pending record's timestamp and
        identity (the k-th request with some bytes is the k-th record with them among those the run
        does not know yet: one key, one partition, in order)."""
        if not self.pending:
            return
        wanted = Counter(raw for _, raw in self.pending)
        topic = self.stack.topic(self.tenant_name, "intake")

        def value(r: dict) -> bytes:
            return orjson.dumps({k: v for k, v in r.items() if not k.startswith("_")})

        def gateway_record(r: dict) -> bool:
            return value(r) in wanted and record_event_id(topic, r["_partition"], r["_offset"]) not in self.records

        found = self.stack.read(self.tenant_name, "intake", gateway_record,
                                until=lambda f: not wanted - Counter(value(r) for r in f), deadline=deadline)
        by_value: dict[bytes, list[dict]] = defaultdict(list)
        for r in sorted(found, key=lambda r: (r["_partition"], r["_offset"]), reverse=True):
            by_value[value(r)].append(r)      # popped from the end: first placed first
        for index, raw in self.pending:
            rec = by_value[raw].pop()
            rid = record_event_id(topic, rec["_partition"], rec["_offset"])
            self.history.ops[index] = ("send", OK, [raw], rec["_timestamp"], [rid])
            self.records.add(rid)
            msg = orjson.loads(raw)
            if "dedup_key" not in msg and msg.get("action") == "trigger":
                self.keys.add(rid)     # a trigger without a key is its own alert, keyed by its record
        self.pending = []

    def at(self, ms: int) -> None:
        self.now = ms
        self.clock.set(ms)
        self.history.clock(ms)

    def model(self):
        self.resolve()
        return run_model(self.history, self.tenant, self.oncall)

    def want(self, outcomes: bool = False) -> int:
        """Distinct log events the history must produce by now: the model's (and with ``outcomes``
        one delivery outcome per delivery the model asks for)."""
        m = self.model()
        return sum(1 for e in m.events if self.mine(e)) + outcomes * sum(1 for r in m.deliveries.values()
                                                                          if self.mine(r))

    def events(self, count: int | None = None, *, outcomes: bool = False, settle: float = 0.0,
               deadline: float = 120.0) -> list[dict]:
        """The log's events of this run, once it holds every event the model has by now (by event id:
        a count could be made up by delivery outcomes while an input is still on its way), and
        ``count`` distinct (case, version) if given, or the model's count with ``outcomes``."""
        ids = set() if count is not None else {e["event_id"] for e in self.model().events if self.mine(e)}
        count = (self.want(True) if outcomes else 0) if count is None else count

        def complete(found):
            return ids <= {e["event_id"] for e in found} and \
                len({(e["case_id"], e["version"]) for e in found}) >= count
        try:
            return self.stack.read(self.tenant_name, "domain-events", self.mine, until=complete,
                                   settle=settle, deadline=deadline)
        except AssertionError:  # say which: the checker on what is there
            self.history.events = self.stack.read(self.tenant_name, "domain-events", self.mine,
                                                  until=lambda f: True, settle=1.0)
            print(f"events missing; {check(self.history, self.tenant, self.oncall, scope=self.mine)}")
            raise

    # -- the end: observe everything, rebuild the projections from the log, judge -------------------

    def _read(self, topic: str, role: str, match, until, deadline: float = 90.0) -> list[dict]:
        """The records of ``topic`` that ``match``, once ``until(records)`` holds (and a second more);
        at the deadline, what is there: the checker says what is missing."""
        try:
            return asyncio.run(self.stack._read(topic, role, match, None, until, deadline, 1.0))
        except AssertionError:
            return asyncio.run(self.stack._read(topic, role, match, None, lambda found: True, deadline, 2.0))

    def dead_letters(self, model) -> list[dict]:
        """The run's records of T.dlq, once every dead letter the model expects is there."""
        return self._read(self.stack.topic(self.tenant_name, "dlq"), "dlq",
                          lambda r: self.run_id in (r.get("original") or ""),
                          lambda found: not missing_dead_letters(model.dead_letters, found))

    def verdict(self, rx: Receiver | None = None, relay: tuple[str, ...] = (), replay: str | None = "function"):
        """Everything that came out, judged. ``relay``: the subscriptions whose topics to read;
        ``replay``: rebuild both projections from the log into a side prefix and compare, with the
        replay function (``"function"``) or the ``casestream replay`` command (``"cli"``); None: no
        rebuild."""
        h, stack = self.history, self.stack
        h.events = self.events(outcomes=True, settle=1.0)
        model = self.model()
        formats = {s.id: s.format for s in (self.oncall.subscriptions if self.oncall else ())}
        for sub in relay:
            topic = load_topics(self.tenant_name).relay(sub).name
            n = sum(1 for e in model.relayed.get(sub, []) if self.mine(e))
            role = "domain-events" if formats.get(sub) == "avro" else "json"
            h.relay[sub] = self._read(topic, role, self.mine,
                                      lambda f: len({(e["case_id"], e["version"]) for e in f}) >= n)
        if rx is not None:
            h.hits = [Hit(x.delivery_id, x.body, x.path, x.status) for x in list(rx.hits)]
        h.dead_letters = self.dead_letters(model)
        latest: dict[str, int] = {}
        for e in h.events:
            latest[e["case_id"]] = max(latest.get(e["case_id"], 0), e["version"])
        ids = sorted(latest)
        live = Projections(stack, self.tenant_name, stack.db_prefix, stack.index(self.tenant_name))
        try:
            stack.poll(live.versions(ids), lambda got: got == (latest, latest), what="both projections up to date")
        except AssertionError:
            pg, es = live.versions(ids)()
            behind = {cid: (latest[cid], pg.get(cid), es.get(cid)) for cid in ids
                      if (pg.get(cid), es.get(cid)) != (latest[cid], latest[cid])}
            print(f"projections behind (log, pg, es): {behind}\nuncommitted: {group_lag(stack, self.tenant_name)}")
            raise
        h.pg_states, h.pg_timeline, h.es_docs = live.read(ids)
        h.pg_rows = live.rows(ids)
        if replay:
            side = f"{stack.db_prefix}replay_"
            rebuilt = Projections(stack, self.tenant_name, side, side + f"cases-{self.tenant_name}")
            try:
                rebuilt.replay(cli=replay == "cli")
                h.replay_pg_states, h.replay_pg_timeline, h.replay_es_docs = rebuilt.read(ids)
                h.replay_pg_rows = rebuilt.rows(ids)
            finally:
                stack.es_drop(rebuilt.index)   # its database goes with the stack's (same prefix)
        self.mark("checked")
        return check(h, self.tenant, self.oncall, scope=self.mine)


class Projections:
    """One tenant's PostgreSQL projection and search index under a database/index prefix."""

    def __init__(self, stack, tenant: str, db_prefix: str, index: str):
        from sinks.postgres import database_name

        self.stack, self.tenant, self.db_prefix, self.index = stack, tenant, db_prefix, index
        self.database = database_name(tenant, db_prefix)

    def _pg(self, sql: str, *args) -> list[dict]:
        import asyncpg

        async def run():
            conn = await asyncpg.connect(self.stack.postgres_dsn, database=self.database)
            try:
                return [dict(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return asyncio.run(run())

    def _docs(self, ids: list[str], chunk: int = 2000) -> dict[str, dict]:
        """The documents of ``ids``, ``chunk`` at a time (Elasticsearch, with its 512 MiB test heap,
        stopped answering while the 1M soak polled all its 50 000 cases in one _mget)."""
        out: dict[str, dict] = {}
        for i in range(0, len(ids), chunk):
            docs = self.stack.es("POST", f"/{self.index}/_mget", {"ids": ids[i:i + chunk]}).get("docs", [])
            out.update((d["_id"], d["_source"]) for d in docs if d.get("found"))
        return out

    def versions(self, ids: list[str]):
        def read():
            rows = self._pg("SELECT case_id, version FROM case_states WHERE case_id = ANY($1::text[])", ids)
            return ({r["case_id"]: r["version"] for r in rows},
                    {cid: d["version"] for cid, d in self._docs(ids).items()})
        return read

    def read(self, ids: list[str]):
        states = {r["case_id"]: orjson.loads(r["state"]) for r in self._pg(
            "SELECT case_id, state FROM case_states WHERE case_id = ANY($1::text[])", ids)}
        timeline = {(r["case_id"], r["version"], r["event_id"]) for r in self._pg(
            "SELECT case_id, version, event_id FROM timeline WHERE case_id = ANY($1::text[])", ids)}
        return states, timeline, self._docs(ids)

    def rows(self, ids: list[str]) -> dict[str, dict]:
        """Every column of the cases' rows: ``cases`` by case id, ``timeline`` by (case id, version)."""
        cases = self._pg("SELECT * FROM cases WHERE case_id = ANY($1::text[])", ids)
        timeline = self._pg("SELECT * FROM timeline WHERE case_id = ANY($1::text[])", ids)
        return {"cases": {r["case_id"]: r for r in cases},
                "timeline": {(r["case_id"], r["version"]): r for r in timeline}}

    def replay(self, cli: bool = False) -> None:
        """``casestream replay --sink all --from-beginning`` into this prefix: a projection rebuilt from
        the log (``cli``: the command itself, as a subprocess; else its function in this process)."""
        from streams.replay import replay
        from streams.settings import load_settings

        env = dict(self.stack.env, CASESTREAM_DB_PREFIX=self.db_prefix,
                   CASESTREAM_INDEX_PREFIX=self.index[:-len(f"cases-{self.tenant}")])
        if cli:
            out = subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--tenant", self.tenant,
                                  "--sink", "all", "--from-beginning", "--json"], env=env, cwd=str(PROJECT_ROOT),
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
            return
        asyncio.run(replay(load_settings(env), get_tenant(self.tenant), ["postgres", "elasticsearch"], rebuild=True,
                           progress=False))


# -- kills spaced by progress ----------------------------------------------------------------------

class Kills:
    """SIGKILL each worker ``times`` times while it works through the domain events it has to make
    (``targets``: (worker, how many)), the k-th kill once it has made k / (times + 1) of them and its
    current incarnation is at work (its events metric, summed over its incarnations: work redone
    after a kill counts again, so a kill comes a little early, never late), then restart it in
    place: same instance id, same data directory (a pod restarted by its supervisor). Each worker's
    peak RSS is sampled meanwhile (``peak``; ``rss``: each killed incarnation's), and its current RSS
    each time it has made another ``trace_every`` of its events (``trace``: (events made, MiB))."""

    EVENTS = "casestream_domain_events_total"

    def __init__(self, stack, targets: list[tuple[object, int]], times: int = 3, trace_every: float = 0.05):
        from tests.reliability.report import PeakRss

        self.stack, self.targets, self.times, self.trace_every = stack, targets, times, trace_every
        self.trace: dict[str, list[tuple[int, float | None]]] = {w.instance_id: [] for w, _ in targets}
        self.made = {w.instance_id: 0.0 for w, _ in targets}              # by the incarnations killed so far
        self.at: dict[str, list[int]] = {w.instance_id: [] for w, _ in targets}   # events made at each kill
        self.rss: dict[str, list[float | None]] = {w.instance_id: [] for w, _ in targets}
        self.peak = {w.instance_id: PeakRss() for w, _ in targets}

    def due(self, worker, events: int, now: float) -> bool:
        k = len(self.at[worker.instance_id])
        return k < self.times and now > 0 and self.made[worker.instance_id] + now >= events * (k + 1) / (self.times + 1)

    def run(self, deadline: float = 300.0) -> None:
        """Until every worker has been killed ``times`` times (each restarted at once)."""
        from tests.reliability.report import rss_mib

        def step():
            for w, events in self.targets:
                self.peak[w.instance_id].sample(w.proc.pid)
                now = metric(w, self.EVENTS)
                made, trace = self.made[w.instance_id] + now, self.trace[w.instance_id]
                if events and made >= events * self.trace_every * (len(trace) + 1):
                    trace.append((int(made), rss_mib(w.proc.pid, "VmRSS")))
                if self.due(w, events, now):
                    self.rss[w.instance_id].append(rss_mib(w.proc.pid))
                    w.kill()
                    self.made[w.instance_id] += now
                    self.at[w.instance_id].append(int(self.made[w.instance_id]))
                    w.start()
            return {iid: (len(at), int(self.made[iid])) for iid, at in self.at.items()}   # kills, events made

        self.stack.poll(step, lambda done: all(k >= self.times for k, _ in done.values()), deadline=deadline,
                        what=f"{self.times} kills of each worker mid-batch (of {[n for _, n in self.targets]} events)")
