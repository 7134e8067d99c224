"""Stall detection for a worker's consumer: pure, driven by observations.

A worker is *stalled* when input has been waiting (lag > 0) for longer than
the limit and its streams have read nothing new meanwhile, outside
recovery/rebalancing. An idle worker (lag 0) is never stalled, however long
ago it last read.
The worker feeds an observation every few seconds; what to do about a stall
(exit for the supervisor) is the caller's business.
"""

from __future__ import annotations

from typing import Mapping


def input_lag(end_offsets: Mapping[str, int], read_offsets: Mapping[str, int | None],
              committed: Mapping[str, int | None]) -> int:
    """Messages waiting per the end offsets, beyond what was read or committed."""
    total = 0
    for tp, end in end_offsets.items():
        read = read_offsets.get(tp)
        position = max((read + 1) if read is not None else 0, committed.get(tp) or 0)
        total += max(0, end - position)
    return total


class StallDetector:
    def __init__(self, limit_seconds: float, now: float):
        self.limit = limit_seconds
        self.last_progress = now
        self.last_read: dict | None = None

    def observe(self, read_offsets: Mapping[str, int | None], lag: int | None, *,
                recovering: bool, now: float) -> bool:
        """Record one observation; True when the consumer counts as stalled."""
        read = dict(read_offsets)
        # progress: something was read, or nothing waits (the limit counts from
        # when input started waiting, not from the last read of an idle worker)
        if recovering or read != self.last_read or lag == 0:
            self.last_progress = now
        self.last_read = read
        return bool(lag) and not recovering and self.stalled_for(now) > self.limit

    def stalled_for(self, now: float) -> float:
        return now - self.last_progress
