"""Intake agents: route, then apply. Thin shells over ``streams.domain``.

``route`` (stateless, any key) parses and validates each ``T.intake``
message; bad input goes to ``T.dlq`` with a reason, good input is re-keyed
by its routing token (a hash of the dedup key, also embedded in case ids) to
``T.intake-routed``, so everything about one dedup key and its cases is
processed by one partition, in order.

``apply_cases`` (stateful) looks up the dedup key's entry in the RocksDB
table, asks ``streams.domain.cases.decide`` what to do, sends the domain
events (Avro, keyed by case id) or the dead letter, and stores the new
entry. Crash safety under Faust's at-least-once delivery:

* everything a decision reads is one table entry (per dedup key), written
  whole (once per batch, with the key's last state), so lost changelog
  records can only roll an entry back to an earlier state of its own --
  never mix states of two writes;
* outputs and table writes are buffered (``send_soon``); Faust flushes the
  producer before it commits an offset, so a committed offset implies its
  outputs and changelog records were acknowledged;
* outputs are deterministic (ids, versions and case ids derive from the
  intake id), so a redelivered message that was not yet recorded produces
  byte-identical events;
* a message whose id is already in the key state has no second effect. When
  it is Kafka redelivering the very record that applied it (same offset: a
  crash came before the commit), its recorded outputs are re-sent verbatim
  and the state rewritten, in case the crash lost them after the local
  store had them; a message merely sent twice produces nothing.
Consumers deduplicate by ``event_id`` or ``(case_id, version)``.

``apply_cases`` also reads ``T.timers`` (due timers sent by
``agents/timers.py``, keyed like the routed intake): ``decide_timer`` fires
a timer only while the entry still holds it, and the same redelivery rules
apply (its input id derives from the timer id). The ``timers`` table -- the
index the scheduler scans -- is kept in step with each written entry's
pending timers. The decisions use the tenant's on-call configuration as it
is when the batch starts (``streams/oncall_config.py``).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
import weakref

import orjson

import schemas
from streams import metrics, store
from streams.app import Topology, _raw_topic
from streams.config import MAX_RECORD_BYTES
from streams.domain import cases as domain
from streams.domain import notify as notifying
from streams.domain import oncall as paging
from streams.domain.relay import route_events
from streams.domain.intake import (
    EVENT_ID_HEADER, PROCESSING_ERROR, UNKNOWN_CASE, Intake, Rejection, parse, record_event_id, routing_key,
)

log = logging.getLogger("casestream.intake")

APPLY_BATCH = 500      # routed messages per apply batch
APPLY_WITHIN = 0.02    # seconds to wait for a batch to fill

DOMAIN = "domain-events"
DLQ = "dlq"
RELAY = "relay"
NOTIFY = "notify"
ROUTED = "intake-routed"


def dead_letter(rejection: Rejection, topic: str, partition: int, offset: int, raw: bytes | None,
                event_id: str | None = None) -> dict:
    """The DLQ record: reason, detail, where it came from, the original, and the
    intake message's identity (``event_id``: explicit or its record's; a replay keeps it)."""
    record = {
        "reason": rejection.reason,
        "detail": rejection.detail,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "original": None,
        "original_encoding": "utf-8",
        "dead_lettered_at": None,
    }
    if event_id is not None:
        record["event_id"] = event_id
    if raw is not None:
        record["original"], record["original_encoding"] = kept_original(raw)
        if record["original"] is None:
            record["detail"] += f" (the original, {len(raw)} bytes, is too large to keep)"
    return record


MAX_ORIGINAL = MAX_RECORD_BYTES - 64 * 1024   # a dead letter's original, encoded; the rest is its other fields


def kept_original(raw: bytes) -> tuple[str | None, str]:
    """``(original, original_encoding)`` of a dead letter: the text when it is UTF-8 and JSON does not
    escape it to more than base64 takes (a control character escapes to six bytes), else base64; no
    original when even the shorter would not fit in a record the worker can write (MAX_RECORD_BYTES)."""
    b64_size = 4 * ((len(raw) + 2) // 3)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    text_size = len(orjson.dumps(text)) - 2 if text is not None else b64_size + 1
    if min(text_size, b64_size) > MAX_ORIGINAL:
        return None, "utf-8"
    if text_size <= b64_size:
        return text, "utf-8"
    return base64.b64encode(raw).decode(), "base64"


def _headers(event: dict) -> list[tuple[str, bytes]]:
    return [("event_type", event["type"].encode()), ("tenant", event["tenant"].encode()),
            ("case_id", event["case_id"].encode()), ("event_id", event["event_id"].encode())]


def write_in_context(table, event, key: str, value: bytes | None) -> None:
    """``table[key] = value`` (``del table[key]`` for None) as if during ``event``'s iteration.

    Faust writes a table key to the changelog partition of the current
    event; a batch sets that context per key (the key's last event, which is
    in the key's partition) instead of writing once per event.
    """
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        if value is None:
            del table[key]
        else:
            table[key] = value
    finally:
        _current_event.reset(token)


def producer_topics(topo: Topology, subscriptions=()) -> list[str]:
    """Every topic the worker writes to: its family's, its tables' changelogs, the relay topics."""
    names = [spec.name for spec in topo.family.all_topics()]
    names += [t.changelog_topic.get_topic_name() for t in topo.app.tables.values()]
    return sorted(set(names) | {topo.family.relay(s).name for s in subscriptions})


async def track_topics(topo: Topology, subscriptions=()) -> bool:
    """The worker's producer keeps metadata for every topic it writes to (``streams.kafka.track_producer_topics``)."""
    from streams.kafka import track_producer_topics

    producer = getattr(topo.app.producer, "_producer", None)
    try:
        return await track_producer_topics(producer, producer_topics(topo, subscriptions))
    except Exception as exc:  # tried again before the next new topic
        log.warning("producer metadata for the worker's topics not updated yet: %r", exc)
        return False


async def ensure_relay_topics(topo: Topology) -> None:
    """Create the relay topics of newly configured subscriptions; a
    subscription relays from the moment its topic exists (no backfill: replay
    the domain-event log for history). The producer tracks every topic the
    worker writes to before the first send to a new one (``track_topics``)."""
    wanted = {s.id for s in topo.oncall.current.subscriptions} if topo.oncall is not None else set()
    if not topo.producer_tracked:
        topo.producer_tracked = await track_topics(topo, topo.relay_ready)
    missing = wanted - topo.relay_ready
    if not missing or time.monotonic() < topo.relay_retry_at:
        return
    from streams.kafka import create_topics

    try:
        await create_topics(topo.bootstrap, [], extra=[topo.family.relay(s) for s in sorted(missing)])
        if not await track_topics(topo, topo.relay_ready | missing):
            raise RuntimeError("the producer does not track the new topics yet")
    except Exception as exc:  # retried after a pause (those events are not relayed meanwhile)
        topo.relay_retry_at = time.monotonic() + 10
        log.warning("relay topics %s not created yet (retry in 10 s): %r", sorted(missing), exc)
        return
    topo.relay_ready |= missing
    log.info("relay: subscriptions %s active (topics %s)", sorted(missing),
             [topo.family.relay(s).name for s in sorted(missing)])


def header_value(headers, name: str) -> bytes | None:
    """A Kafka header's value (Faust gives headers as a list of pairs or a mapping)."""
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if k == name:
            return v
    return None


def header_identity(headers) -> str | None:
    """The identity an ``EVENT_ID_HEADER`` gives a record (a dlq replay), if any."""
    given = header_value(headers, EVENT_ID_HEADER)
    if given:
        try:
            return given.decode("utf-8") or None
        except UnicodeDecodeError:
            pass
    return None


def record_identity(topic: str, partition: int, offset: int, headers=None) -> str:
    """The identity of an intake record: the one its ``EVENT_ID_HEADER`` names
    (a replay; it wins over the message's own ``event_id``), else, for a message
    without ``event_id``, its own coordinates."""
    return header_identity(headers) or record_event_id(topic, partition, offset)


def route_message(tenant, topic: str, partition: int, offset: int, timestamp_ms: int,
                  key: bytes | None, raw: bytes | None, headers=None) -> tuple[str, bytes | None, dict]:
    """Where one intake record goes: ("routed", routing key, envelope) or ("dlq", key, dead letter)."""
    record_id = record_identity(topic, partition, offset, headers)
    result = parse(raw, tenant, timestamp_ms, record_id)
    if isinstance(result, Intake) and header_identity(headers) and result.event_id != record_id:
        result = dataclasses.replace(result, event_id=record_id)  # a replay: a new attempt of its own
    if isinstance(result, Rejection):
        return DLQ, key, dead_letter(result, topic, partition, offset, raw, record_id)
    rkey = routing_key(result, tenant)
    if rkey is None:
        rej = Rejection(UNKNOWN_CASE, f"case id {result.case_id!r} is not a {tenant.name} case id")
        return DLQ, key, dead_letter(rej, topic, partition, offset, raw, result.event_id)
    envelope = {
        "intake": result.to_dict(),
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "original": raw.decode("utf-8"),  # parsed as JSON, so valid UTF-8
    }
    return ROUTED, rkey.encode(), envelope


class UnflushedOutputs:
    """Inputs applied per dedup key since the apply agent last flushed the producer itself.

    A key's stored state can re-send the outputs of its last ``limit`` inputs
    only (``cases.RECENT_LIMIT``; fewer when they are large, ``cases.RECENT_BYTES``):
    that is what a redelivery after a crash re-sends. A crash after a state is
    written (the local store) and before the producer has sent the outputs
    would lose, for good, those of older inputs the
    state no longer keeps. So before writing states that would forget outputs
    not known to be sent, the agent flushes: ``add`` says when."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.kept: dict[str, int] = {}

    def add(self, applied: dict[str, int], kept: dict[str, int] | None = None) -> bool:
        """Count a batch's inputs per key (``kept``: of how many inputs each key's new state keeps the
        outputs, when fewer than ``limit``); True: flush before writing its states."""
        for key, n in applied.items():
            if n > 0:
                self.counts[key] = self.counts.get(key, 0) + n
        self.kept.update(kept or {})
        return any(n > self.kept.get(key, self.limit) for key, n in self.counts.items())

    def clear(self) -> None:
        self.counts.clear()
        self.kept.clear()


def register(topo: Topology) -> None:
    app, tenant = topo.app, topo.tenant
    tname = tenant.name

    def send_dlq(key: bytes | None, record: dict) -> None:
        record = dict(record, dead_lettered_at=int(time.time() * 1000))
        topo.dlq.send_soon(key=key, value=orjson.dumps(record))
        metrics.DLQ_MESSAGES.labels(tname, record["reason"]).inc()

    relay_topics: dict[str, object] = {}

    def relay_topic(sub_id: str):
        if sub_id not in relay_topics:
            relay_topics[sub_id] = _raw_topic(app, topo.family.relay(sub_id).name)
        return relay_topics[sub_id]

    def send_outputs(outputs: list) -> None:
        encoded: dict[int, bytes] = {}
        for i, (kind, key, value) in enumerate(outputs):
            if kind == DOMAIN:
                encoded[i] = schemas.encode(value)
                topo.domain_events.send_soon(key=key.encode(), value=encoded[i], headers=_headers(value))
                metrics.DOMAIN_EVENTS.labels(tname, value["type"]).inc()
            elif kind == NOTIFY:
                # a delivery request; the event travels with it (it is not kept twice in the state)
                request = dict(value, event=outputs[value["ref"]][2])
                topo.notifications_topic.send_soon(key=key.encode(), value=orjson.dumps(request))
            elif kind == RELAY:
                # {"format", "ref"}: a copy of the domain event at index ref, for subscription ``key``
                event = outputs[value["ref"]][2]
                if value["format"] == "avro":
                    body = encoded.get(value["ref"]) or schemas.encode(event)
                    headers = _headers(event) + [("schema_id", str(schemas.schema_id(body)).encode())]
                else:
                    body, headers = orjson.dumps(event), _headers(event)
                relay_topic(key).send_soon(key=event["case_id"].encode(), value=body, headers=headers)
                metrics.RELAYED.labels(tname, key).inc()
            else:
                send_dlq(key.encode() if key else None, value)

    def domain_events_of(outputs: list, before_entry: dict | None) -> tuple[list, dict]:
        """(index in outputs, event) of the domain events, and their cases' states before them."""
        events = [(i, o[2]) for i, o in enumerate(outputs) if o[0] == DOMAIN]
        cases = (before_entry or {}).get("cases", {})
        return events, {e["case_id"]: cases.get(e["case_id"]) for _, e in events}

    def with_relay(cfg, before_entry: dict | None, outputs: list) -> list:
        """``outputs`` plus a RELAY output per (subscription, event) match, in event order."""
        subs = [s for s in cfg.subscriptions if s.id in topo.relay_ready]
        if not subs:
            return outputs
        events, before = domain_events_of(outputs, before_entry)
        index = {id(e): i for i, e in events}
        extra = [[RELAY, sub.id, {"format": sub.format, "ref": index[id(e)]}]
                 for sub, e in route_events(tenant, subs, before, [e for _, e in events])]
        return outputs + extra

    def with_deliveries(cfg, before_entry: dict | None, outputs: list) -> list:
        """``outputs`` plus a NOTIFY output per delivery the events ask for (webhooks, Slack)."""
        events, before = domain_events_of(outputs, before_entry)
        extra = []
        for r in notifying.deliveries(tenant, cfg, before, [e for _, e in events]):
            ref = events[r["event_index"]][0]  # the domain event's place in ``outputs``
            extra.append([NOTIFY, r["delivery_id"], {k: v for k, v in r.items() if k != "event_index"} | {"ref": ref}])
        return outputs + extra

    def outputs_of(cfg, before_entry: dict | None, events: list[dict]) -> list:
        return with_deliveries(cfg, before_entry, with_relay(cfg, before_entry,
                                                             [[DOMAIN, e["case_id"], e] for e in events]))

    @app.timer(interval=1.0, name=f"{topo.family.app_id}.producer_topics")
    async def track_producer_topics():
        if not topo.producer_tracked:  # once, as soon as the producer runs (see ensure_relay_topics)
            topo.producer_tracked = await track_topics(topo, topo.relay_ready)

    @app.agent(topo.intake, name=f"{topo.family.app_id}.route")
    async def route(stream):
        async for events in stream.take_events(APPLY_BATCH, within=APPLY_WITHIN):
            for event in events:
                msg = event.message
                kind, key, value = route_message(tenant, msg.topic, msg.partition, msg.offset,
                                                 int(msg.timestamp * 1000), msg.key, event.value, msg.headers)
                if kind == ROUTED:
                    topo.routed.send_soon(key=key, value=orjson.dumps(value))
                    metrics.INTAKE_MESSAGES.labels(tname, "routed").inc()
                else:
                    send_dlq(key, value)
                    metrics.INTAKE_MESSAGES.labels(tname, "rejected").inc()

    def get_entry(key: str) -> dict | None:
        raw = topo.keys.get(key)
        return orjson.loads(raw) if raw is not None else None

    def get_index(case_id: str) -> str | None:
        raw = topo.case_keys.get(case_id)
        return raw.decode() if raw is not None else None

    def get_timers(entry: dict | None) -> dict[str, dict]:
        return paging.pending_timers(entry)

    # the apply agent reads routed intake and due timers: both keyed by the
    # routing token, so a case's timers arrive in its own partition
    applied = app.topic(topo.family.name("intake-routed"), topo.family.name("timers"), key_type=bytes,
                        value_type=bytes, key_serializer="raw", value_serializer="raw", internal=False)
    timers_name = topo.family.name("timers")

    unflushed = UnflushedOutputs(domain.RECENT_LIMIT)

    @app.agent(applied, name=f"{topo.family.app_id}.apply")
    async def apply_cases(stream):
        # Batches: entries are read once and written once per batch (the last
        # state of each key), with the partition context of the key's last
        # event, as Faust requires for table writes. Events are acked by
        # take_events only after the batch has been handled.
        async for events in stream.take_events(APPLY_BATCH, within=APPLY_WITHIN):
            started = time.perf_counter()
            cfg = topo.oncall.current  # one configuration per batch
            if any(sub.id not in topo.relay_ready for sub in cfg.subscriptions):
                await ensure_relay_topics(topo)  # no event of a subscription is applied before its topic exists
            cache: dict[str, dict | None] = {}
            before: dict[str, dict] = {}      # dedup key -> pending timers as stored
            dirty: dict[str, tuple] = {}      # dedup key -> (event, entry)
            new_index: dict[str, tuple] = {}  # case id -> (event, dedup key)
            stale: dict[str, object] = {}     # timer ids fired or cancelled -> event

            applied_before: dict[str, int] = {}  # dedup key -> its "applied" count as stored

            def entry_of(key: str) -> dict | None:
                if key not in cache:
                    cache[key] = get_entry(key)
                    before[key] = get_timers(cache[key])
                    applied_before[key] = (cache[key] or {}).get("applied", 0)
                return cache[key]

            def index_of(case_id: str) -> str | None:
                return new_index[case_id][1] if case_id in new_index else get_index(case_id)

            for event in events:
                try:
                    if event.message.topic == timers_name:
                        fire_one(event, cfg, entry_of, cache, dirty, stale, before)
                    else:
                        apply_one(event, cfg, entry_of, index_of, cache, dirty, new_index, before)
                except Exception as exc:  # a bug must not stop the partition or lose the record
                    failed(event, exc)
            if unflushed.add({key: entry.get("applied", 0) - applied_before.get(key, 0)
                              for key, (_event, entry) in dirty.items()},
                             {key: len(entry["recent"]) for key, (_event, entry) in dirty.items()}):
                await app.producer.flush()  # before a state that re-sends fewer inputs' outputs is written
                unflushed.clear()
            for key, (event, entry) in dirty.items():
                # versioned: "applied" first in the bytes (streams/rebalance.py VersionedTable)
                write_in_context(topo.keys, event, key,
                                 orjson.dumps({"applied": entry.get("applied", 0), **entry}))
                sync_timers(event, before.get(key, {}), get_timers(entry), stale)
            for timer_id, event in stale.items():
                if topo.timers.get(timer_id) is not None:
                    write_in_context(topo.timers, event, timer_id, None)
            for case_id, (event, key) in new_index.items():
                write_in_context(topo.case_keys, event, case_id, key.encode())
            metrics.APPLY_SECONDS.labels(tname).observe(time.perf_counter() - started)

    def sync_timers(event, old: dict[str, dict], new: dict[str, dict], stale: dict) -> None:
        """Keep the timers index in step with an entry's pending timers."""
        for timer_id, timer in new.items():
            if old.get(timer_id) != timer:
                write_in_context(topo.timers, event, timer_id, orjson.dumps(timer))
            stale.pop(timer_id, None)
        for timer_id in old.keys() - new.keys():
            stale[timer_id] = event

    def failed(event, exc: Exception) -> None:
        """Dead-letter a record whose processing raised (state untouched: a
        replay after the fix applies it), and keep going."""
        msg = event.message
        log.exception("processing %s:%s@%s failed; dead-lettered as %s", msg.topic, msg.partition, msg.offset,
                      PROCESSING_ERROR)
        original, event_id = event.value, None
        if msg.topic != timers_name:
            try:
                env = orjson.loads(event.value)
                original = env["original"].encode("utf-8")
                event_id = env["intake"]["event_id"]
            except Exception:
                pass
        rej = Rejection(PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:2000])
        send_dlq(msg.key, dead_letter(rej, msg.topic, msg.partition, msg.offset, original, event_id))

    def observe(decision, outputs: list) -> None:
        ack = tenant.actions["acknowledge"]
        for kind, _key, value in outputs:
            if kind == DOMAIN:
                case = decision.entry["cases"].get(value["case_id"]) if decision.entry else None
                metrics.record_oncall(tname, ack, value, case)

    def fire_one(event, cfg, entry_of, cache, dirty, stale, before) -> None:
        """A due timer, or a delivery outcome (both arrive on T.timers)."""
        timer = orjson.loads(event.value)
        entry = entry_of(timer["dedup_key"])
        offset = f"timers:{event.message.offset}"
        if timer.get("kind") == "delivery":
            input_id = notifying.outcome_intake(tenant, timer).event_id
            decision = notifying.decide_outcome(tenant, timer, entry)
        else:
            input_id = paging.timer_intake(tenant, timer).event_id
            decision = paging.decide_timer(tenant, cfg, timer, entry)
        if decision.duplicate:
            if domain.is_redelivery(entry, input_id, offset):
                send_outputs(domain.recorded_outputs(entry, input_id) or [])
                dirty[entry["dedup_key"]] = (event, entry)
                before[entry["dedup_key"]] = {}  # rewrite its timers index too
            if timer.get("kind") != "delivery" and not paging.is_pending(entry, timer):
                # fired already: out of the index too (a crash may have lost that deletion, and
                # the scheduler would send it again every 30 s for ever)
                stale.setdefault(timer["timer_id"], event)
            return
        if timer.get("kind") == "delivery" and decision.entry is None:
            return  # nothing to record it on
        if decision.entry is None:  # not pending: fired already or cancelled
            if not paging.is_pending(entry, timer):
                stale.setdefault(timer["timer_id"], event)
            return
        outputs = outputs_of(cfg, entry, decision.events)
        send_outputs(outputs)
        observe(decision, outputs)
        new = domain.remember(decision.entry, input_id, outputs, offset)
        cache[new["dedup_key"]] = new
        dirty[new["dedup_key"]] = (event, new)

    def apply_one(event, cfg, entry_of, index_of, cache, dirty, new_index, before) -> None:
        env = orjson.loads(event.value)
        intake = Intake.from_dict(env["intake"])
        entry = domain.lookup(intake, entry_of, index_of)
        decision = domain.decide(tenant, intake, entry, cfg)
        if decision.duplicate:
            # Already applied: no second effect. If Kafka is redelivering the
            # very record that applied it (a crash before the commit), re-send
            # what it produced and rewrite the state, in case the crash lost
            # them after the local store had them.
            metrics.DUPLICATES.labels(tname).inc()
            if domain.is_redelivery(entry, intake.event_id, event.message.offset):
                recorded = domain.recorded_outputs(entry, intake.event_id) or []
                send_outputs(recorded)
                dirty[entry["dedup_key"]] = (event, entry)
                before[entry["dedup_key"]] = {}  # rewrite its timers index too
                for kind, _key, value in recorded:
                    if kind == DOMAIN and value["type"] == "CaseCreated":
                        new_index[value["case_id"]] = (event, entry["dedup_key"])
            return
        outputs = outputs_of(cfg, entry, decision.events)
        if decision.rejection is not None:
            src = env["source"]
            record = dead_letter(decision.rejection, src["topic"], src["partition"], src["offset"],
                                 env["original"].encode("utf-8"), intake.event_id)
            outputs.append([DLQ, intake.dedup_key or intake.case_id, record])
            metrics.INTAKE_MESSAGES.labels(tname, "rejected").inc()
        else:
            metrics.INTAKE_MESSAGES.labels(tname, "noop" if decision.noop else "applied").inc()
        send_outputs(outputs)
        observe(decision, outputs)
        if decision.entry is not None:
            new = domain.remember(decision.entry, intake.event_id, outputs, event.message.offset)
            cache[new["dedup_key"]] = new
            dirty[new["dedup_key"]] = (event, new)  # one write per key per batch: the whole decision state
            for case_id in decision.created:  # write-once index for commands by case id
                new_index[case_id] = (event, new["dedup_key"])

    topo.agents = {"route": route, "apply": apply_cases}  # type: ignore[attr-defined]


STALL_EXIT_CODE = 3


def register_health(topo: Topology, bootstrap_servers: str, inputs: set[str], interval: float = 5.0,
                    stall_seconds: float = 60.0) -> None:
    """Liveness: a structured health line, and a stall watchdog.

    Every ``interval`` seconds the worker compares what its streams have read
    with the end offsets of its assigned partitions of ``inputs`` (the topics
    its agents consume) (asked with a
    separate client). If input is waiting and nothing has been read for
    ``stall_seconds``, the consumer is stuck (seen rarely with faust-streaming
    after a crash restart: ready, assigned, not fetching); the worker logs
    its state and exits with code 3 so its supervisor restarts it. Nothing is
    lost: offsets were not committed past what was processed.
    """
    import os
    import sys

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.health import CommitWatch, StallDetector, input_lag

    app = topo.app
    detector = StallDetector(stall_seconds, time.monotonic())
    watch = CommitWatch()
    client: list = []

    @app.timer(interval=interval, name=f"{topo.family.app_id}.health")
    async def health():
        consumer = app.consumer
        # a sink waiting out an outage (backoff) holds its partitions still on
        # purpose: while one is writing, the domain-event log is not watched
        watched = inputs - {topo.family.name("domain-events")} if topo.busy_sinks else inputs
        stream_tps = sorted((tp for tp in consumer.assignment() if tp.topic in watched),
                            key=lambda tp: (tp.topic, tp.partition))
        name = {tp: f"{tp.topic}:{tp.partition}" for tp in stream_tps}
        read = {name[tp]: consumer._read_offset.get(tp) for tp in stream_tps}
        lag = None
        try:
            if not client:
                c = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
                await c.start()
                client.append(c)
            ends = await client[0].end_offsets([TopicPartition(tp.topic, tp.partition) for tp in stream_tps])
            lag = input_lag({name[tp]: ends[TopicPartition(tp.topic, tp.partition)] for tp in stream_tps}, read,
                            {name[tp]: consumer._committed_offset.get(tp) for tp in stream_tps})
        except Exception as exc:  # the watchdog must never take the worker down by itself
            log.warning("health: cannot read end offsets: %r", exc)
        now = time.monotonic()
        stalled = detector.observe(read, lag, recovering=not app.tables.recovery.completed.is_set(), now=now)
        stalled_for = detector.stalled_for(now)
        committed = {tp: consumer._committed_offset.get(tp) for tp in stream_tps}
        in_flight = {m.tp for m in list(consumer._unacked_messages)}
        # while the broker does not answer, commits cannot move either: watch only while it does
        watched_tps = stream_tps if lag is not None else []
        for tp in watch.observe(now, {tp: (committed[tp], consumer._read_offset.get(tp), tp in in_flight)
                                      for tp in watched_tps}):
            # a record read and lost inside the worker around a rebalance (streams/rebalance.py): again
            log.warning("partition %s: the commit is stuck at offset %s behind records read but never "
                        "processed; reading them again from there", name[tp], committed[tp])
            metrics.REREADS.labels(topo.tenant.name).inc()
            try:
                start = (await consumer.earliest_offsets(tp)).get(tp)
                if start is not None and start > committed[tp]:
                    # the log no longer holds them: retention deleted them before they were processed
                    log.error("partition %s: records %d..%d were deleted (retention) before being processed; "
                              "going on from %d", name[tp], committed[tp], start - 1, start)
                    consumer._committed_offset[tp] = start
                await consumer.seek(tp, max(committed[tp], start or 0))
            except Exception as exc:
                log.warning("partition %s: seeking back failed: %r", name[tp], exc)
        # read but not committed yet (being processed, or waiting for the next commit)
        uncommitted = sum(max(0, (read[name[tp]] or 0) - (committed[tp] or 0)) for tp in stream_tps
                          if read[name[tp]] is not None)
        state = store.usage()
        for part, n in state.items():
            metrics.STATE_MEMORY.labels(topo.tenant.name, part).set(n)
        log.info("health %s", orjson.dumps({
            "tenant": topo.tenant.name, "partitions": len(stream_tps), "lag": lag, "uncommitted": uncommitted,
            "flow_active": consumer.flow_active, "processing": app.flow_control.is_active(),
            "generation": app.consumer_generation_id, "seconds_since_progress": round(stalled_for, 1),
            "state_mib": round(state["cache"] / 2**20, 1),
        }).decode())
        if stalled:
            log.error("stall: %d input messages waiting and nothing read for %.0fs; exiting with code %d "
                      "for the supervisor to restart this worker. state=%s", lag, stalled_for,
                      STALL_EXIT_CODE, orjson.dumps(read).decode())
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STALL_EXIT_CODE)
