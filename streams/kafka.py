"""Kafka plumbing shared by the CLI and tests: topic creation, clients."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.config import TopicFamily


@dataclass
class TopicResult:
    name: str
    role: str
    partitions: int
    created: bool


async def create_topics(bootstrap: str, families: list[TopicFamily], extra=()) -> list[TopicResult]:
    """Create every topic of the families (and the ``extra`` TopicSpecs) that
    does not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
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
                resp = await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                resp = None  # a concurrent creator won; fine
            for err in getattr(resp, "topic_errors", None) or []:
                name, code = err[0], err[1]
                if code not in (0, TopicAlreadyExistsError.errno):
                    msg = err[2] if len(err) > 2 else ""
                    raise RuntimeError(f"creating topic {name} failed: Kafka error {code} {msg or ''}".strip())
        return results
    finally:
        await admin.close()


async def stop_consumer(consumer) -> None:
    """Stop an aiokafka consumer, tolerating its own cancelled background task.

    aiokafka 0.14 can raise CancelledError from ``stop()`` (its coordinator
    awaits a task it has just cancelled) after ``end_offsets``; that is not a
    cancellation of ours, so it is swallowed unless our task is cancelling.
    """
    import asyncio

    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


TOPIC_WAIT = 10.0  # seconds a topic missing from the metadata is asked about again (just created?)


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
    import asyncio

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


async def end_offsets(bootstrap: str, topics: list[str]) -> dict:
    """TopicPartition -> end offset, for every partition of ``topics`` (each must exist)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = []
        for topic in topics:
            parts = await topic_partitions(consumer._client, topic)
            if not parts:
                raise RuntimeError(f"topic {topic} does not exist; run 'casestream topics create'")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        return await consumer.end_offsets(tps)
    finally:
        await stop_consumer(consumer)


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
