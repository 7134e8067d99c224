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


class ShutdownDeadline:
    """A graceful stop that does not finish in ``seconds`` ends the process anyway.

    Faust stops a worker by flushing its producer and committing; a producer
    that can never flush (a batch with no leader, a broker gone for good)
    would keep a SIGTERMed worker alive for ever, and a supervisor waiting
    for it with it. ``start()`` arms a timer thread (it runs even if the
    event loop is stuck); ``exit`` is called with a message when it fires
    (``os._exit``-like: the default ends the process with ``code``)."""

    def __init__(self, seconds: float, code: int = 1, exit=None, log=None):
        import threading

        self.seconds = seconds
        self.code = code
        self._exit = exit
        self._log = log
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        import threading

        with self._lock:
            if self._timer is not None or self.seconds <= 0:
                return
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    def _fire(self) -> None:
        message = (f"shutdown did not finish within {self.seconds:g} s (CASESTREAM_SHUTDOWN_SECONDS); "
                   f"exiting with code {self.code}: uncommitted input is processed again by the next owner")
        if self._log is not None:
            self._log.error(message)
            for handler in __import__("logging").getLogger().handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
        if self._exit is not None:
            self._exit(self.code, message)
        else:
            import os

            os._exit(self.code)


class CommitWatch:
    """Partitions whose commit is stuck behind records that were read but never processed.

    A record handed to Faust's streams must be processed and acknowledged
    before its partition's offset can be committed past it. Around a
    rebalance faust-streaming can lose such a record inside the worker (read,
    then dropped with the stream buffers, and not fetched again): the
    partition's commit then waits for it for ever, and it is never applied.
    ``observe`` is given, per partition, the committed offset, the last read
    offset and whether any record of it is being processed; a partition whose
    commit has not moved for ``seconds`` although records past it were read and
    none is in flight is returned once, to be read again from its committed
    offset (processing is idempotent: what was applied is recognised)."""

    def __init__(self, seconds: float = 15.0):
        self.seconds = seconds
        self._since: dict = {}   # partition -> (committed offset, since when)

    def observe(self, now: float, partitions: Mapping) -> list:
        stuck = []
        for tp, (committed, read, in_flight) in partitions.items():
            # ``read`` is the offset of the last record handed over (or, right after a seek, the
            # offset sought to); ``committed`` the next offset to read: beyond it means handed over
            behind = committed is not None and read is not None and read > committed and not in_flight
            if not behind:
                self._since.pop(tp, None)
                continue
            seen = self._since.get(tp)
            if seen is None or seen[0] != committed:
                self._since[tp] = (committed, now)
            elif now - seen[1] >= self.seconds:
                stuck.append(tp)
                self._since[tp] = (committed, now)  # once per period, if reading again does not help
        for tp in list(self._since):
            if tp not in partitions:
                del self._since[tp]
        return stuck
