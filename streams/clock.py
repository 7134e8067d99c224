"""The worker's clock: when is "now" for due timers. Injectable.

* ``system`` -- wall-clock time (production);
* ``file:<path>`` -- the epoch milliseconds written in ``<path>`` (wall-clock
  time while the file is absent or empty). Tests drive a worker subprocess
  with it: writing ``now + 30 min`` makes a 30-minute escalation step due at
  once, with no sleeping and nothing else changed.

Only the timer scheduler asks the clock. Decisions never do: an intake
message's time is its Kafka record timestamp and a fired timer's time is its
due time, so replays decide identically.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def __repr__(self) -> str:
        return "SystemClock()"


class FileClock:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def now_ms(self) -> int:
        # read every time (asked once per scheduler tick): no stale cache
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            text = ""
        return int(text) if text else time.time_ns() // 1_000_000

    def set(self, ms: int) -> None:
        """Move this clock (writes the file atomically)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(int(ms)))
        os.replace(tmp, self.path)

    def __repr__(self) -> str:
        return f"FileClock({str(self.path)!r})"


def make_clock(spec: str) -> SystemClock | FileClock:
    if spec in ("", "system"):
        return SystemClock()
    if spec.startswith("file:") and len(spec) > 5:
        return FileClock(spec[5:])
    raise ValueError(f"CASESTREAM_CLOCK={spec!r}: use 'system' or 'file:<path>'")
