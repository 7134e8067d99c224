"""``casestream send`` (intake lines to ``T.intake``) and ``casestream tail`` (``T.domain-events``, ``T.dlq``).

The Kafka I/O is ``streams.messages`` and ``streams.kafka``'s.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from streams import kafka
from streams.cli.common import command, tenant_option, timeout_option
from streams.config import get_tenant, load_topics
from streams.console import EXIT_OK, EXIT_USAGE, CliError
from streams.messages import decode_record, send_lines
from streams.settings import Settings


def read_lines(path: str) -> list[bytes]:
    """The intake lines of a file (``-``: stdin): blank lines and ``#`` comments left out."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    return [ln.strip() for ln in data.splitlines() if ln.strip() and not ln.lstrip().startswith(b"#")]


def cmd_send(args, settings: Settings) -> int:
    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file)
    topic = load_topics(tenant.name, settings.topics_file).name("intake")
    lines = read_lines(args.file)
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


async def tail(bootstrap: str, topic: str, *, from_beginning: bool, max_messages: int | None,
               idle_timeout: float | None, on_message) -> int:
    """Read every partition of ``topic`` without a consumer group (:func:`streams.kafka.follow`)."""
    async with kafka.started_consumer(bootstrap, auto_offset_reset="earliest" if from_beginning else "latest") as c:
        tps = await kafka.partitions_of(c, topic)
        if not tps:
            raise CliError(kafka.missing_topic(topic))
        return await kafka.follow(c, tps, from_beginning=from_beginning, max_messages=max_messages,
                                  idle_timeout=idle_timeout, on_message=on_message)


def cmd_tail(args, settings: Settings) -> int:
    tenant = get_tenant(args.tenant or settings.tenant_name, settings.tenants_file)
    topic = load_topics(tenant.name, settings.topics_file).name(args.topic)

    def show(rec) -> None:
        sys.stdout.write(orjson.dumps(decode_record(rec, args.topic)).decode() + "\n")
        sys.stdout.flush()

    try:
        asyncio.run(tail(settings.kafka_bootstrap_servers, topic, from_beginning=args.from_beginning,
                         max_messages=args.max, idle_timeout=args.idle_timeout, on_message=show))
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"reading {topic} failed: {exc.__class__.__name__} {exc}") from None
    return EXIT_OK


def add_send(sub) -> None:
    sn = command(sub, "send", cmd_send, [tenant_option(), timeout_option(60.0)],
                 help="publish JSON lines to a tenant's intake topic",
                 description="Publish JSON lines (one intake message per line) to T.intake, keyed by "
                             "dedup key; prints each dedup key.")
    sn.add_argument("file", nargs="?", default="-", help="file of JSON lines, or - for stdin (default)")


def add_tail(sub) -> None:
    tl = command(sub, "tail", cmd_tail, [tenant_option()],
                 help="print a tenant's domain events or dead letters, decoded",
                 description="Print decoded messages of T.domain-events or T.dlq, one JSON per line.")
    tl.add_argument("--topic", choices=["domain-events", "dlq"], default="domain-events")
    tl.add_argument("--from-beginning", action="store_true", help="start at the oldest message (default: new only)")
    tl.add_argument("--max", type=int, help="stop after this many messages")
    tl.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a message")
