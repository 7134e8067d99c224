"""The reliability suite at a larger scale, its figures written to tests/reliability/RESULTS.md.

    .venv/bin/python bench/reliability.py [--engines apache|standin] [--scale 20] [-k EXPR]
    .venv/bin/python bench/reliability.py --soak [1000000] [--engines ...]

Runs ``pytest tests/reliability`` (the engines are the test suite's own: ``CASESTREAM_ENGINES``)
with ``CASESTREAM_RELIABILITY_SCALE`` set to ``--scale`` (every scenario's size multiplied by it)
and ``CASESTREAM_RELIABILITY_OUT`` naming a temporary file each scenario appends its report line
to (``tests/reliability/report.py``), printing pytest's output as it comes; then puts a table of
the run -- scenario, events in, effects out, lost, doubled, divergent, duration, peak RSS, notes --
with the machine, the engines, the date and the command at the top of RESULTS.md (earlier runs
stay below it). Exits with pytest's status.

``--soak [N]``: the soak run instead (not in CI): scenario 1 alone with N events (default
1 000 000) through one worker killed ten times along the way (``test_kills.py::test_soak``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_engines import add_engines_arg  # noqa: E402

RESULTS = ROOT / "tests" / "reliability" / "RESULTS.md"
INTRO = """# Reliability suite: results

Written by `bench/reliability.py` (`make reliability-report`): the reliability suite
(`tests/reliability`, issue 11 §4) at a larger scale than in CI, one table per run, newest first.
*lost*: acknowledged inputs with no effect; *doubled*: effects present twice; *divergent*: cases
whose final state differs from the oracle's (in the log, either projection or a relay topic).
The definitions are in `tests/reliability/checker.py`; every scenario asserts 0 / 0 / 0.
"""
COLUMNS = ("scenario", "events in", "effects out", "lost", "doubled", "divergent", "duration", "peak RSS", "notes")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    mem = next((int(line.split()[1]) // (1024 * 1024) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    return f"{os.cpu_count()} cores ({model}), {mem} GiB, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def spaced(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def row(r: dict) -> str:
    rss = f"{r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else "-"
    cells = (r["scenario"], spaced(r["events_in"]), spaced(r["effects_out"]),
             r["lost"], r["doubled"], r["divergent"], f"{r['duration_s']:.0f} s", rss,
             str(r.get("notes") or "").replace("|", "/").replace("\n", " "))
    return "| " + " | ".join(str(c) for c in cells) + " |"


def section(reports: list[dict], *, engines: str, command: str, summary: str, label: str) -> str:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"## {date}: {label}", "",
             f"machine: {machine()}  ", f"engines: {engines}  ", f"command: `{command}`  ", f"pytest: {summary}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += [row(r) for r in reports] or ["| (no scenario reported) |" + " |" * (len(COLUMNS) - 1)]
    return "\n".join(lines) + "\n"


def update_results(text: str) -> None:
    """The new run's section first, under the introduction; earlier runs kept below."""
    old = RESULTS.read_text() if RESULTS.exists() else INTRO
    head, sep, rest = old.partition("\n## ")
    RESULTS.write_text(head.rstrip("\n") + "\n\n" + text + ("\n## " + rest if sep else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_engines_arg(ap)
    ap.add_argument("--scale", type=float, default=20.0,
                    help="multiply every scenario's size by this (CI runs scale 1; default 20)")
    ap.add_argument("--soak", nargs="?", type=int, const=1_000_000, default=None, metavar="EVENTS",
                    help="the soak run instead: scenario 1 alone with EVENTS events (default 1000000), ten kills")
    ap.add_argument("-k", dest="select", default=None, help="only the scenarios pytest -k selects")
    args = ap.parse_args()

    out = Path(tempfile.mkstemp(prefix="casestream-reliability-", suffix=".jsonl")[1])
    basetemp = Path(tempfile.mkdtemp(prefix="casestream-reliability-"))   # pytest's tmp_path, ours alone
    env = dict(os.environ, CASESTREAM_RELIABILITY_OUT=str(out), CASESTREAM_RELIABILITY_SCALE=str(args.scale))
    if args.engines:
        env["CASESTREAM_ENGINES"] = args.engines
    target = "tests/reliability"
    # pytest-timeout: the CI limit per test (pyproject) grows with the size; none for the soak
    timeout = 0 if args.soak else int(300 * max(1.0, args.scale))
    if args.soak:
        env["CASESTREAM_RELIABILITY_SOAK"] = str(args.soak)
        target = "tests/reliability/test_kills.py::test_soak"
    cmd = [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "-o", f"timeout={timeout}",
           f"--basetemp={basetemp}", target]
    if args.select:
        cmd += ["-k", args.select]
    shown = " ".join(["bench/reliability.py"] + sys.argv[1:])
    print(f"running: {' '.join(cmd[2:])}  (scale {args.scale:g}, results to {RESULTS.relative_to(ROOT)})", flush=True)
    started = time.monotonic()
    engines, summary = args.engines or env.get("CASESTREAM_ENGINES") or "default", ""
    try:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        # stopped (timeout, kill): pytest is interrupted, so that its fixtures stop the engines and workers
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGINT))
        for line in proc.stdout:   # progress: pytest's own output, with the time since the start
            print(f"[{time.monotonic() - started:6.0f} s] {line}", end="", flush=True)
            if line.startswith("engines: "):
                engines = line.removeprefix("engines: ").strip()
            if " passed" in line or " failed" in line or " error" in line:
                summary = line.strip("= \n")
        code = proc.wait()
        reports = [orjson.loads(x) for x in out.read_bytes().splitlines() if x.strip()]
    finally:
        out.unlink(missing_ok=True)
        shutil.rmtree(basetemp, ignore_errors=True)
    label = f"soak, {spaced(args.soak)} events" if args.soak else f"scale {args.scale:g}"
    engine = reports[0]["engine"] if reports else (args.engines or "?")
    update_results(section(reports, engines=engines, command=shown,
                           summary=f"{summary or 'no summary'} (exit {code}, {time.monotonic() - started:.0f} s)",
                           label=f"{engine}, {label}"))
    print(f"{len(reports)} scenario(s) written to {RESULTS}; pytest exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
