"""Intake agents: route, then apply. I/O only: the decisions are ``streams.stage``.

``route`` (stateless, any key) hands each ``T.intake`` record to
``streams.stage.route.route_message``, which parses and validates it: bad
input goes to ``T.dlq`` with a reason, good input is re-keyed by its routing
token (a hash of the dedup key, also embedded in case ids) to
``T.intake-routed``, so everything about one dedup key and its cases is
processed by one partition, in order.

``apply_cases`` (stateful) takes batches of ``T.intake-routed`` and
``T.timers`` records and runs each batch through
``streams.stage.apply.ApplyBatch``, which reads the ``keys``, ``case_keys``
and ``timers`` tables and decides (``streams.domain``); the agent sends each
input's records (domain events in Avro keyed by case id, relay copies,
delivery requests, dead letters), then writes the batch's table writes.
Crash safety under Faust's at-least-once delivery:

* everything a decision reads is one table entry (per dedup key), written
  whole (once per batch, with the key's last state), so lost changelog
  records can only roll an entry back to an earlier state of its own --
  never mix states of two writes;
* outputs and table writes are buffered (``send_soon``); Faust flushes the
  producer before it commits an offset, so a committed offset implies its
  outputs and changelog records were acknowledged; before writing states
  that would forget outputs not known to be sent, the agent flushes itself
  (``UnflushedOutputs``);
* outputs are deterministic (ids, versions and case ids derive from the
  intake id), so a redelivered message that was not yet recorded produces
  byte-identical events;
* a message whose id is already in the key state has no second effect. When
  it is Kafka redelivering the very record that applied it (same offset: a
  crash came before the commit), its recorded outputs are re-sent verbatim
  and the state rewritten, in case the crash lost them after the local
  store had them; a message merely sent twice produces nothing.
Consumers deduplicate by ``event_id`` or ``(case_id, version)``.

``T.timers`` carries due timers sent by ``agents/timers.py``, keyed like the
routed intake, and delivery outcomes (``agents/notify.py``): a timer fires
only while the entry still holds it, and the same redelivery rules apply
(its input id derives from the timer id). The ``timers`` table -- the index
the scheduler scans -- is kept in step with each written entry's pending
timers. The decisions use the tenant's on-call configuration as it is when
the batch starts (``streams/oncall_config.py``).
"""

from __future__ import annotations

import logging
import time

import orjson

from streams import metrics, store
from agents.topology import Topology, ensure_relay_topics, raw_topic, track_topics, write_in_context
from streams.domain import cases as domain
from streams.domain.intake import PROCESSING_ERROR, Rejection
from streams.stage.apply import ApplyBatch, Step, Table, UnflushedOutputs
from streams.stage.outputs import OutputKind
# the route stage's pure functions, re-exported for tests that exercise the agent's functions by name
from streams.stage.route import (  # noqa: F401
    DLQ, MAX_ORIGINAL, ROUTED, dead_letter, header_identity, header_value, kept_original, record_identity,
    route_message,
)

log = logging.getLogger("casestream.intake")

APPLY_BATCH = 500      # routed messages per apply batch
APPLY_WITHIN = 0.02    # seconds to wait for a batch to fill


def register(topo: Topology) -> None:
    app, tenant = topo.app, topo.tenant
    tname = tenant.name
    ack_status = tenant.actions["acknowledge"]

    def send_dlq(key: bytes | None, record: dict) -> None:
        record = dict(record, dead_lettered_at=int(time.time() * 1000))
        topo.dlq.send_soon(key=key, value=orjson.dumps(record))
        metrics.DLQ_MESSAGES.labels(tname, record["reason"]).inc()

    relay_topics: dict[str, object] = {}

    def relay_topic(sub_id: str):
        if sub_id not in relay_topics:
            relay_topics[sub_id] = raw_topic(app, topo.family.relay(sub_id).name)
        return relay_topics[sub_id]

    def send(step: Step) -> None:
        """An input's records, in order, each to its topic."""
        for m in step.records:
            out = m.output
            if out.kind is OutputKind.DOMAIN:
                topo.domain_events.send_soon(key=m.key, value=m.value, headers=m.headers)
                metrics.DOMAIN_EVENTS.labels(tname, out.value["type"]).inc()
            elif out.kind is OutputKind.NOTIFY:
                topo.notifications_topic.send_soon(key=m.key, value=m.value)
            elif out.kind is OutputKind.RELAY:
                relay_topic(out.key).send_soon(key=m.key, value=m.value, headers=m.headers)
                metrics.RELAYED.labels(tname, out.key).inc()
            else:
                topo.dlq.send_soon(key=m.key, value=m.value)
                metrics.DLQ_MESSAGES.labels(tname, out.value["reason"]).inc()

    def observe(step: Step) -> None:
        """On-call metrics of the domain events an input produced (not of re-sent ones)."""
        if step.duplicate:
            return
        entry = step.decision.entry
        for event in step.events:
            metrics.record_oncall(tname, ack_status, event, entry["cases"].get(event["case_id"]) if entry else None)

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

    def get_dedup_key(case_id: str) -> str | None:
        raw = topo.case_keys.get(case_id)
        return raw.decode() if raw is not None else None

    def has_timer(timer_id: str) -> bool:
        return topo.timers.get(timer_id) is not None

    tables = {Table.KEYS: topo.keys, Table.TIMERS: topo.timers, Table.CASE_KEYS: topo.case_keys}

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
            batch = ApplyBatch(tenant, cfg, get_entry=get_entry, get_dedup_key=get_dedup_key, has_timer=has_timer,
                               relay_ready=topo.relay_ready)
            for event in events:
                try:
                    if event.message.topic == timers_name:
                        step = batch.fire(orjson.loads(event.value), event.message.offset, event)
                    else:
                        step = batch.apply_routed(orjson.loads(event.value), event.message.offset, event)
                        count(step)
                    send(step)
                    observe(step)
                except Exception as exc:  # a bug must not stop the partition or lose the record
                    failed(event, exc)
            if unflushed.add(*batch.unflushed()):
                await app.producer.flush()  # before a state that re-sends fewer inputs' outputs is written
                unflushed.clear()
            for w in batch.writes():
                write_in_context(tables[w.table], w.context, w.key, w.value)
            metrics.APPLY_SECONDS.labels(tname).observe(time.perf_counter() - started)

    def count(step: Step) -> None:
        d = step.decision
        if d.duplicate:
            metrics.DUPLICATES.labels(tname).inc()
        else:
            metrics.INTAKE_MESSAGES.labels(tname, "rejected" if d.rejection is not None else
                                           "noop" if d.noop else "applied").inc()

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
