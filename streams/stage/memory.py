"""The apply stage over dicts: :class:`~streams.stage.apply.ApplyBatch`, one input per batch.

What the ``apply`` agent does over its tables (``keys``, ``case_keys``,
``timers``), with the tables as dicts and due timers fired on request
(:meth:`MemoryStage.advance`) instead of by a clock. It runs the agent's
code path -- decisions, relay copies, delivery requests, recorded outputs,
redelivery, timers index -- and keeps the outputs of its last input
(``last``). Used by the unit tests, the demo's expectations, the in-process
benchmark and the reliability checker's model.

Imports: see ``streams/stage/__init__.py`` (no Faust, no clients).
"""

from __future__ import annotations

from streams.config import Tenant
from streams.domain.cases import Decision
from streams.domain.intake import Intake
from streams.domain.oncall import pending_timers
from streams.stage.apply import ApplyBatch, Step, Table, Write


class MemoryStage:
    """``entries`` (dedup key -> entry), ``index`` (case id -> dedup key) and ``timers`` (timer id
    -> pending timer) are the tables; ``relay_ready``: the subscriptions whose relay topic exists
    (None: all of them)."""

    def __init__(self, tenant: Tenant, oncall=None, relay_ready=None):
        self.tenant = tenant
        self.oncall = oncall
        self.relay_ready = relay_ready
        self.entries: dict[str, dict] = {}
        self.index: dict[str, str] = {}
        self.timers: dict[str, dict] = {}
        self.last: Step | None = None

    def batch(self) -> ApplyBatch:
        """A batch over these dicts (several inputs may go through one; then ``write`` its writes)."""
        return ApplyBatch(self.tenant, self.oncall, get_entry=self.entries.get, get_dedup_key=self.index.get,
                          has_timer=self.timers.__contains__, relay_ready=self.relay_ready)

    def write(self, writes: list[Write]) -> None:
        tables = {Table.KEYS: self.entries, Table.CASE_KEYS: self.index, Table.TIMERS: self.timers}
        for w in writes:
            if w.data is None:
                tables[w.table].pop(w.key, None)
            else:
                tables[w.table][w.key] = w.data

    def apply(self, intake: Intake, offset: int | None = None, *, source: dict | None = None,
              original: bytes | None = None) -> Step:
        """One intake message as one batch (``offset``: of its routed record; None: never a
        redelivery)."""
        batch = self.batch()
        self.last = batch.apply_intake(intake, offset, source=source, original=original)
        self.write(batch.writes())
        return self.last

    def handle(self, intake: Intake, offset: int | None = None, **kw) -> Decision:
        """:meth:`apply`, answering the domain decision."""
        return self.apply(intake, offset, **kw).decision

    def fire_step(self, timer: dict, offset: int | None = None) -> Step:
        """One ``T.timers`` record (a due timer or a delivery outcome) as one batch."""
        batch = self.batch()
        self.last = batch.fire(timer, offset)
        self.write(batch.writes())
        return self.last

    def fire(self, timer: dict, offset: int | None = None) -> Decision:
        return self.fire_step(timer, offset).decision

    def pending(self) -> list[dict]:
        """Every pending timer of the entries, soonest first."""
        timers = [t for e in self.entries.values() for t in pending_timers(e).values()]
        return sorted(timers, key=lambda t: (t["due_at"], t["timer_id"]))

    def advance(self, now_ms: int) -> list[dict]:
        """Fire every timer due by ``now_ms`` (in due order, including timers
        that firing sets); the events they produced."""
        events: list[dict] = []
        while True:
            due = [t for t in self.pending() if t["due_at"] <= now_ms]
            if not due:
                return events
            events += self.fire(due[0]).events
