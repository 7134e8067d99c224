"""Projection agents: T.domain-events -> sinks, in batches.

One agent per sink, each its own Faust agent over the domain-event log, so
a slow or unreachable sink pauses only itself (its ``write_batch`` retries
with backoff and does not return) while intake keeps flowing.
"""

from __future__ import annotations

import logging

import schemas
from sinks.base import Sink, SinkRecord
from streams import metrics
from streams.app import Topology

log = logging.getLogger("casestream.projections")

BATCH_SIZE = 500
BATCH_WITHIN = 0.5  # seconds


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
                    await sink.write_batch(records)  # retries with backoff while the server is down
                finally:
                    topo.busy_sinks.discard(sink.name)
                metrics.PROJECTED.labels(topo.tenant.name, sink.name).inc(len(records))
        finally:
            await sink.close()
