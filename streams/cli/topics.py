"""Setting a tenant up: ``casestream topics create`` (Kafka) and ``casestream db migrate`` (PostgreSQL)."""

from __future__ import annotations

import asyncio

from streams.cli.common import TENANT_ALL, command, json_option, safe_dsn, tenant_option, tenants_of, timeout_option
from streams.config import ConfigError, get_tenant, load_topics
from streams.console import EXIT_OK, EXIT_USAGE, CliError, emit_json, print_table
from streams.kafka import create_topics
from streams.settings import Settings


def cmd_topics(args, settings: Settings) -> int:
    from streams.app import oncall_path_for
    from streams.oncall_config import load_oncall

    families, relays = [], []
    for t in tenants_of(settings, args.tenant):
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


def cmd_db(args, settings: Settings) -> int:
    from sinks.postgres import MigrationError, database_name, migrate

    rows = []
    for t in tenants_of(settings, args.tenant):
        db = database_name(t, settings.db_prefix)
        try:
            applied = asyncio.run(asyncio.wait_for(migrate(settings.postgres_dsn, db), timeout=args.timeout))
        except MigrationError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        except Exception as exc:
            raise CliError(f"migrating {db} on {safe_dsn(settings.postgres_dsn)} failed: "
                           f"{exc.__class__.__name__} {exc}. Is PostgreSQL up?") from None
        rows.append({"tenant": t, "database": db, "applied": applied or [], "state": "up to date"})
    if args.json:
        emit_json(rows)
    else:
        print_table([dict(r, applied=", ".join(r["applied"]) or "-") for r in rows],
                    ["tenant", "database", "applied", "state"])
    return EXIT_OK


def add_topics(sub) -> None:
    t = command(sub, "topics", cmd_topics, [tenant_option(TENANT_ALL), timeout_option(30.0), json_option()],
                help="create the tenants' topic families",
                description="Create every topic of topics.yaml (and the tables' changelogs) "
                            "for one tenant or all; existing topics are left as they are.")
    t.add_argument("action", choices=["create"])


def add_db(sub) -> None:
    db = command(sub, "db", cmd_db, [tenant_option(TENANT_ALL), timeout_option(60.0), json_option()],
                 help="PostgreSQL projection databases",
                 description="Create each tenant's database when absent and apply pending migrations "
                             "(idempotent).")
    db.add_argument("action", choices=["migrate"])
