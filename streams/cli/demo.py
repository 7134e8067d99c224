"""``casestream demo``: the quick start end to end (``streams/demo.py``)."""

from __future__ import annotations

from streams.cli.common import command, json_option, options
from streams.settings import Settings


def cmd_demo(args, settings: Settings) -> int:
    from streams.demo import run_demo

    return run_demo(settings, follow=args.follow, as_json=args.json)


def add_demo(sub) -> None:
    follow = options()
    follow.add_argument("--follow", action="store_true", help="keep the workers running and print new changes")
    command(sub, "demo", cmd_demo, [follow, json_option()],
            help="services, topics, a worker per tenant, a demo feed; show the case changes",
            description="The quick start: local services up, topics, one worker per tenant, a "
                        "realistic alert feed for both tenants, and a table of what happened.")
