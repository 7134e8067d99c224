"""What a tenant's agents share: the topology (config, Faust topics and tables) and the Faust I/O helpers.

``streams/app.py`` builds a :class:`Topology` and hands it to each agent's
``register``; the agents import this module, never each other and never the
app, so the import graph runs one way: ``streams.app`` -> ``agents.*`` ->
``agents.topology``.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import faust

from streams.config import Tenant, TopicFamily
from streams.kafka import create_topics, track_producer_topics

log = logging.getLogger("casestream.intake")


@dataclass
class Topology:
    """Everything a tenant's agents need: config, Faust topics and tables."""

    tenant: Tenant
    family: TopicFamily
    app: faust.App
    intake: faust.TopicT
    routed: faust.TopicT
    domain_events: faust.TopicT
    dlq: faust.TopicT
    keys: faust.Table | None
    case_keys: faust.Table | None
    timers_topic: faust.TopicT | None = None
    timers: faust.Table | None = None    # index of pending timers (timer id -> due time, case)
    notifications_topic: faust.TopicT | None = None
    deliveries: faust.Table | None = None  # delivery id -> request, attempts (pending ones only)
    delivery_outcomes: faust.Table | None = None  # delivery id -> delivered / failed
    oncall: object | None = None         # streams.oncall_config.ConfigWatcher
    clock: object | None = None          # streams.clock: when timers are due
    bootstrap: str = ""                  # Kafka, for the admin work agents do (relay topics)
    relay_ready: set[str] = field(default_factory=set)  # subscriptions whose relay topic exists
    relay_retry_at: float = 0.0          # monotonic time before which topic creation is not retried
    producer_tracked: bool = False       # the producer tracks every topic the worker writes to (ensure_relay_topics)
    busy_sinks: set[str] = field(default_factory=set)  # sinks inside write_batch (for the watchdog)


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    """A topic of bytes keys and values: agents decode themselves (Avro, JSON)."""
    return app.topic(name, key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw", internal=False)


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
