"""A case's earlier domain events, read back from the domain-event log.

The Elasticsearch sink folds each batch onto the case state its indexed
document stores. When the document is behind the batch (a version gap: its
document was refused earlier and dead-lettered, or a record never reached
the sink), the events in between are read back from ``T.domain-events``,
which keeps every event (``retention.ms: -1``); :func:`read_log` reads a range of it (also what
``streams/replay.py`` rebuilds projections from). A case's events all sit in one partition (the log is
keyed by case id), in version order, below the offset of the batch's event:
the read goes backwards from there in growing windows and stops at the
first window that holds the event right after the indexed version, so a
repair costs about the distance of the gap, not the partition's length.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

import schemas
from sinks.base import SinkRecord
from streams import kafka


@dataclass(frozen=True)
class Gap:
    """Case ``case_id`` has version ``indexed`` projected (0: nothing); its events after that sit in
    ``topic[partition]`` below offset ``below``."""

    case_id: str
    indexed: int
    topic: str
    partition: int
    below: int


class CaseHistory(Protocol):
    async def missing(self, gaps: list[Gap]) -> dict[str, list[dict]]:
        """Case id -> its events after ``indexed`` found below ``below`` (any order, repeats possible)."""
        ...


async def read_log(bootstrap: str, topic: str, start: dict | None, end: dict,
                    on_batch: Callable[[list[SinkRecord]], Awaitable], batch_size: int = 1000) -> int:
    """Feed records of every partition from ``start`` (None: the beginning) up to ``end`` (exclusive),
    decoded, to ``on_batch`` (also how the Elasticsearch sink reads a case's missing events back)."""
    n = 0
    async with kafka.started_consumer(bootstrap, max_partition_fetch_bytes=4 * 1024 * 1024) as consumer:
        async for records in kafka.read_range(consumer, start or {}, end, timeout_ms=1000, max_records=batch_size):
            await on_batch([SinkRecord(rec.topic, rec.partition, rec.offset, schemas.decode(rec.value))
                            for rec in records])
            n += len(records)
    return n


class LogHistory:
    """``CaseHistory`` over the Kafka cluster at ``bootstrap`` (no consumer group: partitions assigned)."""

    WINDOW = 1000   # offsets in the first window read back; each further window is four times larger

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap

    async def missing(self, gaps: list[Gap]) -> dict[str, list[dict]]:
        from aiokafka import TopicPartition

        found: dict[str, list[dict]] = defaultdict(list)
        by_partition: dict[tuple[str, int], dict[str, Gap]] = defaultdict(dict)
        for g in gaps:
            by_partition[(g.topic, g.partition)][g.case_id] = g
        for (topic, partition), wanted in by_partition.items():
            tp = TopicPartition(topic, partition)
            hi, size = max(g.below for g in wanted.values()), self.WINDOW
            while wanted and hi > 0:
                lo = max(0, hi - size)

                async def take(records: list[SinkRecord]) -> None:
                    for r in records:
                        g = wanted.get(r.event.get("case_id"))
                        if g is not None and r.offset < g.below and r.event["version"] > g.indexed:
                            found[g.case_id].append(r.event)

                await read_log(self.bootstrap, topic, {tp: lo}, {tp: hi}, take)
                wanted = {cid: g for cid, g in wanted.items()
                          if not any(e["version"] == g.indexed + 1 for e in found[cid])}
                hi, size = lo, size * 4
        return dict(found)
