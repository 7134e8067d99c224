"""``casestream worker``: the Faust worker of one tenant (``streams/app.py``, ``agents/``)."""

from __future__ import annotations

import logging
import os

from streams.cli.common import command, tenant_option
from streams.config import get_tenant
from streams.console import EXIT_OK
from streams.settings import Settings


def cmd_worker(args, settings: Settings) -> int:
    import faust

    from streams import metrics
    from streams.app import create_app
    from streams.health import ShutdownDeadline

    tenant = args.tenant or settings.tenant_name
    get_tenant(tenant, settings.tenants_file)  # unknown tenant: clear error before anything starts
    topo = create_app(settings, tenant, instance_id=args.instance_id,
                      role=args.role or os.environ.get("CASESTREAM_ROLE", "all"))
    port = args.metrics_port if args.metrics_port is not None else int(os.environ.get("CASESTREAM_METRICS_PORT", "0"))
    if port:
        metrics.serve(port)

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


def add_worker(sub) -> None:
    w = command(sub, "worker", cmd_worker,
                [tenant_option("tenant to serve (default: TENANT_NAME, else case-management)")],
                help="run the stream worker of one tenant",
                description="Run the Faust worker of one tenant (intake -> domain events).")
    w.add_argument("--instance-id", help="static group membership id; keep it stable across restarts "
                                         "(default: <tenant>-<hostname>-<hash of its store directory>)")
    w.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port "
                                                    "(default: CASESTREAM_METRICS_PORT, else off)")
    w.add_argument("--role", choices=["all", "intake", "projections"],
                   help="all (default; CASESTREAM_ROLE): intake and projections in one process; intake: route + "
                        "apply; projections: the sink agents only, in their own consumer group")
    w.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
