"""``casestream api``: the HTTP service (``streams/api.py``): the intake gateway and the analyst's view."""

from __future__ import annotations

import os
import sys

from streams.cli.common import command
from streams.config import load_tenants
from streams.console import EXIT_OK
from streams.settings import Settings


def cmd_api(args, settings: Settings) -> int:
    from aiohttp import web

    from streams.api import create_api

    print(f"casestream api on http://{args.host}:{args.port}, routes {args.routes} (tenants: "
          f"{', '.join(sorted(load_tenants(settings.tenants_file)))})", file=sys.stderr, flush=True)
    web.run_app(create_api(settings, args.routes), host=args.host, port=args.port, print=None, access_log=None)
    return EXIT_OK


def add_api(sub) -> None:
    ap = command(sub, "api", cmd_api,
                 help="serve the HTTP API: the intake gateway and the analyst's view",
                 description="A stateless HTTP service for every tenant: the intake gateway (monitors "
                             "post alerts: /v2/enqueue, /v1/integrations/<key>/<kind>) and the analyst's "
                             "view (search, case, timeline, analytics). Run several behind a load balancer. "
                             "GET /openapi.json describes every route.")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--routes", choices=["all", "intake", "query"], default=os.environ.get("CASESTREAM_API_ROUTES", "all"),
                    help="all (default), intake (the gateway only) or query (the analyst's view only)")
