"""``casestream oncall check|who``: a tenant's on-call configuration (``streams/oncall_config.py``), who is on call."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import orjson

from streams.cli.common import command, json_option, options, tenant_option
from streams.config import get_tenant
from streams.console import EXIT_OK, EXIT_USAGE, CliError, print_table
from streams.settings import Settings


def cmd_oncall(args, settings: Settings) -> int:
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


def add_oncall(sub) -> None:
    which = options()
    which.add_argument("action", choices=["check", "who"])
    which.add_argument("--file", help="check this file instead of the tenant's")
    which.add_argument("--schedule", help="who: only this schedule")
    which.add_argument("--at", help="who: at this RFC 3339 time (default: now)")
    command(sub, "oncall", cmd_oncall, [tenant_option(), which, json_option()],
            help="check a tenant's on-call configuration; who is on call",
            description="check: validate <CASESTREAM_ONCALL_DIR>/<tenant>.yaml (errors name the file "
                        "and line) and summarize it. who: who is on call for each schedule at a time.")
