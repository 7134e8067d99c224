"""Benchmark: the intake gateway alone (HTTP in, Kafka acks=all out).

    .venv/bin/python bench/gateway_bench.py [--seconds 10] [--clients 16] [--batch 50] [--engines apache|standin]

Starts Kafka (``streams.engines``: Apache Kafka, or the noida-db stand-in) and
PostgreSQL on free ports in a temporary directory, a throw-away integration in
PostgreSQL, and one `casestream api --routes intake` process; then keep-alive
clients post for a fixed time, first one canonical event per request
(`/v1/integrations/<key>/events`), then `--batch` events per request, then
Alertmanager notifications of 5 alerts. Reports accepted events/s, requests/s
and request latency p50/p99 (a request counts once it got its 202: Kafka has
acknowledged its events). No worker runs: this measures the gateway.
Figures go to bench/RESULTS.md by hand, with the machine and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.config import load_tenants, load_topics  # noqa: E402
from bench_engines import add_engines_arg, running_engines, stop  # noqa: E402

TENANT = "on-call"


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))] if s else float("nan")


async def _load(base: str, path: str, make_body, events_per_request: int, clients: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    n = 0
    stop = time.perf_counter() + seconds

    async def client(session, c: int):
        nonlocal failures, n
        while time.perf_counter() < stop:
            n += 1
            body = make_body(f"{c}-{n}")
            t0 = time.perf_counter()
            async with session.post(base + path, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status == 202:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures += 1

    conn = aiohttp.TCPConnector(limit=clients, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"requests_per_s": round(len(latencies) / elapsed), "events_per_s": round(len(latencies) * events_per_request / elapsed),
            "p50_ms": round(_pct(latencies, 50) * 1000, 1), "p99_ms": round(_pct(latencies, 99) * 1000, 1),
            "refused": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batch", type=int, default=50)
    add_engines_arg(ap)
    args = ap.parse_args()
    with running_engines(args.engines, only=("kafka", "postgres")) as engines_env:
        run_bench(args, engines_env["KAFKA_BOOTSTRAP_SERVERS"], engines_env["POSTGRES_DSN"])


def run_bench(args, kafka: str, dsn: str) -> None:
    from streams.engines import free_port
    from streams.integrations import IntegrationStore
    from streams.kafka import create_topics

    base_dir = Path(tempfile.mkdtemp(prefix="casestream-gwbench-"))
    prefix = f"csbench_{uuid.uuid4().hex[:8]}_"
    gateway = None
    try:
        asyncio.run(create_topics(kafka, [load_topics(t) for t in load_tenants()]))

        async def make():
            store = IntegrationStore(dsn, prefix, [TENANT])
            try:
                return (await store.create(TENANT, "events", "bench"))[1], \
                    (await store.create(TENANT, "alertmanager", "bench"))[1]
            finally:
                await store.close()

        key, am_key = asyncio.run(make())
        port = free_port()
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka, POSTGRES_DSN=dsn, CASESTREAM_DB_PREFIX=prefix,
                   CASESTREAM_RATE_PER_INTEGRATION="1000000/1000000", CASESTREAM_RATE_PER_TENANT="1000000/1000000")
        gateway = subprocess.Popen([sys.executable, "-m", "streams.cli", "api", "--routes", "intake",
                                    "--port", str(port)], env=env, cwd=str(ROOT),
                                   stdout=open(base_dir / "gateway.log", "wb"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # wait for it to answer (bounded)
            try:
                import urllib.request

                urllib.request.urlopen(url + "/ready", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway did not become ready; see " + str(base_dir / "gateway.log"))
                time.sleep(0.2)

        def single(tag: str) -> bytes:
            return orjson.dumps({"action": "trigger", "dedup_key": f"bench/{tag}", "summary": "bench",
                                 "severity": "error", "source": "bench"})

        def batch(tag: str) -> bytes:
            return orjson.dumps([{"action": "trigger", "dedup_key": f"bench/{tag}/{i}", "summary": "bench",
                                  "severity": "error", "source": "bench"} for i in range(args.batch)])

        am = orjson.loads((ROOT / "tests" / "fixtures" / "monitors" / "alertmanager_firing.json").read_bytes())

        def alertmanager(tag: str) -> bytes:
            body = dict(am, groupKey=f"bench/{tag}")
            body["alerts"] = [dict(a, fingerprint=f"{tag}-{i}") for i in range(5) for a in am["alerts"][:1]]
            return orjson.dumps(body)

        path = f"/v1/integrations/{key}/events"
        asyncio.run(_load(url, path, single, 1, 2, 1.0))  # warm up
        runs = [("single event per request", path, single, 1),
                (f"{args.batch} events per request", path, batch, args.batch),
                ("Alertmanager, 5 alerts per notification", f"/v1/integrations/{am_key}/alertmanager", alertmanager, 5)]
        for name, p, make, per in runs:
            r = asyncio.run(_load(url, p, make, per, args.clients, args.seconds))
            print(f"{name} ({args.clients} keep-alive clients, {args.seconds:g} s): {r}")
    finally:
        stop(gateway)

        async def drop():
            import asyncpg

            conn = await asyncpg.connect(dsn)
            try:
                for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%"):
                    await conn.execute(f'DROP DATABASE "{r["datname"]}"')
            finally:
                await conn.close()

        asyncio.run(drop())
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
