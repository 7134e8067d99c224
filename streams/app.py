"""The Faust app of one tenant's worker, and its topology.

``create_app`` builds a Faust app whose id, topics, tables and store
directory all belong to one tenant; ``agents.intake.register`` wires the
agents into it. Nothing here runs at import time, so both tenants' apps can
be built side by side (tests, ``casestream topics create``).
"""

from __future__ import annotations

from agents.topology import Topology, raw_topic
from streams import store
from streams.batching import QuietStream
from streams.rebalance import App
from streams.config import MAX_RECORD_BYTES, ConfigError, get_tenant, load_topics
from streams.settings import Settings, default_instance_id


ROLES = ("all", "intake", "projections")


def oncall_path_for(settings: Settings, tenant_name: str):
    """The tenant's on-call file: ``<CASESTREAM_ONCALL_DIR>/<tenant>.yaml``."""
    from pathlib import Path

    from streams.config import PROJECT_ROOT

    return Path(settings.oncall_dir or PROJECT_ROOT / "oncall") / f"{tenant_name}.yaml"


def _reload_metric(tenant_name: str):
    from streams import metrics

    def on_reload(result: str, _detail: str) -> None:
        metrics.CONFIG_RELOADS.labels(tenant_name, result).inc()

    return on_reload


def create_app(settings: Settings, tenant_name: str | None = None, *,
               instance_id: str | None = None, role: str = "all") -> Topology:
    """The worker of one tenant. ``role``: ``all`` (intake and projections in
    one process), ``intake`` (route + apply, owns the tables), or
    ``projections`` (the sink agents only, as their own Faust app and consumer
    group ``<app id>-projections``, so they can run in another process).

    The consumer group session timeout is ``settings.session_timeout``
    (``CASESTREAM_SESSION_TIMEOUT``, default 60 s; heartbeats every tenth of
    it, at most 3 s): with static membership (``consumer_group_instance_id``)
    a member that dies keeps its partitions that long before they move."""
    if role not in ROLES:
        raise ConfigError(f"unknown worker role '{role}'; use one of {', '.join(ROLES)}")
    name = tenant_name or settings.tenant_name
    tenant = get_tenant(name, settings.tenants_file)
    family = load_topics(tenant.name, settings.topics_file)
    app_id = family.app_id if role != "projections" else f"{family.app_id}-projections"
    store_dir = settings.store_dir(tenant.name) / ("" if role != "projections" else "projections")
    store_dir.mkdir(parents=True, exist_ok=True)
    iid = instance_id or default_instance_id(tenant.name, settings.store_dir(tenant.name))
    if role == "projections" and not instance_id:
        iid += "-projections"
    app = App(  # faust.App with the rebalance guards of streams/rebalance.py
        app_id,
        broker=[f"kafka://{s}" for s in settings.kafka_servers],
        store=f"{store.SCHEME}://",  # Faust's RocksDB store under one memory budget (streams/store.py)
        datadir=str(store_dir),
        topic_partitions=family.partitions,
        topic_replication_factor=family.replication_factor,
        topic_allow_declare=True,
        processing_guarantee="at_least_once",
        consumer_group_instance_id=iid,
        broker_session_timeout=settings.session_timeout,     # CASESTREAM_SESSION_TIMEOUT
        broker_heartbeat_interval=settings.heartbeat_interval,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # batch outputs: without linger every buffered send is its own request
        producer_linger=0.01,
        producer_max_batch_size=512 * 1024,
        producer_max_request_size=MAX_RECORD_BYTES + 64 * 1024,  # the record and its batch's own bytes
        web_enabled=False,
        autodiscover=False,
        table_cleanup_interval=60.0,
        Stream=QuietStream,  # take_events that sleeps while nothing is buffered (streams/batching.py)
    )
    app.store_dir = store_dir  # discarded if the group expels this worker (streams/rebalance.py)
    store.set_budget(settings.state_memory_mb)
    has_intake = role in ("all", "intake")
    topo = Topology(
        tenant=tenant,
        family=family,
        app=app,
        intake=raw_topic(app, family.name("intake")),
        routed=raw_topic(app, family.name("intake-routed")),
        domain_events=raw_topic(app, family.name("domain-events")),
        dlq=raw_topic(app, family.name("dlq")),
        keys=app.VersionedTable("keys", default=None, key_type=bytes, value_type=bytes,
                                options={"driver": "rocksdict"},
                                help="dedup key -> its cases, open case, seen intake ids and their outputs "
                                     "(versioned: a restore never steps back to an older state)")
        if has_intake else None,
        case_keys=app.Table("case_keys", default=None, key_type=bytes, value_type=bytes,
                            options={"driver": "rocksdict"}, help="case id -> dedup key (write-once index)")
        if has_intake else None,
        timers_topic=raw_topic(app, family.name("timers")),
        timers=app.Table("timers", default=None, key_type=bytes, value_type=bytes, options={"driver": "rocksdict"},
                         help="timer id -> due time and case (index of the pending timers)")
        if has_intake else None,
        notifications_topic=raw_topic(app, family.name("notifications")),
        deliveries=app.Table("deliveries", default=None, key_type=bytes, value_type=bytes, options={"driver": "rocksdict"},
                             help="delivery id -> request, attempts and next attempt (pending ones)")
        if has_intake else None,
        delivery_outcomes=app.Table("delivery_outcomes", default=None, key_type=bytes, value_type=bytes,
                                    options={"driver": "rocksdict"}, help="delivery id -> delivered or failed")
        if has_intake else None,
    )
    from agents import intake  # agents are thin shells over streams.domain

    inputs: set[str] = set()
    if has_intake:
        from agents import timers
        from streams.clock import make_clock
        from streams.oncall_config import ConfigWatcher

        topo.oncall = ConfigWatcher(tenant, oncall_path_for(settings, tenant.name), on_reload=_reload_metric(tenant.name))
        topo.clock = make_clock(settings.clock)
        topo.bootstrap = settings.kafka_bootstrap_servers
        from agents import notify

        intake.register(topo)
        timers.register(topo, tick=settings.timer_tick)
        notify.register(topo, tick=settings.timer_tick)
        inputs |= {family.name("intake"), family.name("intake-routed"), family.name("timers"),
                   family.name("notifications")}
    if role in ("all", "projections"):
        from agents import projections
        from sinks import build_sinks

        sinks = build_sinks(settings, tenant)
        projections.register(topo, sinks)
        if sinks:
            inputs.add(family.name("domain-events"))
    intake.register_health(topo, settings.kafka_bootstrap_servers, inputs, stall_seconds=settings.stall_seconds)
    return topo
