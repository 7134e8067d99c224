"""Intake -> domain events -> Elasticsearch + PostgreSQL, end to end, with reference ceilings.

    .venv/bin/python bench/projections_bench.py [--events 200000] [--rate 1000] [--rate-seconds 20]
        [--engines apache|standin]

On the engines (``streams.engines``: Apache Kafka + Elasticsearch, or the
noida-db stand-in for both; PostgreSQL either way) started on free ports in a
temporary directory, with throw-away databases, one on-call worker:

1. throughput: N intake events published up front (70 % repeats of 5 000
   open keys, 20 % new keys, 10 % acknowledge/resolve); the clock stops when
   both projections hold every resulting domain event (timeline rows in
   PostgreSQL, documents at their last version in Elasticsearch);
2. latency: new-key triggers offered at a fixed rate; for a sample of them,
   intake publish -> the case is searchable in Elasticsearch (p50/p95/p99);
3. the worker's peak RSS (VmHWM);
4. reference ceilings on the same broker: a bare aiokafka
   consume -> transform -> produce loop, and a no-op Faust agent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.config import get_tenant, load_tenants, load_topics  # noqa: E402
from streams.domain.intake import make_case_id, parse  # noqa: E402
from streams.kafka import create_topics, stop_consumer  # noqa: E402
from streams.query import percentiles  # noqa: E402
from streams.stage.memory import MemoryStage  # noqa: E402
from bench_engines import add_engines_arg, running_engines, stop  # noqa: E402

TENANT = "on-call"


def workload(n: int, open_keys: int, run: str) -> list[bytes]:
    rnd = random.Random(42)
    out, new = [], 0
    for i in range(n):
        r = rnd.random()
        if i < open_keys:
            key = f"{run}/open-{i}"
            msg = {"action": "trigger", "dedup_key": key, "summary": f"{key} failing", "severity": "error"}
        elif r < 0.70:
            key = f"{run}/open-{rnd.randrange(open_keys)}"
            msg = {"action": "trigger", "dedup_key": key, "summary": f"{key} failing", "severity": "error"}
        elif r < 0.90:
            new += 1
            key = f"{run}/new-{new}"
            msg = {"action": "trigger", "dedup_key": key, "summary": f"{key} failing", "severity": "warning"}
        else:
            key = f"{run}/new-{rnd.randrange(1, new + 1)}" if new else f"{run}/open-0"
            msg = {"action": rnd.choice(["acknowledge", "resolve"]), "dedup_key": key}
        msg["event_id"] = f"{run}-{i}"
        out.append(orjson.dumps(msg))
    return out


def expected(lines: list[bytes]) -> tuple[int, dict[str, int]]:
    """Events the feed produces, by the pure domain with the tenant's on-call
    config, at the time of receipt (schedules answer for now)."""
    from streams.oncall_config import load_oncall

    tenant = get_tenant(TENANT)
    world = MemoryStage(tenant, load_oncall(tenant, ROOT / "oncall" / f"{TENANT}.yaml"))
    now = int(time.time() * 1000)
    n, latest = 0, {}
    for raw in lines:
        d = world.handle(parse(raw, tenant, now))
        for e in d.events:
            n += 1
            latest[e["case_id"]] = e["version"]
    return n, latest


async def produce(bootstrap: str, topic: str, lines: list[bytes], rate: float | None = None,
                  on_sent=None) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await p.start()
    try:
        t0 = time.monotonic()
        futs = []
        for i, raw in enumerate(lines):
            if rate:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the offered rate
            futs.append(await p.send(topic, raw, key=orjson.loads(raw)["dedup_key"].encode()))
            if on_sent:
                on_sent(i, raw)
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def pg_count(dsn: str, db: str) -> int:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, database=db)
    except Exception:
        return 0
    try:
        return await conn.fetchval("SELECT count(*) FROM timeline")
    except Exception:
        return 0
    finally:
        await conn.close()


async def es_done(es, index: str, latest: dict[str, int]) -> int:
    ids = sorted(latest)
    ok = 0
    for i in range(0, len(ids), 1000):
        try:
            r = await es.mget(index=index, ids=ids[i:i + 1000])
        except Exception:
            return 0
        ok += sum(1 for d in r.body["docs"] if d.get("found") and d["_version"] >= latest[d["_id"]])
    return ok


async def bare_aiokafka(bootstrap: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from streams.config import TopicFamily, TopicSpec

    src, dst = f"bench-src-{uuid.uuid4().hex[:6]}", f"bench-dst-{uuid.uuid4().hex[:6]}"
    # created here: Apache Kafka (auto.create.topics.enable=false) does not create them on first use
    await create_topics(bootstrap, [TopicFamily("bench", "bench", 8, 1, {
        "src": TopicSpec("src", src, 8, 1), "dst": TopicSpec("dst", dst, 8, 1)}, ())])
    await produce(bootstrap, src, [orjson.dumps({"dedup_key": str(i), "v": i}) for i in range(n)])
    c = AIOKafkaConsumer(src, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await c.start()
    await p.start()
    t0, done = time.perf_counter(), 0
    try:
        while done < n:
            batch = await c.getmany(timeout_ms=500, max_records=5000)
            futs = []
            for recs in batch.values():
                for rec in recs:
                    msg = orjson.loads(rec.value)
                    msg["seen"] = True
                    futs.append(await p.send(dst, orjson.dumps(msg), key=rec.key))
            await asyncio.gather(*futs)
            done += len(futs)
        return n / (time.perf_counter() - t0)
    finally:
        await stop_consumer(c)
        await p.stop()


FAUST_NOOP = textwrap.dedent("""
    import sys, time, faust
    bootstrap, topic, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app = faust.App("bench-noop-" + topic, broker="kafka://" + bootstrap, web_enabled=False,
                    consumer_auto_offset_reset="earliest", topic_partitions=8)
    src = app.topic(topic, value_type=bytes, value_serializer="raw")
    state = {"n": 0, "t0": None}
    @app.agent(src)
    async def noop(stream):
        async for _ in stream:
            if state["t0"] is None:
                state["t0"] = time.perf_counter()
            state["n"] += 1
            if state["n"] == n:
                open(out, "w").write(str(n / (time.perf_counter() - state["t0"])))
                raise SystemExit(0)
    app.main()
""")


async def faust_noop(bootstrap: str, n: int, work: Path) -> float:
    topic = f"bench-noop-{uuid.uuid4().hex[:6]}"
    from streams.config import TopicFamily, TopicSpec

    fam = TopicFamily("bench", "bench", 8, 1, {"x": TopicSpec("x", topic, 8, 1)}, ())
    await create_topics(bootstrap, [fam])
    await produce(bootstrap, topic, [orjson.dumps({"dedup_key": str(i)}) for i in range(n)])
    script, out = work / "noop.py", work / "noop.out"
    script.write_text(FAUST_NOOP)
    proc = subprocess.Popen([sys.executable, str(script), bootstrap, topic, str(n), str(out)], cwd=str(work), stdout=open(work / "noop.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not out.exists() and time.monotonic() < deadline and proc.poll() is None:
        await asyncio.sleep(0.2)
    proc.kill()
    return float(out.read_text()) if out.exists() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--open-keys", type=int, default=5_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--rate-seconds", type=float, default=20.0)
    ap.add_argument("--ceiling-events", type=int, default=50_000)
    ap.add_argument("--split", action="store_true",
                    help="run intake and projections as two worker processes (--role) instead of one")
    add_engines_arg(ap)
    args = ap.parse_args()
    with running_engines(args.engines) as engines_env:
        svc = SimpleNamespace(kafka=engines_env["KAFKA_BOOTSTRAP_SERVERS"],
                              elasticsearch=engines_env["ELASTICSEARCH_URL"])
        run_bench(args, svc, engines_env["POSTGRES_DSN"])


def run_bench(args, svc: SimpleNamespace, dsn: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="casestream-bench-"))
    prefix = f"csbench_{uuid.uuid4().hex[:6]}_"
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=svc.kafka, ELASTICSEARCH_URL=svc.elasticsearch,
               POSTGRES_DSN=dsn, CASESTREAM_DATA_DIR=str(base / "data"), CASESTREAM_DB_PREFIX=prefix,
               CASESTREAM_INDEX_PREFIX=prefix)
    worker = None
    extra = None
    try:
        asyncio.run(create_topics(svc.kafka, [load_topics(t) for t in load_tenants()]))
        fam = load_topics(TENANT)
        roles = ["intake", "projections"] if args.split else ["all"]
        procs = [subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--tenant", TENANT, "--role", r,
                                   "--loglevel", "warning"], env=env, cwd=str(ROOT),
                                  stdout=open(base / f"worker-{r}.log", "wb"), stderr=subprocess.STDOUT)
                 for r in roles]
        worker, extra = procs[0], (procs[1] if len(procs) > 1 else None)
        print(f"workers: {', '.join(roles)}", flush=True)
        run = uuid.uuid4().hex[:6]
        lines = workload(args.events, args.open_keys, run)
        n_events, latest = expected(lines)
        print(f"workload: {len(lines)} intake events -> {n_events} domain events, {len(latest)} cases", flush=True)
        result = asyncio.run(_throughput(svc, fam, dsn, prefix, lines, n_events, latest))
        print(f"throughput: {result}", flush=True)
        lat = asyncio.run(_latency(svc, fam, prefix, args.rate, args.rate_seconds))
        print(f"latency at {args.rate:.0f}/s offered for {args.rate_seconds:.0f}s: {lat}", flush=True)
        for proc in filter(None, (worker, extra)):
            hwm = next((ln.split()[1] for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                        if ln.startswith("VmHWM")), "0")
            print(f"worker {proc.args[proc.args.index('--role') + 1]} peak RSS: {int(hwm) // 1024} MiB", flush=True)
        bare = asyncio.run(bare_aiokafka(svc.kafka, args.ceiling_events))
        noop = asyncio.run(faust_noop(svc.kafka, args.ceiling_events, base))
        e2e = result["events_per_s"]
        print(f"ceilings: bare aiokafka {bare:,.0f} msg/s (pipeline = {e2e / bare:.1%}), "
              f"no-op Faust agent {noop:,.0f} msg/s (pipeline = {e2e / noop:.1%})", flush=True)
    finally:
        for proc in filter(None, (worker, extra)):
            stop(proc)
        asyncio.run(_drop(dsn, prefix))
        shutil.rmtree(base, ignore_errors=True)


async def _throughput(svc, fam, dsn, prefix, lines, n_events, latest) -> dict:
    from elasticsearch import AsyncElasticsearch

    es = AsyncElasticsearch(svc.elasticsearch)
    db, index = f"{prefix}{TENANT}".replace("-", "_"), f"{prefix}cases-{TENANT}"
    try:
        t0 = time.perf_counter()
        await produce(svc.kafka, fam.name("intake"), lines)
        while True:
            pg = await pg_count(dsn, db)
            if pg >= n_events and await es_done(es, index, latest) >= len(latest):
                break
            await asyncio.sleep(0.5)  # polling both projections
        el = time.perf_counter() - t0
        return {"intake_events": len(lines), "domain_events": n_events, "seconds": round(el, 1),
                "events_per_s": round(len(lines) / el)}
    finally:
        await es.close()


async def _latency(svc, fam, prefix, rate: float, seconds: float) -> dict:
    from elasticsearch import AsyncElasticsearch

    tenant = get_tenant(TENANT)
    run = uuid.uuid4().hex[:6]
    n = int(rate * seconds)
    lines = [orjson.dumps({"event_id": f"{run}-{i}", "action": "trigger", "dedup_key": f"{run}/lat-{i}",
                           "summary": "latency probe"}) for i in range(n)]
    sample_every = max(1, n // 200)
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}

    def on_sent(i, raw):
        if i % sample_every == 0:
            sent[make_case_id(tenant, f"{run}/lat-{i}", 1)] = time.monotonic()

    es = AsyncElasticsearch(svc.elasticsearch)
    index = f"{prefix}cases-{TENANT}"

    async def watch():
        deadline = time.monotonic() + seconds + 300
        while time.monotonic() < deadline and (len(seen) < len(sent) or not sent):
            pending = [c for c in sent if c not in seen]
            if pending:
                r = await es.search(index=index, query={"ids": {"values": pending}}, size=len(pending),
                                    source=False)
                now = time.monotonic()
                for h in r.body["hits"]["hits"]:
                    seen.setdefault(h["_id"], now)
            await asyncio.sleep(0.05)  # polling granularity of the latency measurement

    try:
        await asyncio.gather(produce(svc.kafka, fam.name("intake"), lines, rate=rate, on_sent=on_sent), watch())
    finally:
        await es.close()
    lat = [seen[c] - sent[c] for c in sent if c in seen]
    p = percentiles(lat)
    return {"sampled": len(sent), "searchable": len(lat),
            **{k: (round(v, 2) if v is not None else None) for k, v in p.items()}}


async def _drop(dsn: str, prefix: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%"):
            await conn.execute(f'DROP DATABASE IF EXISTS "{r["datname"]}" WITH (FORCE)')
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
