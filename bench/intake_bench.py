"""Intake throughput: the pure domain in-process, and the whole worker end to end.

    .venv/bin/python bench/intake_bench.py [--messages 20000] [--keys 2000] [--engines apache|standin]

1. domain: parse + the apply stage per message, no I/O (one core): ``streams.stage.memory.MemoryStage``,
   the apply agent's code -- decide, relay copies and delivery requests, Avro encoding, remember
   (with the recorded outputs). Before streams/stage existed this measured parse + decide + remember
   only (``cases.InMemory``: no outputs, no encoding), so its earlier figures are not comparable.
2. end to end: Kafka (``streams.engines``: Apache Kafka, or the noida-db
   stand-in) on free ports in a temporary directory, topics, one on-call
   worker subprocess (projections off: intake only); N intake messages are published up front, and the
   clock runs from the first publish until the last expected domain event
   has been read back (route -> apply -> Avro out, changelog writes included).
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
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.config import get_tenant, load_tenants, load_topics  # noqa: E402
from streams.domain.intake import parse  # noqa: E402
from streams.kafka import end_offsets  # noqa: E402
from streams.stage.memory import MemoryStage  # noqa: E402
from bench_engines import add_engines_arg, running_engines, stop  # noqa: E402


def feed(n: int, keys: int) -> list[bytes]:
    """Realistic mix: mostly triggers on a key space (dedup), some acks and resolves."""
    out = []
    for i in range(n):
        k = f"svc-{i % keys}"
        phase = (i // keys) % 10
        if phase == 8:
            msg = {"event_id": f"b{i}", "action": "acknowledge", "dedup_key": k}
        elif phase == 9:
            msg = {"event_id": f"b{i}", "action": "resolve", "dedup_key": k}
        else:
            msg = {"event_id": f"b{i}", "action": "trigger", "dedup_key": k, "summary": f"{k} is failing",
                   "severity": "error", "source": "bench", "custom_details": {"i": i, "host": f"h{i % 97}"},
                   "tags": ["bench", "env:prod"]}
        out.append(orjson.dumps(msg))
    return out


def _oncall(oncall_dir: Path):
    """The on-call tenant's paging config from ``oncall_dir`` (empty: none)."""
    from streams.oncall_config import load_oncall

    return load_oncall(get_tenant("on-call"), oncall_dir / "on-call.yaml")


def _events_of(lines: list[bytes], oncall_dir: Path) -> int:
    tenant = get_tenant("on-call")
    world = MemoryStage(tenant, _oncall(oncall_dir))
    now = int(time.time() * 1000)  # what the worker sees: schedules answer for the time of receipt
    return sum(len(world.handle(parse(raw, tenant, now)).events) for raw in lines)


def bench_domain(lines: list[bytes], oncall_dir: Path) -> tuple[float, int]:
    tenant = get_tenant("on-call")
    world = MemoryStage(tenant, _oncall(oncall_dir))
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    events = 0
    for offset, raw in enumerate(lines):
        events += len(world.handle(parse(raw, tenant, now), offset).events)
    return len(lines) / (time.perf_counter() - t0), events


async def _produce(bootstrap: str, topic: str, lines: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await p.start()
    try:
        futs = [await p.send(topic, raw, key=orjson.loads(raw)["dedup_key"].encode()) for raw in lines]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def _count(bootstrap: str, topic: str, want: int, deadline: float) -> int:
    """Poll the topic's total end offset until it reaches ``want`` (or the deadline)."""
    total = 0
    while time.monotonic() < deadline:
        total = sum((await end_offsets(bootstrap, [topic])).values())
        if total >= want:
            break
        await asyncio.sleep(0.05)  # polling, bounded by the deadline
    return total


def bench_end_to_end(lines: list[bytes], expected_events: int, oncall_dir: Path, profile: str | None) -> dict:
    with running_engines(profile, only=("kafka",)) as engines_env:
        return _end_to_end(engines_env["KAFKA_BOOTSTRAP_SERVERS"], lines, expected_events, oncall_dir)


def _end_to_end(kafka: str, lines: list[bytes], expected_events: int, oncall_dir: Path) -> dict:
    from streams.kafka import create_topics

    base = Path(tempfile.mkdtemp(prefix="casestream-bench-"))
    worker = None
    try:
        asyncio.run(create_topics(kafka, [load_topics(t) for t in load_tenants()]))
        fam = load_topics("on-call")
        # intake only: projections off (they have their own benchmark in the projections issue)
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka, CASESTREAM_DATA_DIR=str(base / "data"),
                   CASESTREAM_PROJECTIONS="", CASESTREAM_ONCALL_DIR=str(oncall_dir))
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--tenant", "on-call",
                                   "--loglevel", "warning"], env=env, cwd=str(ROOT),
                                  stdout=open(base / "worker.log", "wb"), stderr=subprocess.STDOUT)
        # warm up: the worker has joined and recovered once one event went through
        warm = [orjson.dumps({"event_id": "warm", "action": "trigger", "dedup_key": "warm", "summary": "warm"})]
        n_warm = _events_of(warm, oncall_dir)
        asyncio.run(_produce(kafka, fam.name("intake"), warm))
        asyncio.run(_count(kafka, fam.name("domain-events"), n_warm, time.monotonic() + 120))
        t0 = time.perf_counter()
        asyncio.run(_produce(kafka, fam.name("intake"), lines))
        t_sent = time.perf_counter() - t0
        got = asyncio.run(_count(kafka, fam.name("domain-events"), expected_events + n_warm,
                                 time.monotonic() + 600))
        elapsed = time.perf_counter() - t0
        return {"messages": len(lines), "domain_events": got - n_warm, "publish_s": round(t_sent, 2),
                "elapsed_s": round(elapsed, 2), "msgs_per_s": round(len(lines) / elapsed)}
    finally:
        stop(worker)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--no-oncall", action="store_true",
                    help="without the on-call config (no paging): the foundation's figures")
    add_engines_arg(ap)
    args = ap.parse_args()
    oncall_dir = Path(tempfile.mkdtemp(prefix="no-oncall-")) if args.no_oncall else ROOT / "oncall"
    lines = feed(args.messages, args.keys)
    rate, events = bench_domain(lines, oncall_dir)
    print(f"domain (parse + apply stage: decide, outputs, Avro, remember; in-process, "
          f"on-call config {'off' if args.no_oncall else 'on'}): {rate:,.0f} msgs/s; {events} domain events")
    if not args.skip_e2e:
        r = bench_end_to_end(lines, events, oncall_dir, args.engines)
        print(f"end to end (1 on-call worker, local Kafka): {r}")


if __name__ == "__main__":
    main()
