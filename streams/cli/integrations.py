"""``casestream integrations create|list|rotate|revoke``: the intake gateway's integrations and their keys
(``streams/integrations.py``)."""

from __future__ import annotations

import asyncio
import re
from datetime import timezone

import orjson

from streams.cli.common import command, json_option, key_values, options, safe_dsn, tenant_option, timeout_option
from streams.config import load_tenants
from streams.console import EXIT_OK, EXIT_USAGE, CliError, emit_json, print_table
from streams.settings import Settings


def _duration_seconds(text: str, what: str) -> int:
    """``24h``, ``30m``, ``90s``, ``1d``, ``1h30m`` or plain seconds."""
    t = (text or "").strip().lower()
    if t.isdigit():
        return int(t)
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", t)
    if not t or m is None:
        raise CliError(f"{what}: a duration like 24h, 30m, 90s or 1h30m, got {text!r}", EXIT_USAGE)
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def _when(dt) -> str | None:
    return None if dt is None else dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_rows(keys: list[dict]) -> list[dict]:
    return [{"key": i + 1, "created": _when(k["created_at"]), "expires": _when(k["expires_at"]),
             "revoked": _when(k["revoked_at"]), "valid": k["valid"]} for i, k in enumerate(keys)]


def cmd_integrations(args, settings: Settings) -> int:
    from sinks.postgres import MigrationError
    from streams.integrations import IntegrationError, IntegrationStore, endpoint

    tenants = load_tenants(settings.tenants_file)
    integration_options = key_values(args.option) if args.action == "create" else None
    overlap = _duration_seconds(args.overlap, "--overlap") if args.action == "rotate" else None

    async def listed(store, integration_id: str) -> dict:
        return next(i for i in await store.list(args.tenant) if i["id"] == integration_id)

    async def go():
        store = IntegrationStore(settings.postgres_dsn, settings.db_prefix, tenants, cache_seconds=0)
        try:
            if args.action == "create":
                integ, key = await store.create(args.tenant, args.kind, args.name, integration_options,
                                                signed=args.signed, signing_secret=args.slack_signing_secret)
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
        raise CliError(f"integrations {args.action} on {safe_dsn(settings.postgres_dsn)} failed: "
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


def add_integrations(sub) -> None:
    ig = sub.add_parser("integrations", help="integrations of the intake gateway: create, list, rotate, revoke keys",
                        description="An integration connects one monitor (pagerduty, alertmanager, grafana, datadog, "
                                    "events) of a tenant to the intake gateway. Its key is shown once, at create "
                                    "and rotate; only its hash is stored in the tenant's database.")
    igs = ig.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common():
        return [tenant_option("the tenant the integration belongs to", required=True), timeout_option(30.0),
                json_option()]

    create = options()
    create.add_argument("--kind", required=True,
                        choices=["pagerduty", "alertmanager", "grafana", "datadog", "events", "slack"])
    create.add_argument("--slack-signing-secret", help="slack: the Slack app's signing secret (Basic Information)")
    create.add_argument("--name", required=True, help="what the monitor is, e.g. 'prod alertmanager'")
    create.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the integration, e.g. dedup_by=group (repeatable; a JSON value is parsed)")
    create.add_argument("--signed", action="store_true",
                        help="require X-Casestream-Signature (HMAC-SHA256) on every request; prints the secret once")
    command(igs, "create", cmd_integrations, [create, *common()],
            help="a new integration and its key (shown once)",
            description="Create an integration; prints its key once (and its signing secret once "
                        "with --signed) and where the monitor sends.")
    command(igs, "list", cmd_integrations, common(),
            help="the tenant's integrations and their keys' validity (never secrets)")
    overlap = options()
    overlap.add_argument("id", help="integration id (int_...)")
    overlap.add_argument("--overlap", default="24h",
                         help="how long the current keys stay valid: 24h, 30m, 90s (default 24h)")
    command(igs, "rotate", cmd_integrations, [overlap, *common()],
            help="a new key; the current keys expire after --overlap",
            description="Create a new key; the integration's current keys stay valid for --overlap "
                        "(default 24h; 0s: they stop at once).")
    iv = command(igs, "revoke", cmd_integrations, common(),
                 help="invalidate the integration and all its keys at once",
                 description="Revoke an integration: every key of it stops working at once (gateways "
                             "cache look-ups for a few seconds).")
    iv.add_argument("id", help="integration id (int_...)")
