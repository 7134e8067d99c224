"""Kafka plumbing of everything but the Faust agents: the client factory, topics, reading and writing.

* **The client factory.** Every aiokafka client outside ``agents/`` (the
  CLI, the DLQ tools, replay, the demo, the gateway, the engines' readiness
  probe) is built by :func:`producer`, :func:`consumer`, :func:`admin` or
  :func:`client`, started and stopped by :func:`started_producer` /
  :func:`started_consumer`. A producer waits for every in-sync replica
  (``acks=all``); a consumer belongs to no consumer group and commits
  nothing (the tools assign partitions and seek themselves). Every other
  setting is the call site's, passed as aiokafka's keyword arguments.
* **Topics and metadata**: :func:`create_topics`, :func:`topic_partitions`,
  :func:`partitions_of`, :func:`end_offsets`, :func:`track_producer_topics`.
* **Reading and writing** (the one Kafka I/O helper of the tools):
  :func:`publish` sends in order and returns once every message is
  acknowledged; :func:`read_range` reads partitions between two sets of
  offsets (``casestream dlq``, replay, the Elasticsearch sink's history);
  :func:`follow` reads assigned partitions as they grow (``casestream tail``).

Imports: aiokafka and ``streams.config`` only (nothing of the domain).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import TopicAlreadyExistsError

from streams.config import TopicFamily


# --------------------------------------------------------------------------
# the client factory
# --------------------------------------------------------------------------


def producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    """A producer (not started): ``acks=all`` unless ``options`` say otherwise, then ``options``."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **{"acks": "all", **options})


def consumer(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer (not started) in no consumer group that commits nothing, then ``options``."""
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, **{"enable_auto_commit": False, "group_id": None,
                                                            **options})


def admin(bootstrap: str, **options: Any) -> AIOKafkaAdminClient:
    """An admin client (not started)."""
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, **options)


def client(bootstrap: str, **options: Any) -> AIOKafkaClient:
    """A bare client (not bootstrapped): metadata requests only."""
    return AIOKafkaClient(bootstrap_servers=bootstrap, **options)


@asynccontextmanager
async def started_producer(bootstrap: str, **options: Any) -> AsyncIterator[AIOKafkaProducer]:
    """A started :func:`producer`, stopped (flushed) on the way out."""
    p = producer(bootstrap, **options)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@asynccontextmanager
async def started_consumer(bootstrap: str, **options: Any) -> AsyncIterator[AIOKafkaConsumer]:
    """A started :func:`consumer`, stopped on the way out (:func:`stop_consumer`)."""
    c = consumer(bootstrap, **options)
    await c.start()
    try:
        yield c
    finally:
        await stop_consumer(c)


async def stop_consumer(consumer) -> None:
    """Stop an aiokafka consumer, tolerating its own cancelled background task.

    aiokafka 0.14 can raise CancelledError from ``stop()`` (its coordinator
    awaits a task it has just cancelled) after ``end_offsets``; that is not a
    cancellation of ours, so it is swallowed unless our task is cancelling.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


# --------------------------------------------------------------------------
# topics and metadata
# --------------------------------------------------------------------------


@dataclass
class TopicResult:
    name: str
    role: str
    partitions: int
    created: bool


async def create_topics(bootstrap: str, families: list[TopicFamily], extra=()) -> list[TopicResult]:
    """Create every topic of the families (and the ``extra`` TopicSpecs) that
    does not exist yet (idempotent)."""
    client = admin(bootstrap, request_timeout_ms=15000)
    await client.start()
    try:
        existing = set(await client.list_topics())
        results: list[TopicResult] = []
        missing = []
        for spec in [spec for fam in families for spec in fam.all_topics()] + list(extra):
            created = spec.name not in existing
            results.append(TopicResult(spec.name, spec.role, spec.partitions, created))
            if created:
                missing.append(NewTopic(spec.name, spec.partitions, spec.replication_factor,
                                        topic_configs=dict(spec.config)))
                existing.add(spec.name)
        if missing:
            try:
                resp = await client.create_topics(missing)
            except TopicAlreadyExistsError:
                resp = None  # a concurrent creator won; fine
            for err in getattr(resp, "topic_errors", None) or []:
                name, code = err[0], err[1]
                if code not in (0, TopicAlreadyExistsError.errno):
                    msg = err[2] if len(err) > 2 else ""
                    raise RuntimeError(f"creating topic {name} failed: Kafka error {code} {msg or ''}".strip())
        return results
    finally:
        await client.close()


TOPIC_WAIT = 10.0  # seconds a topic missing from the metadata is asked about again (just created?)


def missing_topic(topic: str) -> str:
    """What the tools say of a topic the brokers do not know."""
    return f"topic {topic} does not exist; run 'casestream topics create'"


async def topic_partitions(client, topic: str, wait: float = TOPIC_WAIT) -> set[int]:
    """The partitions of ``topic`` the brokers report (an aiokafka client's);
    empty when it does not exist.

    Asks for fresh metadata first: a client that subscribed to nothing
    knows no topics (aiokafka's bootstrap asks for none, and Apache Kafka
    answers with none). A topic created a moment ago is not in a broker's
    metadata yet (the broker applies the controller's record later: tens of
    milliseconds, seconds on a busy broker just started), so a missing topic
    is asked about again until ``wait`` seconds have passed: only a topic
    that really is missing costs that long.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            await asyncio.wait_for(client.force_metadata_update(), max(0.1, deadline - loop.time()))
        except asyncio.TimeoutError:
            pass
        parts = client.cluster.partitions_for_topic(topic)
        if parts or loop.time() >= deadline:
            return set(parts or ())
        await asyncio.sleep(0.05)  # polling interval, bounded by the deadline


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic`` in order, by a started consumer (:func:`topic_partitions`);
    empty when the topic does not exist."""
    return [TopicPartition(topic, p) for p in sorted(await topic_partitions(consumer._client, topic))]


async def end_offsets(bootstrap: str, topics: list[str]) -> dict:
    """TopicPartition -> end offset, for every partition of ``topics`` (each must exist)."""
    async with started_consumer(bootstrap) as c:
        tps = []
        for topic in topics:
            parts = await partitions_of(c, topic)
            if not parts:
                raise RuntimeError(missing_topic(topic))
            tps += parts
        return await c.end_offsets(tps)


async def track_producer_topics(producer, topics, timeout: float = 10.0) -> bool:
    """Make an aiokafka ``producer`` keep metadata for ``topics`` (besides those it tracks).

    A new producer tracks no topic in particular (its metadata requests ask for
    every topic). The first send to a topic it has no metadata for -- a relay
    topic created after the worker started -- makes it track that topic alone,
    and the next metadata answer then replaces everything it knew: a batch for
    a topic it was already writing to finds no leader, the producer asks for
    metadata ~1 300 times a second for a list without that topic, and a
    ``flush()`` (Faust's commit) never returns. Tracking every topic a worker
    writes to, from the start and before the first send to a new one, avoids it.
    False when ``producer`` is not a started aiokafka producer."""
    client = getattr(producer, "client", None)
    if client is None or not hasattr(client, "set_topics"):
        return False
    wanted = set(getattr(client, "_topics", ())) | set(topics)
    if wanted == set(getattr(client, "_topics", ())):
        return True
    await asyncio.wait_for(asyncio.shield(client.set_topics(wanted)), timeout)
    return True


# --------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------


async def publish(bootstrap: str, messages: Iterable[tuple], *, on_acked: Callable[[int], None] | None = None,
                  **options: Any) -> list:
    """Send ``(topic, key, value[, headers])`` in order; return once Kafka acknowledged every one.

    The producer is a :func:`producer` with ``options``. Messages of one key
    go to one partition in the order given. Returns each message's record
    metadata (partition, offset), in order; ``on_acked(1)`` is called as each
    is acknowledged, in order. Raises on the first failure (nothing after it
    may be assumed to have been written).
    """
    async with started_producer(bootstrap, **options) as p:
        futures = [await p.send(m[0], m[2], key=m[1], headers=list(m[3]) if len(m) > 3 and m[3] else None)
                   for m in messages]
        placed = []
        for fut in futures:
            placed.append(await fut)
            if on_acked is not None:
                on_acked(1)
        return placed


async def read_range(consumer: AIOKafkaConsumer, start: dict, end: dict, *, timeout_ms: int,
                     max_records: int) -> AsyncIterator[list]:
    """Batches (non-empty lists of records) of every partition of ``end`` from its ``start`` offset
    (absent: 0) up to its ``end`` offset, exclusive; ``consumer`` is started and assigned these.

    A partition ends at the first record at or past its end offset, or once
    the consumer's position reaches it (gaps: compaction, transaction
    markers). Records arriving meanwhile are not waited for.
    """
    tps = [tp for tp in end if end[tp] > start.get(tp, 0)]
    if not tps:
        return
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, start.get(tp, 0))
    remaining = set(tps)
    while remaining:
        batch = await consumer.getmany(*remaining, timeout_ms=timeout_ms, max_records=max_records)
        records = []
        for tp, recs in batch.items():
            for rec in recs:
                if rec.offset >= end[tp]:
                    remaining.discard(tp)
                    break
                records.append(rec)
                if rec.offset + 1 >= end[tp]:
                    remaining.discard(tp)
        for tp in list(remaining):
            if await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
        if records:
            yield records


async def follow(consumer: AIOKafkaConsumer, tps: list[TopicPartition], *, from_beginning: bool,
                 max_messages: int | None, idle_timeout: float | None, on_message: Callable[[Any], None]) -> int:
    """Read ``tps`` (every partition, by a started consumer) from their beginning or their end,
    calling ``on_message`` per record, until ``max_messages`` or ``idle_timeout`` seconds without
    one (None: for ever); how many were read."""
    consumer.assign(tps)
    if from_beginning:
        await consumer.seek_to_beginning(*tps)
    else:
        await consumer.seek_to_end(*tps)
    seen = 0
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        batch = await consumer.getmany(timeout_ms=200, max_records=1000)
        for records in batch.values():
            for rec in records:
                on_message(rec)
                seen += 1
                last = loop.time()
                if max_messages and seen >= max_messages:
                    return seen
        if idle_timeout is not None and loop.time() - last > idle_timeout:
            return seen
