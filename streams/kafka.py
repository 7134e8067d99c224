"""Kafka plumbing shared by the CLI and tests: topic creation, clients."""

from __future__ import annotations

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


async def end_offsets(bootstrap: str, topics: list[str]) -> dict:
    """TopicPartition -> end offset, for every partition of ``topics`` (each must exist)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = []
        for topic in topics:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise RuntimeError(f"topic {topic} does not exist; run 'casestream topics create'")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        return await consumer.end_offsets(tps)
    finally:
        await stop_consumer(consumer)
