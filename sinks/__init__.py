"""Sinks: read models and deliveries fed from T.domain-events (see sinks/base.py)."""

from __future__ import annotations

from sinks.base import Backoff, Sink, SinkRecord

__all__ = ["Backoff", "Sink", "SinkRecord", "build_sinks"]

KNOWN = ("postgres", "elasticsearch")


def build_sinks(settings, tenant) -> list[Sink]:
    """The sinks a tenant's worker feeds (CASESTREAM_PROJECTIONS, default both; '' for none)."""
    from streams.config import ConfigError

    sinks: list[Sink] = []
    for name in settings.projections:
        if name == "postgres":
            from sinks.postgres import PostgresSink, database_name

            sinks.append(PostgresSink(settings.postgres_dsn, database_name(tenant.name, settings.db_prefix), tenant))
        elif name == "elasticsearch":
            from sinks.elasticsearch import ElasticsearchSink, index_name
            from sinks.history import LogHistory

            sinks.append(ElasticsearchSink(settings.elasticsearch_url, index_name(tenant, settings.index_prefix),
                                           tenant, LogHistory(settings.kafka_bootstrap_servers)))
        else:
            raise ConfigError(f"CASESTREAM_PROJECTIONS: unknown sink '{name}'; known sinks: {', '.join(KNOWN)}")
    return sinks
