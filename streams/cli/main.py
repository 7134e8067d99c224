"""The ``casestream`` command line: the parser of every command, and :func:`main`.

Exit codes: 0 success; 1 a service failed or could not be reached;
2 bad usage or invalid configuration; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from streams.cli import api, demo, dlq, integrations, messages, oncall, query, replay, services, topics, worker
from streams.config import ConfigError
from streams.console import EXIT_INTERRUPTED, EXIT_USAGE, CliError
from streams.settings import load_settings

# in the order ``casestream --help`` lists them
COMMANDS = (services.add_services, topics.add_topics, worker.add_worker, messages.add_send, messages.add_tail,
            topics.add_db, query.add_case, api.add_api, query.add_search, query.add_analytics, replay.add_replay,
            replay.add_reindex, dlq.add_dlq, oncall.add_oncall, integrations.add_integrations, demo.add_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="casestream",
        description="Kafka-native event backbone for incident and case management.",
        epilog="Addresses come from KAFKA_BOOTSTRAP_SERVERS, ELASTICSEARCH_URL, POSTGRES_DSN; "
               "local data under CASESTREAM_DATA_DIR (default ./.casestream).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
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
