"""``casestream dlq list|show|replay``: inspect and replay a tenant's dead letters (``streams/dlq/``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from streams import dlq
from streams.cli.common import command, json_option, key_values, options, tenant_option, timeout_option
from streams.config import get_tenant, load_topics
from streams.console import EXIT_OK, EXIT_USAGE, CliError, emit_json, print_table
from streams.domain.intake import REASONS
from streams.settings import Settings


def short(text: str | None, limit: int) -> str | None:
    """``text`` on one line, cut to ``limit`` characters (an ellipsis says so)."""
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def cmd_dlq(args, settings: Settings) -> int:
    from streams.replay import Progress

    tenant = get_tenant(args.tenant, settings.tenants_file)
    family = load_topics(tenant.name, settings.topics_file)
    topic = family.name("dlq")
    bootstrap = settings.kafka_bootstrap_servers

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
                      "detail": short(dl.record.get("detail"), 70)} for dl in shown],
                    ["dlq", "reason", "dead_lettered", "source", "detail"])
        print(f"\n{len(shown)} of {len(found)} matching dead letters ({read} in {topic})"
              + ("; older ones left out: raise --limit" if len(shown) < len(found) else ""))
        return EXIT_OK

    gateway_options = key_values(args.gateway_option)
    bar_on = False if args.json else None

    def progress(label: str, total: int):
        return Progress(f"{label} {tenant.name}", total, bar_on).advance

    report = run(dlq.replay(bootstrap, tenant, family, filters, dry_run=args.dry_run,
                            gateway_options=gateway_options or None, progress=progress))
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
                rows.append(dict(base, to=family.name(x.role), key=short(x.key.decode("utf-8", "replace"), 40)
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


def _filters(replay: bool) -> argparse.ArgumentParser:
    f = options()
    f.add_argument("--reason", action="append", choices=REASONS,
                   help="only this reason (repeatable)" + ("; required unless --all" if replay else ""))
    f.add_argument("--since", help="only dead letters from this RFC 3339 time on")
    f.add_argument("--match", metavar="TEXT", help="only dead letters whose original contains TEXT")
    return f


def add_dlq(sub) -> None:
    dq = sub.add_parser("dlq", help="inspect and replay a tenant's dead letters (T.dlq)",
                        description="list: the dead letters (newest last); show: one whole record; replay: "
                                    "re-publish the matching ones where they came from (intake, timers, or the "
                                    "gateway's translation of a rate-limited body). Replay is idempotent: "
                                    "messages keep their event ids and the worker ignores ids it has seen. "
                                    "Reading stops at the end of the DLQ as it is when the command starts.")
    dqs = dq.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common():
        return [tenant_option("the tenant whose T.dlq to read", required=True),
                timeout_option(120.0, "seconds for the whole command (default 120)"), json_option()]

    limit = options()
    limit.add_argument("--limit", type=int, default=100, help="the newest N (default 100; 0: all)")
    command(dqs, "list", cmd_dlq, [_filters(replay=False), limit, *common()],
            help="one row per dead letter, newest last",
            description="One row per dead letter: its PARTITION:OFFSET in T.dlq, reason, time (UTC), "
                        "source and detail. --json: one JSON object per line.")
    dqw = command(dqs, "show", cmd_dlq, common(),
                  help="one dead letter, whole (original decoded)",
                  description="The whole record at PARTITION:OFFSET (as 'dlq list' names it), the original "
                              "decoded from base64 when needed, and where a replay would publish it.")
    dqw.add_argument("ref", metavar="PARTITION:OFFSET")
    how = options()
    how.add_argument("--all", action="store_true", help="every dead letter, whatever its reason")
    how.add_argument("--dry-run", action="store_true", help="list what would be published and where; publish nothing")
    how.add_argument("--gateway-option", action="append", default=[], metavar="KEY=VALUE",
                     help="translation option for rate-limited gateway bodies, e.g. dedup_by=group (as the "
                          "integration was created with; dead letters do not record it)")
    command(dqs, "replay", cmd_dlq, [how, _filters(replay=True), *common()],
            help="re-publish matching dead letters (idempotent)",
            description="Re-publish the dead letters that match, oldest first, with acks=all: "
                        "intake rejections and processing errors to T.intake (keyed by dedup key), "
                        "timer processing errors to T.timers, rate-limited gateway bodies translated "
                        "again to T.intake. Records without an original are skipped. A message still "
                        "invalid is dead-lettered again; one whose event id was seen has no effect.")
