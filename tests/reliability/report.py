"""The reliability suite's report: one line per scenario run, and the results file.

Every scenario test ends with ``record(Report(...))`` and then asserts
``report.lost == report.doubled == report.divergent == 0`` (``Report.assert_clean``).
``record`` prints the line (``reliability: {...}``, visible with ``-s`` or on failure)
and, when ``CASESTREAM_RELIABILITY_OUT`` names a file, appends it there as JSON: the
bench-style command ``bench/reliability.py`` runs the suite with that set (and a
larger ``CASESTREAM_RELIABILITY_SCALE``) and writes ``tests/reliability/RESULTS.md``
from the lines.

``scale(n)``: a scenario's size in events, ``n`` in CI, multiplied by
``CASESTREAM_RELIABILITY_SCALE`` (default 1) for the longer recorded runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

OUT_ENV = "CASESTREAM_RELIABILITY_OUT"
SCALE_ENV = "CASESTREAM_RELIABILITY_SCALE"


def scale(n: int) -> int:
    """``n`` events in CI; ``n`` times ``CASESTREAM_RELIABILITY_SCALE`` in a recorded run."""
    return max(1, int(n * float(os.environ.get(SCALE_ENV, "1"))))


def rss_mib(pid: int, field: str = "VmHWM") -> float | None:
    """The peak resident set (VmHWM; ``field="VmRSS"``: the current one) of process ``pid`` in MiB;
    None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakRss:
    """The highest peak RSS seen over the processes sampled (workers come and go: a killed
    worker's last sample counts)."""

    def __init__(self) -> None:
        self.peak: float | None = None

    def sample(self, *pids: int | None) -> float | None:
        for pid in pids:
            if pid is None:
                continue
            v = rss_mib(pid)
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v
        return self.peak


@dataclass
class Report:
    scenario: str          # e.g. "1 sigkill worker x3"
    engine: str            # the engine profile the run used ("apache", "standin", "external")
    events_in: int         # inputs sent and acknowledged (or requests made, for the gateway scenarios)
    effects_out: int       # effects observed: distinct domain events, relay records, deliveries, rows...
    lost: int              # acknowledged inputs with no effect
    doubled: int           # effects present twice
    divergent: int         # cases (or items) whose final state differs from the oracle's
    duration_s: float
    peak_rss_mib: float | None = None
    notes: str = ""        # anything the figures need to be read right (kills made, outage length...)
    at: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.doubled == 0 and self.divergent == 0

    def assert_clean(self, detail: str = "") -> None:
        assert self.clean, f"{self.line()}\n{detail}"

    def line(self) -> str:
        return "reliability: " + orjson.dumps(asdict(self)).decode()


def record(report: Report) -> Report:
    """Print the report's line and append it to ``CASESTREAM_RELIABILITY_OUT`` if set."""
    print("\n" + report.line())
    out = os.environ.get(OUT_ENV)
    if out:
        with open(out, "ab") as f:
            f.write(orjson.dumps(asdict(report)) + b"\n")
    return report
