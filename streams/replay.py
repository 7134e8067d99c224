"""Replay and rebuild: projections from the domain-event log.

``replay(settings, tenant, sinks, rebuild=True)``:

* Elasticsearch, rebuild: a fresh concrete index is filled from the
  beginning of ``T.domain-events`` up to the end offsets taken at the start,
  then the tenant's alias is swapped to it atomically and the old index is
  deleted; a catch-up pass then re-applies whatever arrived meanwhile (the
  live indexer kept writing to the old index until the swap).
* PostgreSQL, rebuild: the projection tables are truncated and refilled
  (idempotent writes: the live worker may write at the same time), then the
  same catch-up pass.
* Without ``rebuild``: the whole log is re-applied to the live projections
  (repairs anything skipped; idempotent, changes nothing that is right).

Reading needs no consumer group: the replay assigns every partition itself.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from sinks.base import SinkRecord
from sinks.history import read_log
from streams import kafka
from streams.config import Tenant, load_topics
from streams.settings import Settings


@dataclass
class ReplayResult:
    sink: str
    events: int = 0
    target: str = ""
    seconds: float = 0.0
    caught_up: int = 0
    notes: list[str] = field(default_factory=list)


class Progress:
    """A progress bar on stderr (silent when stderr is not a terminal unless forced)."""

    def __init__(self, label: str, total: int, enabled: bool | None = None):
        self.label, self.total, self.done = label, total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            width = 30
            frac = min(1.0, self.done / self.total) if self.total else 1.0
            bar = "#" * int(width * frac) + "." * (width - int(width * frac))
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def replay(settings: Settings, tenant: Tenant, sinks: list[str], *, rebuild: bool,
                 progress: bool | None = None) -> list[ReplayResult]:
    topic = load_topics(tenant.name, settings.topics_file).name("domain-events")
    results = []
    for name in sinks:
        started = time.monotonic()
        end = await kafka.end_offsets(settings.kafka_bootstrap_servers, [topic])
        total = sum(end.values())
        bar = Progress(f"{name} {tenant.name}", total, progress)
        if name == "elasticsearch":
            result = await _replay_elasticsearch(settings, tenant, topic, end, rebuild, bar)
        elif name == "postgres":
            result = await _replay_postgres(settings, tenant, topic, end, rebuild, bar)
        else:
            raise ValueError(f"unknown sink {name!r}")
        result.seconds = round(time.monotonic() - started, 2)
        results.append(result)
    return results


async def _replay_elasticsearch(settings, tenant, topic, end, rebuild, bar) -> ReplayResult:
    from elasticsearch import AsyncElasticsearch

    from sinks.elasticsearch import ElasticsearchSink, concrete_index_name, create_index, index_name
    from sinks.history import LogHistory

    alias = index_name(tenant, settings.index_prefix)
    history = LogHistory(settings.kafka_bootstrap_servers)
    result = ReplayResult("elasticsearch", target=alias)
    client = AsyncElasticsearch(settings.elasticsearch_url, request_timeout=60)
    try:
        if not rebuild:
            result.events = await _fill(settings, ElasticsearchSink(settings.elasticsearch_url, alias, tenant, history),
                                        topic, None, end, bar)
            return result
        concrete = concrete_index_name(alias)
        await create_index(client, concrete)
        result.events = await _fill(settings, ElasticsearchSink(settings.elasticsearch_url, concrete, tenant, history,
                                                                create=False), topic, None, end, bar)
        old = []
        if await client.indices.exists_alias(name=alias):
            old = sorted((await client.indices.get_alias(name=alias)).body)
            actions = [{"remove": {"index": i, "alias": alias}} for i in old] + [
                {"add": {"index": concrete, "alias": alias}}]
            await client.indices.update_aliases(actions=actions)  # atomic swap
        else:
            if await client.indices.exists(index=alias):
                # an index from before aliases: it must go before its name can be an alias
                # (searches fail for the moment in between)
                await client.indices.delete(index=alias)
                result.notes.append(f"{alias} was a concrete index; now an alias")
            await client.indices.update_aliases(actions=[{"add": {"index": concrete, "alias": alias}}])
        for i in old:
            await client.indices.delete(index=i)
        result.target = f"{alias} -> {concrete}"
        result.notes.append(f"replaced {', '.join(old) or 'nothing'}")
        # what arrived while rebuilding went to the old index: re-apply it to the new one
        now_end = await kafka.end_offsets(settings.kafka_bootstrap_servers, [topic])
        result.caught_up = await _fill(settings, ElasticsearchSink(settings.elasticsearch_url, alias, tenant, history,
                                                                   create=False), topic, end, now_end, None)
        return result
    finally:
        await client.close()


async def _replay_postgres(settings, tenant, topic, end, rebuild, bar) -> ReplayResult:
    from sinks.postgres import PostgresSink, database_name

    db = database_name(tenant.name, settings.db_prefix)
    result = ReplayResult("postgres", target=db)
    if rebuild:
        sink = PostgresSink(settings.postgres_dsn, db, tenant)
        await sink.open()
        try:
            await sink.truncate()
        finally:
            await sink.close()
        result.notes.append("truncated")
    result.events = await _fill(settings, PostgresSink(settings.postgres_dsn, db, tenant, track_positions=False),
                                topic, None, end, bar)
    now_end = await kafka.end_offsets(settings.kafka_bootstrap_servers, [topic])
    result.caught_up = await _fill(settings, PostgresSink(settings.postgres_dsn, db, tenant, track_positions=False),
                                   topic, end, now_end, None)
    return result


async def _fill(settings, sink, topic: str, start: dict | None, end: dict, bar: Progress | None) -> int:
    """Open ``sink``, feed it the log from ``start`` to ``end``, flush and close it; the count fed."""
    async def feed(records: list[SinkRecord]) -> None:
        await sink.write_batch(records)
        if bar is not None:
            bar.advance(len(records))

    await sink.open()
    try:
        n = await read_log(settings.kafka_bootstrap_servers, topic, start, end, feed)
        await sink.flush()
        return n
    finally:
        await sink.close()
