"""Dead letters: inspect ``T.dlq`` and replay what it holds.

``casestream dlq list|show|replay`` (``streams/cli.py``) is a thin shell over
this module:

* :func:`read_dead_letters` reads the DLQ of a tenant from the beginning up
  to the end offsets taken when it starts (it never waits for new records),
  keeping the records that match a :class:`Filters`;
* :func:`plan` decides, as a pure function of one dead letter, what replaying
  it publishes -- ``[(topic role, key, value bytes), ...]`` -- or why it is
  skipped;
* :func:`publish` sends the planned messages with ``acks=all`` and returns
  only once Kafka has acknowledged every one.

How a dead letter is replayed depends on where it came from (``source.topic``):

* ``T.intake`` (the route agent's rejections: invalid_json, invalid_event,
  too_large) and ``T.intake-routed`` (the apply agent's rejections:
  no_open_case, invalid_transition, unknown_case; and processing_error):
  the original bytes go back to ``T.intake``, keyed by dedup key (or case id)
  as ``casestream send`` keys them;
* ``T.timers`` (processing_error of a due timer): the timer JSON goes back to
  ``T.timers``, keyed by the routing token of its dedup key (as the timer
  scheduler sends it);
* ``gateway:<kind>`` (rate_limited): the monitor's body is translated again
  (``streams.domain.monitors.translate``) and each resulting message goes to
  ``T.intake`` -- byte for byte what the gateway would have published;
* ``T.domain-events`` (projection_rejected: a document the search index
  refused) is skipped with what to do instead: the event is still in the
  log, so the fix is a rebuild (``casestream reindex``), not a re-publish;
* a record without ``original`` is skipped, and so is a message already
  published by the same replay (a dead letter replayed and rejected again
  sits in the DLQ twice with the same original).

Replay is idempotent: the bytes are republished unchanged, and a replayed
intake message is a new attempt with an id of its own, derived from the id
the rejected record had (``casestream-event-id`` header; it wins over an
explicit ``event_id``): the rejection, remembered under the original id,
does not swallow it, and replaying the same dead letter again is the same
attempt. A rate-limited body's messages keep the translators' ids (they were
never applied) and get one per dead letter and position where they have
none; a timer's id derives from its timer id. Replaying the same dead
letters twice has no second effect.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import orjson

from streams.config import Tenant, TopicFamily
from streams.domain.intake import EVENT_ID_HEADER, REASONS, derive_id, routing_token

INTAKE, TIMERS, NOTIFICATIONS = "intake", "timers", "notifications"
GATEWAY_PREFIX = "gateway:"
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # a 512 KiB message and headroom (as the gateway's producer)

REPLAY_HINT = ("Replayed messages go through the worker again as a new attempt (an id derived from the "
               "rejected one): one that is still invalid or still has no open case is dead-lettered again; "
               "replaying the same dead letters again is the same attempt and has no effect.")


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One record of ``T.dlq``: where it sits and its decoded JSON."""

    partition: int
    offset: int
    record: dict

    @property
    def ref(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def reason(self) -> str | None:
        return self.record.get("reason")

    @property
    def dead_lettered_at(self) -> int:
        at = self.record.get("dead_lettered_at")
        return at if isinstance(at, int) else 0

    @property
    def source(self) -> dict:
        src = self.record.get("source")
        return src if isinstance(src, dict) else {}

    def as_json(self) -> dict:
        """The decoded record plus where it sits in the DLQ."""
        return dict(self.record, dlq_partition=self.partition, dlq_offset=self.offset)


def decode_value(value: bytes | None) -> dict:
    """A DLQ record's value as a dict (a marker dict when it is not a JSON object)."""
    try:
        rec = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return {"undecodable": "not JSON"}
    return rec if isinstance(rec, dict) else {"undecodable": "not a JSON object"}


def original_bytes(record: dict) -> bytes | None:
    """The original message bytes (base64-decoded when needed); None when not kept.

    Raises ValueError for an original that is not valid base64 or an unknown encoding.
    """
    original = record.get("original")
    if original is None:
        return None
    if not isinstance(original, str):
        raise ValueError("'original' is not a string")
    encoding = record.get("original_encoding") or "utf-8"
    if encoding == "utf-8":
        return original.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(original, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("'original' is not valid base64") from None
    raise ValueError(f"unknown original_encoding {encoding!r}")


def original_text(record: dict) -> str | None:
    """The original as text for people: UTF-8 as is, other bytes as \\xNN escapes."""
    try:
        raw = original_bytes(record)
    except ValueError:
        original = record.get("original")
        return original if isinstance(original, str) else None
    return None if raw is None else raw.decode("utf-8", errors="backslashreplace")


def utc(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def describe_source(source: dict) -> str:
    topic = source.get("topic") or "-"
    if str(topic).startswith(GATEWAY_PREFIX) or source.get("partition", -1) < 0:
        return str(topic)
    return f"{topic}:{source.get('partition')}@{source.get('offset')}"


def parse_ref(text: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` -> (partition, offset); ValueError when malformed."""
    p, sep, o = (text or "").strip().partition(":")
    if not sep or not p.isdigit() or not o.isdigit():
        raise ValueError(f"a dead letter is named PARTITION:OFFSET (as 'dlq list' shows it), e.g. 3:42; got {text!r}")
    return int(p), int(o)


def parse_time(text: str) -> int:
    """RFC 3339 (with an offset) -> epoch milliseconds; ValueError otherwise."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"an RFC 3339 time, e.g. 2026-11-24T10:00:00Z, got {text!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"a time zone offset is needed (Z or +hh:mm), got {text!r}")
    return int(dt.timestamp() * 1000)


# --------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Which dead letters a command is about (every given condition must hold)."""

    reasons: frozenset[str] | None = None  # None: any reason
    since_ms: int | None = None            # dead_lettered_at >= since
    match: str | None = None               # substring of the original text

    def __post_init__(self) -> None:
        unknown = sorted(set(self.reasons or ()) - set(REASONS))
        if unknown:
            raise ValueError(f"unknown reason(s) {', '.join(unknown)}; use {', '.join(REASONS)}")

    def __call__(self, dl: DeadLetter) -> bool:
        if self.reasons is not None and dl.reason not in self.reasons:
            return False
        if self.since_ms is not None and dl.dead_lettered_at < self.since_ms:
            return False
        if self.match is not None and self.match not in (original_text(dl.record) or ""):
            return False
        return True


def newest_last(items: list[DeadLetter], limit: int | None = None) -> list[DeadLetter]:
    """In dead-lettering order (time, then DLQ position); the last ``limit`` (None or 0: all)."""
    items = sorted(items, key=lambda d: (d.dead_lettered_at, d.partition, d.offset))
    return items[-limit:] if limit else items


# --------------------------------------------------------------------------
# the replay plan (pure)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    role: str          # topic role in the tenant's family: "intake" or "timers"
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Plan:
    """What replaying one dead letter does: messages to publish, or why nothing."""

    publish: tuple[Publish, ...] = ()
    skip: str | None = None


def _skip(why: str) -> Plan:
    return Plan(skip=why)


def intake_key(raw: bytes, tenant: Tenant) -> bytes | None:
    """The Kafka key ``casestream send`` gives an intake line (its routing token; None when invalid)."""
    from streams.cli import message_key

    return message_key(raw, tenant)[0]


def source_kind(record: dict, family: TopicFamily) -> str | None:
    """``intake``, ``intake-routed``, ``timers``, ``notifications``, ``gateway:<kind>``; None when unknown."""
    topic = (record.get("source") or {}).get("topic") if isinstance(record.get("source"), dict) else None
    if not isinstance(topic, str):
        return None
    if topic.startswith(GATEWAY_PREFIX):
        return topic
    for role in ("intake", "intake-routed", "timers", "notifications", "domain-events"):
        if topic == family.name(role):
            return role
    return None


def _unwrap_envelope(raw: bytes) -> bytes:
    """A processing_error whose routed envelope was kept whole: its intake message."""
    try:
        env = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if isinstance(env, dict) and "intake" in env and isinstance(env.get("original"), str):
        return env["original"].encode("utf-8")
    return raw


def _explicit_event_id(raw: bytes) -> str | None:
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    eid = msg.get("event_id") if isinstance(msg, dict) else None
    return eid if isinstance(eid, str) and eid.strip() else None


def _identity(event_id: str) -> tuple[tuple[str, bytes], ...]:
    return ((EVENT_ID_HEADER, event_id.encode("utf-8")),)


def plan(record: dict, tenant: Tenant, family: TopicFamily, gateway_options: dict | None = None,
         ref: str | None = None) -> Plan:
    """What replaying the dead letter ``record`` publishes (pure: no I/O).

    ``gateway_options`` are the translation options of rate-limited gateway
    bodies (``{"dedup_by": "group"}`` for an Alertmanager/Grafana integration
    created with that option; the dead letter does not record them).
    ``ref``: where the dead letter sits (``PARTITION:OFFSET``), the identity of
    the messages a rate-limited gateway body translates to.

    Intake messages keep their identity: an explicit ``event_id`` travels in
    the bytes; otherwise the ``EVENT_ID_HEADER`` carries the id the rejected
    record had (``event_id`` of the dead letter; for a dead letter written
    before it recorded one, the id then derived from the bytes).
    """
    if "undecodable" in record:
        return _skip(f"the dead letter itself is {record['undecodable']}")
    kind = source_kind(record, family)
    if kind == "domain-events":  # projection_rejected: the event is still in the log; re-publishing adds nothing
        return _skip("a projection refused this domain event; fix the cause, then rebuild the projection "
                     f"(casestream reindex --tenant {tenant.name}, or casestream replay --from-beginning)")
    if kind is None:
        topic = (record.get("source") or {}).get("topic") if isinstance(record.get("source"), dict) else None
        return _skip(f"unknown source topic {topic!r}: cannot tell where to replay it")
    try:
        raw = original_bytes(record)
    except ValueError as exc:
        return _skip(f"the original cannot be decoded: {exc}")
    if raw is None:
        return _skip("no original was kept (null)")
    if kind in ("intake", "intake-routed"):
        if kind == "intake-routed":
            raw = _unwrap_envelope(raw)
        original = record.get("event_id")
        if not isinstance(original, str) or not original:  # a dead letter written before it kept the id
            original = _explicit_event_id(raw) or derive_id("intake", raw)
        # a replay is a new attempt, decided again (the rejection was remembered under the original
        # id), with an id of its own derived from the original: replaying twice is one attempt
        return Plan(publish=(Publish(INTAKE, intake_key(raw, tenant), raw,
                                     _identity(derive_id("replay", original))),))
    if kind == "timers":
        try:
            timer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _skip("the original is not a timer (not JSON)")
        if not isinstance(timer, dict) or not isinstance(timer.get("dedup_key"), str) or not timer["dedup_key"]:
            return _skip("the original is not a timer (no 'dedup_key')")
        return Plan(publish=(Publish(TIMERS, routing_token(timer["dedup_key"]).encode(), raw),))
    if kind == "notifications":
        # a failed delivery: ask the delivery agent to try it again (same delivery id, so receivers
        # still deduplicate; a delivery that is pending or delivered ignores it)
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _skip("the original is not a delivery request (not JSON)")
        if not isinstance(request, dict) or not isinstance(request.get("delivery_id"), str):
            return _skip("the original is not a delivery request (no 'delivery_id')")
        if record.get("reason") != "notification_failed":  # a record the delivery agent could not handle
            return Plan(publish=(Publish(NOTIFICATIONS, request["delivery_id"].encode(), raw),))
        retry = orjson.dumps(dict(request, kind="retry"))
        return Plan(publish=(Publish(NOTIFICATIONS, request["delivery_id"].encode(), retry),))
    # gateway:<kind>: what the gateway would have published had it not been rate limited
    from streams.domain.monitors import PayloadError, translate

    monitor = kind[len(GATEWAY_PREFIX):]
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _skip(f"the {monitor} body is not JSON: {exc}")
    try:
        messages = translate(monitor, body, gateway_options)
    except PayloadError as exc:
        return _skip(f"the {monitor} body does not translate: {exc}")
    except ValueError as exc:  # unknown kind, bad options
        return _skip(f"cannot translate: {exc}")
    if not messages:
        return _skip(f"the {monitor} body translates to no intake message")
    out = []
    for i, msg in enumerate(messages):
        value = orjson.dumps(msg)  # the gateway's own encoding: derived ids match
        # a message without its own id (a canonical event, a PagerDuty trigger): one per dead
        # letter and position, so replaying the dead letter twice has no second effect
        headers = _identity(derive_id("dlq-replay", family.name("dlq"), ref, str(i))) \
            if ref and "event_id" not in msg else ()  # the translators' own ids stay (never applied)
        out.append(Publish(INTAKE, intake_key(value, tenant), value, headers))
    return Plan(publish=tuple(out))


# --------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------


class NotFound(LookupError):
    pass


async def _consumer(bootstrap: str, topic: str):
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        from streams.kafka import topic_partitions

        parts = await topic_partitions(consumer._client, topic)
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist; run 'casestream topics create'")
    except BaseException:
        from streams.kafka import stop_consumer

        await stop_consumer(consumer)
        raise
    return consumer, [TopicPartition(topic, p) for p in sorted(parts)]


async def read_dead_letters(bootstrap: str, topic: str, keep: Callable[[DeadLetter], bool] | None = None,
                            on_read: Callable[[int, int], None] | None = None) -> tuple[list[DeadLetter], int]:
    """The records of ``topic`` for which ``keep`` holds, and how many were read in all.

    Reads every partition from its beginning up to the end offsets taken at
    the start: records that arrive meanwhile are not waited for.
    ``on_read(n, total)`` reports progress.
    """
    from streams.kafka import stop_consumer

    consumer, tps = await _consumer(bootstrap, topic)
    try:
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        todo = [tp for tp in tps if end[tp] > begin[tp]]
        total = sum(end[tp] - begin[tp] for tp in todo)
        found: list[DeadLetter] = []
        read = 0
        if not todo:
            return found, 0
        consumer.assign(todo)
        for tp in todo:
            consumer.seek(tp, begin[tp])
        remaining = set(todo)
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=2000)
            n = 0
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset >= end[tp]:
                        remaining.discard(tp)
                        break
                    n += 1
                    dl = DeadLetter(rec.partition, rec.offset, decode_value(rec.value))
                    if keep is None or keep(dl):
                        found.append(dl)
                    if rec.offset + 1 >= end[tp]:
                        remaining.discard(tp)
            for tp in list(remaining):  # gaps (compaction, transaction markers) end a partition too
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            read += n
            if on_read is not None and n:
                on_read(read, total)
        return found, read
    finally:
        await stop_consumer(consumer)


async def read_one(bootstrap: str, topic: str, partition: int, offset: int) -> DeadLetter:
    """The dead letter at ``partition:offset``; NotFound when there is none."""
    from aiokafka import TopicPartition

    from streams.kafka import stop_consumer

    consumer, tps = await _consumer(bootstrap, topic)
    try:
        tp = TopicPartition(topic, partition)
        if tp not in tps:
            raise NotFound(f"{topic} has no partition {partition} (partitions 0-{len(tps) - 1})")
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if not begin <= offset < end:
            raise NotFound(f"no dead letter at {partition}:{offset}; partition {partition} holds offsets "
                           + (f"{begin}-{end - 1}" if end > begin else "none"))
        consumer.assign([tp])
        consumer.seek(tp, offset)
        while True:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=1)
            for rec in batch.get(tp, ()):
                if rec.offset == offset:
                    return DeadLetter(rec.partition, rec.offset, decode_value(rec.value))
                raise NotFound(f"no dead letter at {partition}:{offset} (not a data record)")
            if await consumer.position(tp) > offset:
                raise NotFound(f"no dead letter at {partition}:{offset} (not a data record)")
    finally:
        await stop_consumer(consumer)


async def publish(bootstrap: str, messages: list[tuple],
                  on_acked: Callable[[int], None] | None = None) -> int:
    """Send ``(topic, key, value[, headers])`` in order with acks=all; return once every one is acknowledged.

    Messages of one key go to one partition in the order given. Raises on
    the first failure (nothing after it may be assumed to have been written).
    """
    from aiokafka import AIOKafkaProducer

    if not messages:
        return 0
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=MAX_REQUEST_BYTES)
    await producer.start()
    try:
        futures = [await producer.send(m[0], m[2], key=m[1], headers=list(m[3]) if len(m) > 3 and m[3] else None)
                   for m in messages]
        for fut in futures:
            await fut
            if on_acked is not None:
                on_acked(1)
        return len(futures)
    finally:
        await producer.stop()


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

