"""What the commands print and how they end: tables, indented JSON, exit codes, the command error.

Shared by the CLI (``streams/cli/``) and the demo (``streams/demo.py``), so
neither imports the other for it. Imports: orjson only.

Exit codes: 0 success; 1 a service failed or could not be reached;
2 bad usage or invalid configuration; 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A command failed: ``casestream: <message>`` on stderr, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def print_table(rows: list[dict], columns: list[str], out=None) -> None:
    out = out or sys.stdout
    if not rows:
        print("(none)", file=out)
        return
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip(), file=out)
    for r in rows:
        print("  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns).rstrip(), file=out)


def cell(v: Any) -> str:
    """A value as a table shows it: ``-`` for None, yes/no, lists comma-separated."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def emit_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
