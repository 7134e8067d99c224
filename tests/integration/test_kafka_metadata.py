"""Topic metadata against a real broker: what a fresh client knows, a topic read the moment it
is created, a missing topic reported as missing, and the gateway's readiness following Kafka."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from streams.kafka import TOPIC_WAIT, end_offsets, topic_partitions

pytestmark = [pytest.mark.integration, pytest.mark.smoke]


async def _create(bootstrap: str, names: list[str], partitions: int = 8) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


def test_a_topic_is_found_the_moment_it_is_created(fresh_stack):
    """Apache Kafka answers metadata for a just-created topic without it for a while (the broker
    applies the controller's record later: tens of milliseconds, longer on a broker just started,
    where most readers miss it): end_offsets (and the DLQ reader and `casestream tail`, which share
    topic_partitions) must still find it. A fresh broker; ten topics in a row, each read at once."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = fresh_stack.kafka

    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            for _ in range(10):
                topic = f"meta-{uuid.uuid4().hex[:10]}"
                resp = await admin.create_topics([NewTopic(topic, 8, 1)])
                assert [e[1] for e in resp.topic_errors] == [0], resp.topic_errors
                t0 = time.monotonic()
                try:
                    offsets = await end_offsets(bootstrap, [topic])
                except RuntimeError as exc:  # say how long the broker took, for the failure message
                    late = await end_offsets(bootstrap, [topic])
                    raise AssertionError(f"{exc}; it was there {time.monotonic() - t0:.1f} s after creation: "
                                         f"{sorted(tp.partition for tp in late)}") from None
                assert sorted(tp.partition for tp in offsets) == list(range(8)) and set(offsets.values()) == {0}
        finally:
            await admin.close()

    asyncio.run(run())


def test_a_fresh_client_learns_the_partitions_and_a_missing_topic_is_missing(engine_set):
    from aiokafka import AIOKafkaConsumer

    bootstrap = engine_set.env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = f"meta-{uuid.uuid4().hex[:10]}"

    async def run():
        await _create(bootstrap, [topic], partitions=3)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            assert await topic_partitions(consumer._client, topic) == {0, 1, 2}
            t0 = time.monotonic()
            assert await topic_partitions(consumer._client, f"{topic}-absent") == set()
            return time.monotonic() - t0
        finally:
            await consumer.stop()

    took = asyncio.run(run())
    assert TOPIC_WAIT <= took < TOPIC_WAIT + 5  # asked again for a while, then reported missing
    with pytest.raises(RuntimeError, match="does not exist"):
        asyncio.run(end_offsets(bootstrap, [f"{topic}-absent"]))


def test_gateway_readiness_follows_kafka(fresh_stack):
    """/ready asks Kafka each time: a broker that answered once and is gone now is not ready."""
    from streams.gateway import Publisher

    stack = fresh_stack
    results: list[bool] = []

    async def run():
        pub = Publisher(stack.kafka, ["on-call"], timeout=3.0)
        try:
            results.append(await pub.ready())                   # connected, Kafka up
            await asyncio.to_thread(stack.stop_engine, "kafka")
            end = time.monotonic() + 30
            while await pub.ready() and time.monotonic() < end:  # the same producer, Kafka gone
                await asyncio.sleep(0.2)                          # polling interval, bounded by the deadline
            results.append(await pub.ready())
            await asyncio.to_thread(stack.start_engine, "kafka")
            end = time.monotonic() + 60
            while not await pub.ready() and time.monotonic() < end:
                await asyncio.sleep(0.2)                          # polling interval, bounded by the deadline
            results.append(await pub.ready())
        finally:
            await pub.close()

    asyncio.run(run())
    assert results == [True, False, True]
