"""The one small interface every sink sits behind, its retry policy, and the
base of the case projections.

A sink receives batches of decoded domain events with their Kafka
coordinates. ``write_batch`` stores the whole batch, except the records the
server refuses for good (a document the index rejects whatever the retry),
which it returns as ``Rejected`` for the caller to dead-letter; it raises on
anything else. While the sink's server is unreachable, stopping, overloaded
or busy it retries with capped exponential backoff and does not return, so
the agent feeding it pauses (backpressure) instead of dropping or crashing,
and catches up by itself when the server is back.

:class:`BatchingSink` is what both case projections (``sinks/postgres.py``,
``sinks/elasticsearch.py``) share: open on demand, every open and write
attempt under the ``Backoff``, and the per-case fold of a batch onto the
stored states (:meth:`BatchingSink.fold_batch`: group by case, one event per
version, drop the versions already stored, fill a version gap from the
sink's own history, fold the gapless run with the domain's ``apply``). A
projection keeps only its own reading and writing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, TypeVar

from streams.domain.cases import apply

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


# --------------------------------------------------------------------------
# the case projections' base
# --------------------------------------------------------------------------


@dataclass
class CaseEvents:
    """One case's events in a batch that its stored state lacks (one per version)."""

    case_id: str
    stored: dict | None                                           # the state the sink holds (None: none)
    events: dict[int, dict] = field(default_factory=dict)         # version -> event above the stored version
    records: dict[int, SinkRecord] = field(default_factory=dict)  # version -> the batch's record of it

    @property
    def stored_version(self) -> int:
        return self.stored["version"] if self.stored else 0

    @property
    def last(self) -> SinkRecord:
        """The batch's record of the newest event (the events in between sit below it in the log)."""
        return self.records[max(self.records)]

    def gapless(self) -> bool:
        v = self.stored_version
        return sorted(self.events) == list(range(v + 1, v + 1 + len(self.events)))

    def add(self, events) -> None:
        """Events found elsewhere (the sink's history): those above the stored version not held yet."""
        for e in events:
            if e["version"] > self.stored_version:
                self.events.setdefault(e["version"], e)


@dataclass(frozen=True)
class Folded:
    """A case's state after the events of a batch (and of its history) that follow its stored state."""

    case_id: str
    stored: dict | None
    state: dict | None             # the stored state when nothing followed it
    records: list[SinkRecord]      # the batch's records folded into ``state``
    missing: int | None = None     # the first version neither the batch nor the history had (None: all folded)
    repaired: bool = False         # a version gap the history filled

    @property
    def changed(self) -> bool:
        return self.state is not self.stored


def pending_cases(records: list[SinkRecord], stored: dict[str, dict | None]) -> list[CaseEvents]:
    """Per case (in case id order), the batch's events above its stored state. A batch may hold an
    event twice (Kafka redelivers at least once): one per version, so a repeat cannot end a fold early."""
    by_case: dict[str, CaseEvents] = {}
    for r in records:
        cid = r.event["case_id"]
        case = by_case.get(cid)
        if case is None:
            case = by_case[cid] = CaseEvents(cid, stored.get(cid))
        v = r.event["version"]
        if v > case.stored_version:
            case.events.setdefault(v, r.event)
            case.records.setdefault(v, r)
    return [by_case[cid] for cid in sorted(by_case) if by_case[cid].events]


def fold_case(tenant, case: CaseEvents, repaired: bool = False) -> Folded:
    """Fold ``case``'s events onto its stored state, in version order, up to the first version missing."""
    state, used = case.stored, []
    for v in sorted(case.events):
        expected = (state["version"] if state else 0) + 1
        if v != expected:
            return Folded(case.case_id, case.stored, state, used, missing=expected, repaired=repaired)
        state = apply(tenant, state, case.events[v])
        if v in case.records:
            used.append(case.records[v])
    return Folded(case.case_id, case.stored, state, used, repaired=repaired)


class BatchingSink:
    """A case projection: open on demand, backoff around every attempt, the per-case fold.

    A subclass sets ``name``, ``tenant`` and ``backoff`` and supplies ``target`` (what it writes
    to, for log lines), ``is_open``, ``retryable`` (the errors worth another attempt),
    ``connect`` (one attempt at opening) and ``write_once`` (one attempt at a batch, which
    usually calls :meth:`fold_batch`)."""

    name = "sink"
    tenant = None
    backoff: Backoff

    @property
    def target(self) -> str:
        raise NotImplementedError

    def is_open(self) -> bool:
        raise NotImplementedError

    def retryable(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    async def connect(self) -> None:
        raise NotImplementedError

    async def write_once(self, records: list[SinkRecord]) -> list[Rejected]:
        raise NotImplementedError

    async def open(self) -> None:
        await self.backoff.run(f"{self.name} open {self.target}", self.connect, self.retryable())

    async def write_batch(self, records: list[SinkRecord]) -> list[Rejected]:
        if not records:
            return []
        if not self.is_open():
            await self.open()
        return await self.backoff.run(f"{self.name} write to {self.target}", lambda: self.write_once(records),
                                      self.retryable()) or []

    async def fold_batch(self, records: list[SinkRecord],
                         load: Callable[[list[str]], Awaitable[dict[str, dict]]],
                         fill: Callable[[list[CaseEvents]], Awaitable[None]]) -> list[Folded]:
        """Every case of ``records`` with events its stored state lacks, folded: ``load`` reads the
        stored states of case ids (absent: none), ``fill`` adds to the cases with a version gap the
        events in between (``CaseEvents.add``) from the sink's history, as far as it has them."""
        cases = pending_cases(records, await load(sorted({r.event["case_id"] for r in records})))
        gaps = [c for c in cases if not c.gapless()]
        if gaps:
            await fill(gaps)
        gap_ids = {c.case_id for c in gaps}
        return [fold_case(self.tenant, c, repaired=c.case_id in gap_ids and c.gapless()) for c in cases]
