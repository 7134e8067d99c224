"""Integration fixtures: real servers over real sockets.

A session fixture starts the project's own engines on free ports in a
temporary data directory (``streams.engines``): Apache Kafka and
Elasticsearch where a JDK 17+ and Maven are present, else the noida-db
stand-in (``CASESTREAM_ENGINES=apache|standin`` chooses; in CI the real
ones are required), and PostgreSQL. A test that needs a broker of its own
(``fresh_stack``: killing workers, killing the broker) gets a fresh Kafka,
and shares Elasticsearch and PostgreSQL under names of its own. Set
CASESTREAM_TEST_EXTERNAL=1 to run against the servers named by
KAFKA_BOOTSTRAP_SERVERS / ELASTICSEARCH_URL / POSTGRES_DSN instead (e.g.
docker-compose's); tests that need their own broker are skipped then.

Workers run as real subprocesses (``python -m streams.cli worker``); tests
publish with aiokafka and read the decoded outputs, polling with deadlines.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from streams.kafka import stop_consumer
import schemas
from streams.config import PROJECT_ROOT, get_tenant, load_tenants, load_topics
from streams.kafka import create_topics
from streams.engines import Engines, choose_profile, free_port

DEADLINE = float(os.environ.get("CASESTREAM_TEST_DEADLINE", "90"))


@dataclass
class Worker:
    tenant: str
    instance_id: str
    data_dir: Path
    env: dict
    log_path: Path
    metrics_port: int
    proc: subprocess.Popen | None = None
    restarts: int = 0

    role: str = "all"

    def start(self) -> "Worker":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--tenant", self.tenant, "--role", self.role,
             "--instance-id", self.instance_id, "--metrics-port", str(self.metrics_port)],
            env=dict(self.env, CASESTREAM_DATA_DIR=str(self.data_dir)),
            stdout=log, stderr=subprocess.STDOUT, cwd=str(PROJECT_ROOT), start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit, no flush."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart_if_stalled(self) -> bool:
        """What a supervisor does: restart a worker that exited on a detected stall."""
        from agents.intake import STALL_EXIT_CODE

        if self.proc is not None and self.proc.poll() == STALL_EXIT_CODE:
            self.restarts += 1
            self.start()
            return True
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class Stack:
    kafka: str
    elasticsearch: str
    base_dir: Path
    postgres_dsn: str
    workers: list[Worker] = field(default_factory=list)
    engines: list = field(default_factory=list)  # the Engines sets serving this stack (own first)
    profile: str = "external"
    db_prefix: str = field(default_factory=lambda: f"cstest_{uuid.uuid4().hex[:8]}_")

    def _engines_of(self, service: str) -> Engines:
        for e in self.engines:
            if any(service in r.engine.services for r in e.running().values()):
                return e
        pytest.skip(f"{service} is not one of this test run's own engines")

    def stop_engine(self, service: str, sig: int | None = None) -> None:
        """Stop the engine serving ``service`` (``signal.SIGKILL``: crash it)."""
        e = self._engines_of(service)
        e.stop(next(n for n, r in e.running().items() if service in r.engine.services), sig=sig)

    def start_engine(self, service: str) -> None:
        """Start it again, on its ports, with its data; returns when it answers."""
        e = self._engines_of(service)
        e.start(next(n for n, r in e.running().items() if service in r.engine.services))

    @property
    def index_prefix(self) -> str:
        return self.db_prefix

    def index(self, tenant: str) -> str:
        return f"{self.index_prefix}cases-{tenant}"

    def es(self, method: str, path: str, body: dict | None = None) -> dict:
        """One Elasticsearch REST call (JSON in, JSON out; HTTP errors returned as their body)."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.elasticsearch}{path}", method=method,
                                     data=orjson.dumps(body) if body is not None else None,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            return dict(orjson.loads(exc.read() or b"{}"), _status=exc.code)

    def es_drop(self, name: str) -> None:
        """Delete an index, or every index behind an alias."""
        aliased = self.es("GET", f"/_alias/{name}")
        targets = [k for k in aliased if not k.startswith("_") and k not in ("error", "status")] or [name]
        for t in targets:
            self.es("DELETE", f"/{t}")

    def database(self, tenant: str) -> str:
        from sinks.postgres import database_name

        return database_name(tenant, self.db_prefix)

    def pg(self, tenant: str, sql: str, *args) -> list[dict]:
        """Run a query on the tenant's projection database (fresh connection)."""
        import asyncpg

        async def run():
            conn = await asyncpg.connect(self.postgres_dsn, database=self.database(tenant))
            try:
                return [dict(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return asyncio.run(run())

    def poll(self, fn, until, *, deadline: float = DEADLINE, what: str = "condition"):
        """Call fn() until until(result) holds; fail at the deadline (no fixed sleeps)."""
        end = time.monotonic() + deadline
        while True:
            for w in self.workers:
                w.restart_if_stalled()
            try:
                result = fn()
            except Exception as exc:  # e.g. the database is not created yet
                result = exc
            if not isinstance(result, Exception) and until(result):
                return result
            if time.monotonic() > end:
                raise AssertionError(f"deadline waiting for {what}; last: {result!r}"[:2000] + self.diagnostics())
            time.sleep(0.2)  # polling interval, bounded by the deadline

    def diagnostics(self) -> str:
        """The workers' state and log tails, for a failure message."""
        out = []
        for w in self.workers:
            state = "alive" if w.alive() else f"exited {w.proc.returncode if w.proc else None}"
            tail = "\n".join(w.log().splitlines()[-15:])
            out.append(f"\n--- worker {w.instance_id} ({w.role}, {state}, restarts {w.restarts}):\n{tail}")
        return "".join(out)

    def drop_databases(self) -> None:
        import asyncpg

        async def run():
            conn = await asyncpg.connect(self.postgres_dsn)
            try:
                for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1",
                                          self.db_prefix + "%"):
                    await conn.execute(f'DROP DATABASE IF EXISTS "{r["datname"]}" WITH (FORCE)')
            finally:
                await conn.close()

        asyncio.run(run())

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(KAFKA_BOOTSTRAP_SERVERS=self.kafka, ELASTICSEARCH_URL=self.elasticsearch,
                   PYTHONPATH=str(PROJECT_ROOT), CASESTREAM_STALL_SECONDS="15",
                   CASESTREAM_DB_PREFIX=self.db_prefix, POSTGRES_DSN=self.postgres_dsn,
                   CASESTREAM_INDEX_PREFIX=self.index_prefix,
                   # no on-call config unless a test gives one: foundation tests see only case changes
                   CASESTREAM_ONCALL_DIR=str(self.base_dir / "no-oncall-config"))
        return env

    def topic(self, tenant: str, role: str) -> str:
        return load_topics(tenant).name(role)

    def create_topics(self) -> None:
        fams = [load_topics(t) for t in load_tenants()]
        asyncio.run(create_topics(self.kafka, fams))

    def worker(self, tenant: str, *, instance_id: str | None = None, data_dir: Path | None = None,
               role: str = "all", env: dict | None = None) -> Worker:
        iid = instance_id or f"test-{tenant}-{role}-{uuid.uuid4().hex[:6]}"
        ddir = data_dir or (self.base_dir / iid)
        w = Worker(tenant, iid, ddir, dict(self.env, **(env or {})), self.base_dir / f"{iid}.log", free_port(),
                   role=role)
        self.workers.append(w)
        return w.start()

    # -- publishing -----------------------------------------------------------

    def send(self, tenant: str, messages: list, *, key_by_dedup: bool = True,
             timestamp_ms: int | None = None) -> list[str]:
        """Publish intake messages (dicts are JSON-encoded, bytes sent as is),
        with the record timestamp ``timestamp_ms`` when given (the receipt
        time on-call timers count from), keyed as ``casestream send`` keys them
        (``key_by_dedup=False``: no key). Returns each record's identity
        (``record_event_id``: what a message without ``event_id`` is known by)."""
        return asyncio.run(self._send(tenant, self.topic(tenant, "intake"), messages, key_by_dedup, timestamp_ms))

    async def _send(self, tenant: str, topic: str, messages: list, key_by_dedup: bool,
                    timestamp_ms: int | None = None) -> list[str]:
        from aiokafka import AIOKafkaProducer

        from streams.messages import message_key
        from streams.domain.intake import record_event_id

        t = get_tenant(tenant)
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka, acks="all",
                                    max_request_size=2 * 1024 * 1024)
        await producer.start()
        try:
            futs = []
            for m in messages:
                raw = m if isinstance(m, bytes) else orjson.dumps(m)
                key = message_key(raw, t)[0] if key_by_dedup and isinstance(m, dict) else None
                futs.append(await producer.send(topic, raw, key=key, timestamp_ms=timestamp_ms))
            placed = await asyncio.gather(*futs)
            return [record_event_id(topic, md.partition, md.offset) for md in placed]
        finally:
            await producer.stop()

    # -- reading --------------------------------------------------------------

    def read(self, tenant: str, role: str, match, *, count: int | None = None,
             until=None, deadline: float = DEADLINE, settle: float = 0.0) -> list[dict]:
        """Decoded records of T.<role> for which ``match(record)`` is true.

        Polls from the beginning until ``count`` matching records (or
        ``until(records)`` is true), failing at the deadline. ``settle``:
        after that, keep reading this many more seconds to catch extras
        (used to prove that nothing *more* arrives).
        """
        return asyncio.run(self._read(self.topic(tenant, role), role, match, count, until, deadline, settle))

    async def _read(self, topic, role, match, count, until, deadline, settle) -> list[dict]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka, enable_auto_commit=False, group_id=None)
        await consumer.start()
        found: list[dict] = []
        try:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = time.monotonic() + deadline
            settle_end = None
            while True:
                for w in self.workers:
                    w.restart_if_stalled()
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for recs in batch.values():
                    for rec in recs:
                        if role == "domain-events":
                            d = schemas.decode(rec.value)
                        else:  # JSON topics; intake may also hold garbage a test sent on purpose
                            try:
                                d = orjson.loads(rec.value)
                            except orjson.JSONDecodeError:
                                d = {"_raw": rec.value.decode("utf-8", errors="replace") if rec.value else None}
                            if not isinstance(d, dict):
                                d = {"_json": d}
                        d["_partition"], d["_offset"], d["_timestamp"] = rec.partition, rec.offset, rec.timestamp
                        d["_headers"] = {k: v.decode() for k, v in (rec.headers or ())}
                        if match(d):
                            found.append(d)
                done = (count is not None and len(found) >= count) or (until is not None and until(found))
                now = time.monotonic()
                if done and settle_end is None:
                    settle_end = now + settle
                if settle_end is not None and now >= settle_end:
                    return found
                if now > end:
                    raise AssertionError(f"deadline: {len(found)} matching records in {topic}"
                                         f" (wanted {count if count is not None else 'until()'}): "
                                         f"{[(r.get('type') or r.get('reason')) for r in found]}"[:3000]
                                         + self.diagnostics())
        finally:
            await stop_consumer(consumer)


@dataclass
class EngineSet:
    profile: str
    env: dict
    engines: Engines | None
    root: Path | None


def pytest_report_header(config):
    if os.environ.get("CASESTREAM_TEST_EXTERNAL") == "1":
        return "engines: external (KAFKA_BOOTSTRAP_SERVERS, ELASTICSEARCH_URL, POSTGRES_DSN)"
    try:
        profile, why = choose_profile()
    except Exception as exc:  # reported again, as an error, by the fixture
        return f"engines: none ({exc})"
    return f"engines: {profile} ({why})"


def pytest_collection_finish(session):
    """Fail at once, with one line, when integration tests were collected and
    no engines can run them (in CI: the real engines are required)."""
    if os.environ.get("CASESTREAM_TEST_EXTERNAL") == "1":
        return
    if not any(item.get_closest_marker("integration") for item in session.items):
        return
    try:
        choose_profile()
    except Exception as exc:
        pytest.exit(f"no engines for the integration tests: {exc}", returncode=1)


def _engine_root(prefix: str) -> Path:
    """A directory PostgreSQL and Elasticsearch can use even when they run as
    an unprivileged account (pytest's own temporary directories are root-only)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def engine_set():
    """The engines of this test run (started once)."""
    if os.environ.get("CASESTREAM_TEST_EXTERNAL") == "1":
        yield EngineSet("external", {k: os.environ[k] for k in
                                      ("KAFKA_BOOTSTRAP_SERVERS", "ELASTICSEARCH_URL", "POSTGRES_DSN")}, None, None)
        return
    profile, _ = choose_profile()
    root = _engine_root("casestream-test-engines-")
    engines = Engines(root)
    try:
        engines.up(profile, {"kafka": 0, "elasticsearch": 0, "postgres": 0})
        yield EngineSet(profile, engines.env(), engines, root)
    finally:
        engines.down()
        shutil.rmtree(root, ignore_errors=True)


def _start_stack(base: Path, es: EngineSet, *, own_kafka: bool) -> tuple[Stack, Engines | None, Path | None]:
    env = dict(es.env)
    own = root = None
    if own_kafka:
        if es.engines is None:
            pytest.skip("needs a broker of its own (not with CASESTREAM_TEST_EXTERNAL=1)")
        root = _engine_root("casestream-test-kafka-")
        own = Engines(root)
        own.up(es.profile, {"kafka": 0, "elasticsearch": 0}, only=("kafka",))
        env.update(own.env())
    stack = Stack(env["KAFKA_BOOTSTRAP_SERVERS"], env["ELASTICSEARCH_URL"], base, env["POSTGRES_DSN"],
                  engines=[e for e in (own, es.engines) if e is not None], profile=es.profile)
    stack.create_topics()
    return stack, own, root


def _stop_stack(stack: Stack, own: Engines | None, root: Path | None) -> None:
    for w in stack.workers:
        w.stop()
    try:
        stack.drop_databases()
    except OSError:
        pass
    for t in load_tenants():
        try:
            stack.es_drop(stack.index(t))
        except OSError:
            pass
    if own is not None:
        own.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(engine_set, tmp_path_factory):
    """The session's engines, topics, and one worker per tenant."""
    base = tmp_path_factory.mktemp("stack")
    s, own, root = _start_stack(base, engine_set, own_kafka=False)
    s.oncall = s.worker("on-call")
    s.cm = s.worker("case-management")
    yield s
    _stop_stack(s, own, root)


@pytest.fixture
def fresh_stack(engine_set, tmp_path):
    """A stack of its own (a fresh Kafka, topics, no workers) for tests that kill workers or the broker."""
    s, own, root = _start_stack(tmp_path, engine_set, own_kafka=True)
    yield s
    _stop_stack(s, own, root)


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:10]
