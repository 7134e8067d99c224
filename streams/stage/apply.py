"""The apply stage, without Faust: a batch of routed intake and due timers against the key entries.

:class:`ApplyBatch` is what the ``apply`` agent (``agents/intake.py``) runs
for each batch it takes from ``T.intake-routed`` and ``T.timers``. It reads
the tables through three plain callables -- the entry of a dedup key, the
dedup key of a case id (the ``case_keys`` index), whether a timer id is in
the ``timers`` index -- and never writes them: each input returns a
:class:`Step` (the domain decision, its typed outputs and their encoded
Kafka records), and :meth:`ApplyBatch.writes` returns the table writes of
the whole batch. :class:`~streams.stage.memory.MemoryStage` runs it over
dicts.

The rules it keeps (the crash analysis is in ``agents/intake.py``):

* within a batch each entry is read once; decisions see the results of
  earlier inputs of the batch; each touched entry is written once, whole,
  with the context (the caller's token, the agent's Faust event) of the last
  input that touched it;
* an input whose id the entry has seen has no effect -- unless it is the
  very record that applied it (same offset: a crash came before the
  commit), whose recorded outputs are re-sent verbatim and whose entry,
  timers index and case index are written again;
* a timer fires only while the entry holds it; a timer found fired or
  cancelled leaves the ``timers`` index;
* an input's outputs and records are all computed before the batch state
  changes: an input that raises leaves the batch as it was (the agent
  dead-letters it, and a replay after the fix applies it).

Imports: see ``streams/stage/__init__.py`` (no Faust, no clients).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import orjson

from streams.config import Tenant
from streams.domain import cases as domain
from streams.domain import notify as notifying
from streams.domain import oncall as paging
from streams.domain.intake import Intake
from streams.domain.relay import route_events
from streams.stage.outputs import (
    Message, Output, OutputKind, delivery_request, domain_event, from_recorded, messages, recorded, rejected,
    relay_copy,
)
from streams.stage.route import dead_letter


class Table(enum.Enum):
    KEYS = "keys"              # dedup key -> entry
    TIMERS = "timers"          # timer id -> pending timer (the index the scheduler scans)
    CASE_KEYS = "case_keys"    # case id -> dedup key (write-once)


@dataclass(frozen=True)
class Write:
    """One table write; ``data`` None deletes. ``context``: the token of the input it belongs to
    (the agent writes in that Faust event's partition context)."""

    table: Table
    key: str
    data: dict | str | None
    context: object = None

    @property
    def value(self) -> bytes | None:
        """The bytes stored."""
        if self.data is None:
            return None
        if self.table is Table.KEYS:
            # versioned: "applied" first in the bytes (streams/rebalance.py VersionedTable)
            return orjson.dumps({"applied": self.data.get("applied", 0), **self.data})
        if self.table is Table.TIMERS:
            return orjson.dumps(self.data)
        return self.data.encode()


@dataclass
class Step:
    """What one input did: the domain ``decision``, its ``outputs`` (for a redelivery: the recorded
    ones, re-sent) and their Kafka ``records``, in order."""

    decision: domain.Decision
    outputs: list[Output] = field(default_factory=list)
    records: list[Message] = field(default_factory=list)
    redelivered: bool = False

    @property
    def duplicate(self) -> bool:
        return self.decision.duplicate

    @property
    def events(self) -> list[dict]:
        """The domain events of this step (re-sent ones included)."""
        return [o.value for o in self.outputs if o.kind is OutputKind.DOMAIN]


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class ApplyBatch:
    """One batch of the apply stage. ``oncall``: the tenant's on-call configuration for the whole
    batch (None: no paging, relay or notifications); ``relay_ready``: the subscriptions whose relay
    topic exists (None: all); ``wall_ms``: the clock that stamps dead letters."""

    def __init__(self, tenant: Tenant, oncall=None, *, get_entry: Callable[[str], dict | None],
                 get_dedup_key: Callable[[str], str | None], has_timer: Callable[[str], bool],
                 relay_ready=None, wall_ms: Callable[[], int] = wall_clock_ms):
        self.tenant = tenant
        self.oncall = oncall
        self.get_entry, self.get_dedup_key, self.has_timer = get_entry, get_dedup_key, has_timer
        self.wall_ms = wall_ms
        subs = oncall.subscriptions if oncall is not None else ()
        self.subscriptions = [s for s in subs if relay_ready is None or s.id in relay_ready]
        self.cache: dict[str, dict | None] = {}           # dedup key -> entry, as of this batch
        self.stored_timers: dict[str, dict] = {}          # dedup key -> pending timers as stored
        self.applied_before: dict[str, int] = {}          # dedup key -> its "applied" count as stored
        self.dirty: dict[str, tuple[object, dict]] = {}   # dedup key -> (context, entry to write)
        self.new_index: dict[str, tuple[object, str]] = {}  # case id -> (context, dedup key)
        self.stale: dict[str, object] = {}                # timer ids fired or cancelled -> context

    # -- reads ----------------------------------------------------------------------------------

    def entry(self, dedup_key: str) -> dict | None:
        """The entry of ``dedup_key`` as this batch has it (read from the table once)."""
        if dedup_key not in self.cache:
            entry = self.cache[dedup_key] = self.get_entry(dedup_key)
            self.stored_timers[dedup_key] = paging.pending_timers(entry)
            self.applied_before[dedup_key] = (entry or {}).get("applied", 0)
        return self.cache[dedup_key]

    def dedup_key_of(self, case_id: str) -> str | None:
        return self.new_index[case_id][1] if case_id in self.new_index else self.get_dedup_key(case_id)

    # -- inputs ---------------------------------------------------------------------------------

    def apply_routed(self, envelope: dict, offset: int | None, context: object = None) -> Step:
        """A ``T.intake-routed`` record (the route stage's envelope, decoded) read at ``offset``."""
        return self.apply_intake(Intake.from_dict(envelope["intake"]), offset, context,
                                 source=envelope["source"], original=envelope["original"].encode("utf-8"))

    def apply_intake(self, intake: Intake, offset: int | None, context: object = None, *,
                     source: dict | None = None, original: bytes | None = None) -> Step:
        """An intake message. ``source``/``original``: the intake record, for its dead letter."""
        entry = domain.lookup(intake, self.entry, self.dedup_key_of)
        decision = domain.decide(self.tenant, intake, entry, self.oncall)
        if decision.duplicate:
            if not domain.is_redelivery(entry, intake.event_id, offset):
                return Step(decision)
            step = self._redelivered(decision, entry, intake.event_id)
            self._rewrite(entry, context)
            for o in step.outputs:
                if o.kind is OutputKind.DOMAIN and o.value["type"] == "CaseCreated":
                    self.new_index[o.value["case_id"]] = (context, entry["dedup_key"])
            return step
        outputs = self._outputs_of(entry, decision.events)
        if decision.rejection is not None:
            src = source or {"topic": None, "partition": None, "offset": offset}
            record = dead_letter(decision.rejection, src["topic"], src["partition"], src["offset"], original,
                                 intake.event_id)
            outputs.append(rejected(intake.dedup_key or intake.case_id, record))
        step = Step(decision, outputs, messages(outputs, self.wall_ms()))
        if decision.entry is not None:
            new = domain.remember(decision.entry, intake.event_id, recorded(outputs), offset)
            self._store(new, context)
            for case_id in decision.created:  # write-once index for commands by case id
                self.new_index[case_id] = (context, new["dedup_key"])
        return step

    def fire(self, timer: dict, offset: int | None, context: object = None) -> Step:
        """A ``T.timers`` record read at ``offset``: a due timer, or a delivery outcome."""
        entry = self.entry(timer["dedup_key"])
        at = f"timers:{offset}" if offset is not None else None
        delivery = timer.get("kind") == "delivery"
        if delivery:
            input_id = notifying.outcome_intake(self.tenant, timer).event_id
            decision = notifying.decide_outcome(self.tenant, timer, entry)
        else:
            input_id = paging.timer_intake(self.tenant, timer).event_id
            decision = paging.decide_timer(self.tenant, self.oncall, timer, entry)
        if decision.duplicate:
            step = Step(decision)
            if domain.is_redelivery(entry, input_id, at):
                step = self._redelivered(decision, entry, input_id)
                self._rewrite(entry, context)
            if not delivery and not paging.is_pending(entry, timer):
                # fired already: out of the index too (a crash may have lost that deletion, and
                # the scheduler would send it again every 30 s for ever)
                self.stale.setdefault(timer["timer_id"], context)
            return step
        if decision.entry is None:  # a delivery outcome with no case to record it on, or a timer
            if not delivery and not paging.is_pending(entry, timer):  # fired already or cancelled
                self.stale.setdefault(timer["timer_id"], context)
            return Step(decision)
        outputs = self._outputs_of(entry, decision.events)
        step = Step(decision, outputs, messages(outputs, self.wall_ms()))
        self._store(domain.remember(decision.entry, input_id, recorded(outputs), at), context)
        return step

    # -- the end of the batch -------------------------------------------------------------------

    def unflushed(self) -> tuple[dict[str, int], dict[str, int]]:
        """For ``UnflushedOutputs.add``: per key written, the inputs applied in this batch, and of
        how many inputs its new entry keeps the outputs."""
        applied = {key: entry.get("applied", 0) - self.applied_before.get(key, 0)
                   for key, (_ctx, entry) in self.dirty.items()}
        return applied, {key: len(entry["recent"]) for key, (_ctx, entry) in self.dirty.items()}

    def writes(self) -> list[Write]:
        """The batch's table writes, in order: per key written, its entry and its timers index
        changes; then the index deletions of timers fired or cancelled; then the case index."""
        out: list[Write] = []
        stale = dict(self.stale)
        written: set[str] = set()
        for key, (ctx, entry) in self.dirty.items():
            out.append(Write(Table.KEYS, key, entry, ctx))
            old, new = self.stored_timers.get(key, {}), paging.pending_timers(entry)
            for timer_id, timer in new.items():
                if old.get(timer_id) != timer:
                    out.append(Write(Table.TIMERS, timer_id, timer, ctx))
                    written.add(timer_id)
                stale.pop(timer_id, None)
            for timer_id in old.keys() - new.keys():
                stale[timer_id] = ctx
        for timer_id, ctx in stale.items():
            if timer_id in written or self.has_timer(timer_id):
                out.append(Write(Table.TIMERS, timer_id, None, ctx))
        for case_id, (ctx, key) in self.new_index.items():
            out.append(Write(Table.CASE_KEYS, case_id, key, ctx))
        return out

    # -- helpers --------------------------------------------------------------------------------

    def _redelivered(self, decision: domain.Decision, entry: dict, input_id: str) -> Step:
        """Kafka redelivering the record that applied ``input_id``: its recorded outputs, again."""
        outputs = from_recorded(domain.recorded_outputs(entry, input_id) or [])
        return Step(decision, outputs, messages(outputs, self.wall_ms()), redelivered=True)

    def _rewrite(self, entry: dict, context: object) -> None:
        """Write ``entry`` again, and its whole timers index (a crash may have lost them)."""
        self.dirty[entry["dedup_key"]] = (context, entry)
        self.stored_timers[entry["dedup_key"]] = {}

    def _store(self, entry: dict, context: object) -> None:
        """The key's new entry: seen by the rest of the batch, written once at its end."""
        self.cache[entry["dedup_key"]] = entry
        self.dirty[entry["dedup_key"]] = (context, entry)

    def _outputs_of(self, before_entry: dict | None, events: list[dict]) -> list[Output]:
        """Domain events, then their relay copies (per subscription match), then their delivery
        requests (webhooks, Slack). ``before_entry``: the entry the decision read."""
        outputs = [domain_event(e) for e in events]
        cases = (before_entry or {}).get("cases", {})
        before = {e["case_id"]: cases.get(e["case_id"]) for e in events}
        if self.subscriptions:
            of = {id(o.value): o for o in outputs}
            outputs += [relay_copy(sub.id, sub.format, of[id(e)])
                        for sub, e in route_events(self.tenant, self.subscriptions, before, events)]
        if self.oncall is not None:
            for r in notifying.deliveries(self.tenant, self.oncall, before, events):
                request = {k: v for k, v in r.items() if k != "event_index"}
                outputs.append(delivery_request(request, outputs[r["event_index"]]))
        return outputs


class UnflushedOutputs:
    """Inputs applied per dedup key since the apply agent last flushed the producer itself.

    A key's stored state can re-send the outputs of its last ``limit`` inputs
    only (``cases.RECENT_LIMIT``; fewer when they are large, ``cases.RECENT_BYTES``):
    that is what a redelivery after a crash re-sends. A crash after a state is
    written (the local store) and before the producer has sent the outputs
    would lose, for good, those of older inputs the
    state no longer keeps. So before writing states that would forget outputs
    not known to be sent, the agent flushes: ``add`` says when."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.kept: dict[str, int] = {}

    def add(self, applied: dict[str, int], kept: dict[str, int] | None = None) -> bool:
        """Count a batch's inputs per key (``kept``: of how many inputs each key's new state keeps the
        outputs, when fewer than ``limit``); True: flush before writing its states."""
        for key, n in applied.items():
            if n > 0:
                self.counts[key] = self.counts.get(key, 0) + n
        self.kept.update(kept or {})
        return any(n > self.kept.get(key, self.limit) for key, n in self.counts.items())

    def clear(self) -> None:
        self.counts.clear()
        self.kept.clear()
