"""``casestream replay`` and ``casestream reindex``: rebuild or repair the projections (``streams/replay.py``)."""

from __future__ import annotations

import asyncio

from streams.cli.common import command, json_option, options, tenant_option
from streams.config import get_tenant
from streams.console import EXIT_OK, CliError, emit_json, print_table
from streams.settings import Settings


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


def add_replay(sub) -> None:
    what = options()
    what.add_argument("--sink", choices=["elasticsearch", "postgres", "all"], default="all")
    what.add_argument("--from-beginning", action="store_true", help="rebuild from scratch")
    command(sub, "replay", cmd_replay, [tenant_option(), what, json_option()],
            help="rebuild or repair projections from T.domain-events",
            description="--from-beginning rebuilds (Elasticsearch: a fresh index, then an alias swap; "
                        "PostgreSQL: truncate and refill); without it the log is re-applied to the live "
                        "projections (idempotent repair).")


def add_reindex(sub) -> None:
    command(sub, "reindex", cmd_reindex, [tenant_option(), json_option()],
            help="rebuild the Elasticsearch index (replay --sink elasticsearch --from-beginning)",
            description="Rebuild the tenant's index into a fresh one and swap the alias.")
