"""The one small interface every sink sits behind, and its retry policy.

A sink receives batches of decoded domain events with their Kafka
coordinates. ``write_batch`` stores the whole batch, except the records the
server refuses for good (a document the index rejects whatever the retry),
which it returns as ``Rejected`` for the caller to dead-letter; it raises on
anything else. While the sink's server is unreachable, stopping, overloaded
or busy it retries with capped exponential backoff and does not return, so
the agent feeding it pauses (backpressure) instead of dropping or crashing,
and catches up by itself when the server is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, TypeVar

log = logging.getLogger("casestream.sinks")
T = TypeVar("T")


@dataclass(frozen=True)
class SinkRecord:
    topic: str
    partition: int
    offset: int
    event: dict


@dataclass(frozen=True)
class Rejected:
    """A record the sink's server refused for good, and why (one line, the server's words)."""

    record: SinkRecord
    reason: str


class Sink(Protocol):
    name: str

    async def open(self) -> None: ...

    async def write_batch(self, records: list[SinkRecord]) -> list[Rejected]: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter; ``attempts=None`` retries forever."""

    initial: float = 0.2
    cap: float = 30.0
    attempts: int | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.initial * (2 ** attempt)))

    async def run(self, what: str, fn: Callable[[], Awaitable[T]],
                  retry_on: tuple[type[BaseException], ...]) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except retry_on as exc:
                if self.attempts is not None and attempt + 1 >= self.attempts:
                    raise
                delay = self.delay(attempt)
                log.warning("%s failed (%s: %s); retrying in %.1fs (attempt %d)",
                            what, exc.__class__.__name__, exc, delay, attempt + 1)
                await self.sleep(delay)
                attempt += 1
