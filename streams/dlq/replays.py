"""Reading ``T.dlq`` and replaying what it holds, through the tools' Kafka helper (``streams.kafka``).

* :func:`read_dead_letters` reads the DLQ of a tenant from the beginning up
  to the end offsets taken when it starts (it never waits for new records),
  keeping the records that match a filter; :func:`read_one` reads one;
* :func:`publish` sends the planned messages with ``acks=all`` and returns
  only once Kafka has acknowledged every one;
* :func:`replay` reads, plans (``streams.dlq.plans``), publishes each
  distinct message once (:func:`once`) and reports (:class:`ReplayReport`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from aiokafka import TopicPartition

from streams import kafka
from streams.config import Tenant, TopicFamily
from streams.dlq.plans import Plan, Publish, plan
from streams.dlq.records import DeadLetter, Filters, decode_value, newest_last, utc

MAX_REQUEST_BYTES = 2 * 1024 * 1024  # a 512 KiB message and headroom (as the gateway's producer)
MAX_FETCH_BYTES = 4 * 1024 * 1024    # a partition's fetch: the largest record a topic holds

REPLAY_HINT = ("Replayed messages go through the worker again as a new attempt (an id derived from the "
               "rejected one): one that is still invalid or still has no open case is dead-lettered again; "
               "replaying the same dead letters again is the same attempt and has no effect.")


# --------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------


class NotFound(LookupError):
    pass


async def _partitions(consumer, topic: str) -> list:
    tps = await kafka.partitions_of(consumer, topic)
    if not tps:
        raise RuntimeError(kafka.missing_topic(topic))
    return tps


async def read_dead_letters(bootstrap: str, topic: str, keep: Callable[[DeadLetter], bool] | None = None,
                            on_read: Callable[[int, int], None] | None = None) -> tuple[list[DeadLetter], int]:
    """The records of ``topic`` for which ``keep`` holds, and how many were read in all.

    Reads every partition from its beginning up to the end offsets taken at
    the start: records that arrive meanwhile are not waited for.
    ``on_read(n, total)`` reports progress.
    """
    async with kafka.started_consumer(bootstrap, max_partition_fetch_bytes=MAX_FETCH_BYTES) as consumer:
        tps = await _partitions(consumer, topic)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        total = sum(end[tp] - begin[tp] for tp in tps if end[tp] > begin[tp])
        found: list[DeadLetter] = []
        read = 0
        async for records in kafka.read_range(consumer, begin, end, timeout_ms=500, max_records=2000):
            for rec in records:
                dl = DeadLetter(rec.partition, rec.offset, decode_value(rec.value))
                if keep is None or keep(dl):
                    found.append(dl)
            read += len(records)
            if on_read is not None:
                on_read(read, total)
        return found, read


async def read_one(bootstrap: str, topic: str, partition: int, offset: int) -> DeadLetter:
    """The dead letter at ``partition:offset``; NotFound when there is none."""
    async with kafka.started_consumer(bootstrap, max_partition_fetch_bytes=MAX_FETCH_BYTES) as consumer:
        tps = await _partitions(consumer, topic)
        tp = TopicPartition(topic, partition)
        if tp not in tps:
            raise NotFound(f"{topic} has no partition {partition} (partitions 0-{len(tps) - 1})")
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if not begin <= offset < end:
            raise NotFound(f"no dead letter at {partition}:{offset}; partition {partition} holds offsets "
                           + (f"{begin}-{end - 1}" if end > begin else "none"))
        async for records in kafka.read_range(consumer, {tp: offset}, {tp: offset + 1}, timeout_ms=500,
                                              max_records=1):
            return DeadLetter(records[0].partition, records[0].offset, decode_value(records[0].value))
        raise NotFound(f"no dead letter at {partition}:{offset} (not a data record)")


async def publish(bootstrap: str, messages: list[tuple],
                  on_acked: Callable[[int], None] | None = None) -> int:
    """Send ``(topic, key, value[, headers])`` in order with acks=all; return once every one is acknowledged.

    Messages of one key go to one partition in the order given. Raises on
    the first failure (nothing after it may be assumed to have been written).
    """
    if not messages:
        return 0
    placed = await kafka.publish(bootstrap, messages, on_acked=on_acked, linger_ms=5,
                                 max_request_size=MAX_REQUEST_BYTES)
    return len(placed)


# --------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------


@dataclass
class Item:
    """One dead letter in a replay: what was (or would be) published, or why not."""

    dead_letter: DeadLetter
    plan: Plan

    def as_json(self, family: TopicFamily) -> dict:
        dl = self.dead_letter
        out = {"dlq": dl.ref, "reason": dl.reason, "source": dl.source.get("topic"),
               "dead_lettered_at": utc(dl.dead_lettered_at)}
        if self.plan.skip is not None:
            out["skipped"] = self.plan.skip
        else:
            out["published"] = [{"topic": family.name(p.role), "key": p.key.decode("utf-8", "replace")
                                 if p.key is not None else None, "bytes": len(p.value)}
                                for p in self.plan.publish]
        return out


@dataclass
class ReplayReport:
    tenant: str
    dry_run: bool
    read: int = 0                 # dead letters read from the DLQ
    items: list[Item] = field(default_factory=list)
    published: int = 0            # messages acknowledged by Kafka (0 on a dry run)

    @property
    def skipped(self) -> list[Item]:
        return [i for i in self.items if i.plan.skip is not None]

    @property
    def replayed(self) -> list[Item]:
        return [i for i in self.items if i.plan.skip is None]

    def messages(self, family: TopicFamily) -> list[tuple[str, bytes | None, bytes, tuple]]:
        """``(topic, key, value, headers)`` of every message to publish, in order."""
        return [(family.name(p.role), p.key, p.value, p.headers) for i in self.replayed for p in i.plan.publish]

    def by_topic(self, family: TopicFamily) -> dict[str, int]:
        counts: dict[str, int] = {}
        for topic, *_ in self.messages(family):
            counts[topic] = counts.get(topic, 0) + 1
        return counts

    def skip_reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in self.skipped:
            counts[i.plan.skip] = counts.get(i.plan.skip, 0) + 1
        return counts

    def as_json(self, family: TopicFamily) -> dict:
        return {"tenant": self.tenant, "dry_run": self.dry_run, "read": self.read,
                "matched": len(self.items), "dead_letters_replayed": len(self.replayed),
                "messages": sum(len(i.plan.publish) for i in self.replayed),
                "published": self.published, "by_topic": self.by_topic(family),
                "skipped": len(self.skipped), "skip_reasons": self.skip_reasons(),
                "items": [i.as_json(family) for i in self.items], "hint": REPLAY_HINT}


def once(items: list[Item]) -> list[Item]:
    """Each distinct message published once per replay.

    A dead letter that was replayed and rejected again sits in the DLQ twice
    with the same original; publishing it twice would only dead-letter it
    twice more (or be ignored by the worker as the same event id).
    """
    first: dict[Publish, str] = {}
    out = []
    for item in items:
        keep = tuple(p for p in item.plan.publish if p not in first)
        if item.plan.publish and not keep:
            ref = first[item.plan.publish[0]]
            item = Item(item.dead_letter, Plan(skip=f"the same message as dead letter {ref} (published once)"))
        elif len(keep) < len(item.plan.publish):
            item = Item(item.dead_letter, Plan(publish=keep))
        for p in keep:
            first[p] = item.dead_letter.ref
        out.append(item)
    return out


async def replay(bootstrap: str, tenant: Tenant, family: TopicFamily, filters: Filters, *,
                 dry_run: bool = False, gateway_options: dict | None = None,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None) -> ReplayReport:
    """Re-publish the dead letters that match ``filters``, oldest first.

    ``progress(label, total)`` returns a callback advanced by each acknowledged
    message (the CLI draws a bar with it on a terminal).
    """
    found, read = await read_dead_letters(bootstrap, family.name("dlq"), filters)
    report = ReplayReport(tenant.name, dry_run, read=read)
    report.items = once([Item(dl, plan(dl.record, tenant, family, gateway_options, dl.ref))
                         for dl in newest_last(found)])
    messages = report.messages(family)
    if dry_run or not messages:
        return report
    advance = progress("replaying", len(messages)) if progress is not None else None
    report.published = await publish(bootstrap, messages, advance)
    return report

