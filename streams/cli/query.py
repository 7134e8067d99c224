"""The analyst's view on the command line: ``casestream case show`` (PostgreSQL), ``search`` and
``analytics`` (Elasticsearch), through the query service of ``casestream api`` (``streams/api.py``)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from streams.cli.common import command, json_option, options, tenant_option
from streams.config import ConfigError, get_tenant
from streams.console import EXIT_OK, EXIT_USAGE, CliError, emit_json, print_table
from streams.settings import Settings

FILTERS = ("status", "severity", "priority", "source", "project", "tag")


def run_query(settings: Settings, fn):
    """``fn(service)`` run on a fresh :class:`streams.api.QueryService`; its errors as the CLI's."""
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


def cmd_case(args, settings: Settings) -> int:
    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file).name

    async def fetch(svc):
        return await svc.case(tenant, args.case_id), (await svc.timeline(tenant, args.case_id)
                                                      if args.timeline else None)

    case, timeline = run_query(settings, fetch)
    if args.json:
        emit_json({"case": case, "timeline": timeline} if args.timeline else case)
        return EXIT_OK
    skip = {"custom_details", "links"}
    print_table([{"field": k, "value": v} for k, v in case.items() if k not in skip], ["field", "value"])
    if timeline is not None:
        from streams.domain.event_types import describe

        print()
        print_table([{"v": e["version"], "type": e["type"], "actor": (e.get("actor") or {}).get("id"),
                      "change": describe(e)} for e in timeline], ["v", "type", "actor", "change"])
    return EXIT_OK


def cmd_search(args, settings: Settings) -> int:
    tenant = args.tenant or settings.tenant_name
    params: dict[str, list[str]] = {}
    if args.query:
        params["q"] = [" ".join(args.query)]
    for f in FILTERS:
        if getattr(args, f):
            params[f] = getattr(args, f)
    for name, value in (("sort", args.sort), ("size", str(args.size) if args.size else None),
                        ("cursor", args.cursor), ("created_from", args.created_from),
                        ("created_to", args.created_to)):
        if value:
            params[name] = [value]
    if args.facets:
        params["facets"] = [args.facets]
    result = run_query(settings, lambda svc: svc.search(tenant, params))
    if args.json:
        emit_json(result)
        return EXIT_OK

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
    result = run_query(settings, lambda svc: svc.analytics(tenant, params))
    if args.json:
        emit_json(result)
        return EXIT_OK
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


def add_case(sub) -> None:
    show = options()
    show.add_argument("action", choices=["show"])
    show.add_argument("case_id")
    show.add_argument("--timeline", action="store_true", help="also print every event, in version order")
    command(sub, "case", cmd_case, [tenant_option(), show, json_option()],
            help="show a case from the PostgreSQL projection",
            description="Show a case's current state (and its timeline) from the tenant's database.")


def add_search(sub) -> None:
    search = options()
    for f in FILTERS:
        search.add_argument(f"--{f}", action="append", help=f"filter by {f} (repeat or comma-separate)")
    search.add_argument("--facets", help="comma-separated: status,severity,priority,source,project,tags,urgency")
    search.add_argument("--sort", help="field, - prefix for descending (default -created_at)")
    search.add_argument("--size", type=int)
    search.add_argument("--cursor", help="next page (printed after a page)")
    search.add_argument("--created-from", help="RFC 3339")
    search.add_argument("--created-to", help="RFC 3339")
    se = command(sub, "search", cmd_search, [tenant_option(), search, json_option()],
                 help="search a tenant's cases (Elasticsearch)",
                 description="Full-text search with filters and facets over the tenant's index.")
    se.add_argument("query", nargs="*", help="full-text query (summary, dedup key, source, tags)")


def add_analytics(sub) -> None:
    metric = options()
    metric.add_argument("--metric", choices=["count", "mtta", "mttr"], default="count")
    metric.add_argument("--interval", choices=["hour", "day"], default="day")
    metric.add_argument("--group-by", choices=["severity", "priority", "status", "source", "project", "urgency"])
    command(sub, "analytics", cmd_analytics, [tenant_option(), metric, json_option()],
            help="case counts, time to acknowledge / resolve over time",
            description="count, mtta (time to acknowledge) or mttr (time to resolve) per hour or day.")
