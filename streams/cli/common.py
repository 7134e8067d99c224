"""What the command modules share: the parent parsers of the common options, and argument helpers.

The common options are defined once, here, as parent parsers
(``argparse``'s ``parents=``): ``--tenant`` (:func:`tenant_option`),
``--timeout`` (:func:`timeout_option`), ``--json`` (:func:`json_option`).
A command lists its parents in the order its ``--help`` shows its options;
its own options that come before a common one are a parent too
(:func:`options`).
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence
from urllib.parse import urlparse

import orjson

from streams.config import ConfigError, load_tenants
from streams.console import EXIT_USAGE, CliError
from streams.settings import Settings

TENANT_DEFAULT = "default: TENANT_NAME, else case-management"
TENANT_ALL = "one tenant (default: all tenants)"


def options() -> argparse.ArgumentParser:
    """An empty parent parser, for a command's own options placed among the common ones."""
    return argparse.ArgumentParser(add_help=False)


def tenant_option(help: str = TENANT_DEFAULT, *, required: bool = False) -> argparse.ArgumentParser:
    """``--tenant T``: the tenant a command is about."""
    p = options()
    p.add_argument("--tenant", required=required, help=help)
    return p


def timeout_option(default: float | None, help: str | None = None) -> argparse.ArgumentParser:
    """``--timeout SECONDS``: how long a command waits for its service."""
    p = options()
    p.add_argument("--timeout", type=float, default=default, help=help)
    return p


def json_option(help: str | None = None) -> argparse.ArgumentParser:
    """``--json``: machine-readable output."""
    p = options()
    p.add_argument("--json", action="store_true", help=help)
    return p


def command(sub, name: str, func: Callable, parents: Sequence[argparse.ArgumentParser] = (),
            **kwargs) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` (``kwargs``: help, description, epilog) run by ``func(args, settings)``."""
    p = sub.add_parser(name, parents=list(parents), **kwargs)
    p.set_defaults(func=func)
    return p


# --------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------


def tenants_of(settings: Settings, tenant: str | None) -> list[str]:
    """``--tenant`` of a command for one tenant or all: the tenants it is about."""
    tenants = load_tenants(settings.tenants_file)
    if tenant is None:
        return sorted(tenants)
    if tenant not in tenants:
        raise ConfigError(f"unknown tenant '{tenant}'; configured tenants are: {', '.join(sorted(tenants))}")
    return [tenant]


def key_values(items: list[str]) -> dict:
    """``--option key=value`` (and ``--gateway-option``): the value as JSON when it is JSON
    (5, true, [..]), else as a string."""
    out: dict = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise CliError(f"--option: key=value, e.g. dedup_by=group, got {item!r}", EXIT_USAGE)
        if k in out:
            raise CliError(f"--option: {k!r} given twice", EXIT_USAGE)
        try:
            out[k] = orjson.loads(v)
        except orjson.JSONDecodeError:
            out[k] = v
    return out


def safe_dsn(dsn: str) -> str:
    """A PostgreSQL DSN as errors show it: host and port, never the credentials."""
    u = urlparse(dsn)
    return f"{u.hostname}:{u.port or 5432}"
