"""Projection agents: T.domain-events -> sinks, in batches.

One agent per sink, each its own Faust agent over the domain-event log, so
a slow or unreachable sink pauses itself (its ``write_batch`` retries with
backoff and does not return) while intake keeps flowing. The other sink goes
on until the paused agent's stream buffer is full (``stream_buffer_maxsize``,
4 096 events); then the consumer pauses the domain-event partitions for both
agents (they share it), which keeps memory bounded, and both catch up once
the server is back. A record the
sink refused for good is dead-lettered (``projection_rejected``, on the
tenant's ``T.dlq``) and counted, and the partition keeps flowing.
"""

from __future__ import annotations

import logging
import time

import orjson

import schemas
from agents.topology import Topology
from streams.stage.route import dead_letter
from sinks.base import Rejected, Sink, SinkRecord
from streams import metrics
from streams.domain.intake import PROJECTION_REJECTED, Rejection

log = logging.getLogger("casestream.projections")

BATCH_SIZE = 500
BATCH_WITHIN = 0.5  # seconds


def dead_letter_of(sink: str, rejected: Rejected, now_ms: int) -> dict:
    """The dead letter of a record ``sink`` refused for good: where the event sits in
    T.domain-events, and the event (JSON) as its original."""
    r = rejected.record
    detail = (f"{sink} refused the document of case {r.event.get('case_id')} (version {r.event.get('version')}): "
              f"{rejected.reason}")
    record = dead_letter(Rejection(PROJECTION_REJECTED, detail), r.topic, r.partition, r.offset,
                         orjson.dumps(r.event))
    record["dead_lettered_at"] = now_ms
    return record


def register(topo: Topology, sinks: list[Sink]) -> None:
    app = topo.app
    for sink in sinks:
        _register_one(topo, app, sink)


def _register_one(topo: Topology, app, sink: Sink) -> None:
    @app.agent(topo.domain_events, name=f"{topo.family.app_id}.project-{sink.name}")
    async def project(stream):
        await sink.open()
        try:
            async for events in stream.take_events(BATCH_SIZE, within=BATCH_WITHIN):
                records = []
                for ev in events:
                    msg = ev.message
                    try:
                        records.append(SinkRecord(msg.topic, msg.partition, msg.offset, schemas.decode(ev.value)))
                    except schemas.SchemaError as exc:  # not ours to stop on: count and skip
                        log.error("%s: undecodable record %s[%d]@%d skipped: %s", sink.name, msg.topic,
                                  msg.partition, msg.offset, exc)
                topo.busy_sinks.add(sink.name)
                try:
                    rejected = await sink.write_batch(records) or []  # retries with backoff while the server is down
                finally:
                    topo.busy_sinks.discard(sink.name)
                for rej in rejected:  # refused for good: dead letters (Faust flushes them before the offsets commit)
                    topo.dlq.send_soon(key=str(rej.record.event.get("case_id")).encode(),
                                       value=orjson.dumps(dead_letter_of(sink.name, rej, int(time.time() * 1000))))
                    metrics.DLQ_MESSAGES.labels(topo.tenant.name, PROJECTION_REJECTED).inc()
                    metrics.PROJECTION_REJECTED.labels(topo.tenant.name, sink.name).inc()
                metrics.PROJECTED.labels(topo.tenant.name, sink.name).inc(len(records) - len(rejected))
        finally:
            await sink.close()
