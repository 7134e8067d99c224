"""``casestream demo``: the quick start, end to end on the local services.

Starts the local Kafka + Elasticsearch (if not up), creates the topics, runs
one worker per tenant as a child process, publishes the demo feeds in
``demo/`` (dedup keys and event ids made unique per run), waits until every
expected domain event and dead letter has arrived -- the expectation comes
from running the same feed through the pure domain -- and prints them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from streams import kafka
from streams.config import PROJECT_ROOT, get_tenant, load_tenants, load_topics
from streams.console import CliError, print_table
from streams.domain.event_types import describe
from streams.domain.intake import Rejection, parse
from sinks.elasticsearch import index_name
from streams.app import oncall_path_for
from streams.messages import decode_record, send_lines
from streams.oncall_config import load_oncall
from streams.settings import Settings
from streams.stage.memory import MemoryStage

DEMO_DIR = PROJECT_ROOT / "demo"


def personalize(lines: list[bytes], run: str) -> list[bytes]:
    """Give a feed's dedup keys and event ids a per-run prefix (valid JSON lines only)."""
    out = []
    for raw in lines:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out.append(raw)
            continue
        if isinstance(msg, dict):
            for k in ("event_id", "dedup_key"):
                if isinstance(msg.get(k), str):
                    msg[k] = f"{run}/{msg[k]}"
            raw = orjson.dumps(msg)
        out.append(raw)
    return out


def expected_outputs(tenant, lines: list[bytes], oncall=None, now_ms: int | None = None) -> tuple[int, int]:
    """(domain events, dead letters) the feed produces, by the pure domain,
    with the tenant's on-call config: paging, automation, and the timers
    already due at ``now_ms`` (SLA deadlines of the feed's old timestamps)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    world = MemoryStage(tenant, oncall)
    n_events = n_dlq = 0
    for raw in lines:
        it = parse(raw, tenant, now_ms)
        if isinstance(it, Rejection):
            n_dlq += 1
            continue
        d = world.handle(it)
        n_events += len(d.events)
        n_dlq += d.rejection is not None
    if oncall is not None:
        n_events += len(world.advance(now_ms))
    return n_events, n_dlq


async def _collect(settings: Settings, start: dict, want: int, deadline: float) -> list:
    """Read the output topics from ``start`` offsets until ``want`` records or the deadline."""
    got = []
    async with kafka.started_consumer(settings.kafka_bootstrap_servers) as consumer:
        consumer.assign(list(start))
        for tp, off in start.items():
            consumer.seek(tp, off)
        while len(got) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, recs in batch.items():
                kind = "dlq" if tp.topic.endswith(".dlq") else "domain-events"
                tenant = tp.topic.rsplit(".", 1)[0]
                got.extend((f"{tenant} {kind}", decode_record(rec, kind)) for rec in recs)
    return got


async def _reset_projections(settings: Settings, tenant: str) -> None:
    import asyncpg
    from elasticsearch import AsyncElasticsearch

    from sinks.postgres import database_name

    try:
        conn = await asyncpg.connect(settings.postgres_dsn, database=database_name(tenant, settings.db_prefix))
    except (OSError, asyncpg.PostgresError):
        conn = None  # no database yet: nothing to reset
    if conn is not None:
        try:
            await conn.execute("TRUNCATE cases, case_states, timeline, projection_positions")
        except asyncpg.PostgresError:
            pass  # not migrated yet
        finally:
            await conn.close()
    es = AsyncElasticsearch(settings.elasticsearch_url)
    try:
        alias = index_name(get_tenant(tenant, settings.tenants_file), settings.index_prefix)
        if await es.indices.exists_alias(name=alias):
            for concrete in (await es.indices.get_alias(name=alias)).body:
                await es.indices.delete(index=concrete)
        elif await es.indices.exists(index=alias):
            await es.indices.delete(index=alias)
    finally:
        await es.close()


async def _wait_projected(settings: Settings, got: list, deadline: float) -> dict[str, tuple[int, int]]:
    """Poll each tenant's timeline until it holds the demo's domain events."""
    import asyncpg

    from sinks.postgres import database_name

    want: dict[str, list[str]] = {}
    for where, d in got:
        tenant, kind = where.split()
        if kind == "domain-events":
            want.setdefault(tenant, []).append(d["event_id"])
    out = {}
    for tenant, ids in want.items():
        n = 0
        while True:
            try:
                conn = await asyncpg.connect(settings.postgres_dsn, database=database_name(tenant, settings.db_prefix))
                try:
                    n = await conn.fetchval("SELECT count(*) FROM timeline WHERE event_id = ANY($1::text[])", ids)
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError):
                pass  # not migrated yet: the worker creates it on start
            if n >= len(ids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        out[tenant] = (n, len(ids))
    return out


async def _wait_indexed(settings: Settings, got: list, deadline: float) -> dict[str, tuple[int, int]]:
    """Poll each tenant's index until every demo case is there at its latest version."""
    from elasticsearch import AsyncElasticsearch

    latest: dict[str, dict[str, int]] = {}
    for where, d in got:
        tenant, kind = where.split()
        if kind == "domain-events":
            cases = latest.setdefault(tenant, {})
            cases[d["case_id"]] = max(cases.get(d["case_id"], 0), d["version"])
    out = {}
    es = AsyncElasticsearch(settings.elasticsearch_url)
    try:
        for tenant, cases in latest.items():
            n = 0
            while True:
                try:
                    r = await es.mget(index=index_name(get_tenant(tenant, settings.tenants_file), settings.index_prefix),
                                     ids=sorted(cases))
                    n = sum(1 for d in r.body["docs"] if d.get("found") and d["_version"] >= cases[d["_id"]])
                except Exception:  # index not created yet
                    n = 0
                if n >= len(cases) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            out[tenant] = (n, len(cases))
    finally:
        await es.close()
    return out


def run_demo(settings: Settings, follow: bool = False, as_json: bool = False) -> int:
    from streams.engines import EngineError, Engines, choose_profile
    from streams.settings import load_settings

    say = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    engines = Engines(settings.data_dir)
    try:
        profile, why = choose_profile()
        say(f"1/5 local engines: {'Apache Kafka, Elasticsearch' if profile == 'apache' else 'the noida-db stand-in'}"
            f" and PostgreSQL ({profile}: {why}) ...")
        engines.up(profile, busy_ok=True)
    except EngineError as exc:
        raise CliError(str(exc)) from None
    engine_env = engines.env()
    settings = load_settings(dict(os.environ, **engine_env))
    for row in engines.status():
        say(f"    {row['service']}: {row['engine']} {row['version']} at {row['address']}")
    tenants = sorted(load_tenants(settings.tenants_file))
    families = {t: load_topics(t, settings.topics_file) for t in tenants}
    say("2/5 topics ...")
    results = asyncio.run(kafka.create_topics(settings.kafka_bootstrap_servers, list(families.values())))
    fresh = {r.name for r in results if r.created}
    for t, fam in families.items():
        if fam.name("intake") in fresh:
            # a log that is new (Apache Kafka keeps its topics across 'services down/up', so: new
            # engines or data directory, a recreated container, another cluster; the stand-in keeps
            # records in memory, so after every restart): the local table stores and the projections
            # describe a log that no longer exists; projections are functions of the log, so start over.
            if settings.store_dir(t).exists():
                shutil.rmtree(settings.store_dir(t))
            asyncio.run(_reset_projections(settings, t))
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    say(f"3/5 one worker per tenant (logs in {logs}) ...")
    procs = []
    env = dict(os.environ, **engine_env, CASESTREAM_DATA_DIR=str(settings.data_dir))
    for i, t in enumerate(tenants):
        log = open(logs / f"worker-{t}.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--tenant", t, "--metrics-port", str(9464 + i)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(PROJECT_ROOT)))
    try:
        run = f"demo-{int(time.time())}"
        want = 0
        outputs = [families[t].name(r) for t in tenants for r in ("domain-events", "dlq")]
        start = asyncio.run(kafka.end_offsets(settings.kafka_bootstrap_servers, outputs))
        say(f"4/5 demo feeds (run {run}) ...")
        for t in tenants:
            feed = DEMO_DIR / f"{t}.jsonl"
            if not feed.exists():
                continue
            lines = personalize([ln for ln in feed.read_bytes().splitlines() if ln.strip()], run)
            tenant = get_tenant(t, settings.tenants_file)
            n_events, n_dlq = expected_outputs(tenant, lines, load_oncall(tenant, oncall_path_for(settings, t)))
            want += n_events + n_dlq
            asyncio.run(send_lines(settings.kafka_bootstrap_servers, families[t].name("intake"), lines, tenant))
            say(f"    {t}: {len(lines)} messages -> expecting {n_events} domain events, {n_dlq} dead letters")
        say("5/5 waiting for the workers (first start takes ~15 s) ...")
        got = asyncio.run(_collect(settings, start, want, time.monotonic() + 120))
        rows = []
        for where, d in got:
            tenant, kind = where.split()
            if kind == "dlq":
                rows.append({"tenant": tenant, "case": "-", "v": "-", "event": "DLQ:" + d["reason"],
                             "change": d["detail"][:70]})
            else:
                rows.append({"tenant": tenant, "case": d["case_id"], "v": d["version"], "event": d["type"],
                             "change": describe(d)})
        rows.sort(key=lambda r: (r["tenant"], r["case"], str(r["v"]).zfill(4)))
        if as_json:
            sys.stdout.write(orjson.dumps([d for _, d in got]).decode() + "\n")
        else:
            print_table(rows, ["tenant", "case", "v", "event", "change"])
        say(f"\n{len(got)} of {want} expected outputs arrived."
            f" Metrics: http://127.0.0.1:9464/metrics and :9465/metrics while workers run.")
        if len(got) < want:
            say(f"Workers were slow or failed; see {logs}.")
            return 1
        projected = asyncio.run(_wait_projected(settings, got, time.monotonic() + 60))
        for t, (n, total) in sorted(projected.items()):
            say(f"PostgreSQL {t}: {n} of {total} domain events in the timeline"
                f" (casestream case show --tenant {t} CASE_ID --timeline)")
        indexed = asyncio.run(_wait_indexed(settings, got, time.monotonic() + 60))
        for t, (n, total) in sorted(indexed.items()):
            say(f"Elasticsearch {index_name(get_tenant(t, settings.tenants_file), settings.index_prefix)}: {n} of {total} cases at their latest version")
        if any(n < total for n, total in list(projected.values()) + list(indexed.values())):
            say(f"A projection is behind; see {logs}.")
            return 1
        if follow:
            say("Workers keep running; Ctrl-C stops them. Watch with: casestream tail --tenant on-call")
            while all(p.poll() is None for p in procs):
                time.sleep(1)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not follow:
            say("Workers stopped; engines still up ('casestream services down' stops them). "
                "Point a shell at them: eval \"$(casestream services status --env)\"; "
                "then run a worker yourself: casestream worker --tenant on-call")
