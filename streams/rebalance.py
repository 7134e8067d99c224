"""What casestream adds to Faust so that rebalances, takeovers and zombies lose nothing.

Found by the fault suite (tests/reliability/test_faults.py) on Apache Kafka:

* **Offsets committed past records never processed.** Found by the fault
  suite (projections a few versions behind the log, every offset committed).
  faust-streaming commits a partition up to the highest offset acknowledged
  without a hole, and three of its rules let a record through unprocessed:

  - a stream that meets a record while processing is suspended (a rebalance
    has begun) or of an older generation *skips* it and acknowledges it as
    if processed, and the other streams of the topic (two projections read
    the domain-event log) may process it and acknowledge it too;
  - a jump in the offsets read (``_add_gap``: meant for compacted topics and
    transaction markers, which our streams' topics never have) counts the
    missing offsets as processed: after a seek, a batch already fetched from
    further on jumps the offsets, and the records sought back to are dropped;
  - the committed offset may be one short of the first acknowledged one (a
    record silently passed over), or anything when nothing was committed yet.

  ``GuardedConsumer`` closes all three: an acknowledgement made while
  processing is suspended, or in another generation, or of a batch whose
  handling failed (``mark_unsafe``), never counts toward a commit (the
  record is processed again: idempotently); jumps count nothing; and a
  commit advances only over offsets acknowledged one after another from
  the committed one (the log's start offset when nothing was committed).
  Records of our streams' topics fetched before a generation's seek to the
  committed offsets are not handed over (Faust runs streams while it
  restores tables; such a record could overtake an earlier one of its
  partition read again after the seek).
  A partition whose commit then waits for a record dropped inside Faust is
  read again from its committed offset by ``streams.health.CommitWatch``
  (run by the health timer, ``agents/intake.py``).

* **A fenced worker's late writes.** A worker stopped past its session
  timeout (SIGSTOP, a VM pause, a partition) loses its partitions to
  another; when it runs again, what it had buffered -- table changelog
  writes included -- reaches Kafka after the new owner's writes. Two
  defences:

  - ``VersionedTable``: every value starts with ``{"applied":N,`` (N counts
    the inputs applied to that key), and restoring from the changelog keeps,
    per key, the value with the highest N: a late, older state is never a
    step back. (The active owner never reads its changelog.)
  - A member the group coordinator no longer knows (its heartbeat, commit or
    join answered "unknown member" / "illegal generation": it was expelled)
    cannot trust its local stores either: their persisted changelog
    positions count its own late writes, past the new owner's. It discards
    its stores and restarts in place (``App.on_expelled``: the same process,
    re-executed), restoring from the changelog like a new worker.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import ConsumerMessage, ack_lock
from mode.utils.futures import notify

log = logging.getLogger(__name__)

EXPELLED_EXIT_CODE = 4
STREAMS_WAIT_SECONDS = 10.0  # the longest a rebalance or a stop waits for records being processed  # if re-executing itself fails: the supervisor restarts it

# ---------------------------------------------------------------------------
# versioned values
# ---------------------------------------------------------------------------

_SEQ = re.compile(rb'^\{"applied":(\d+)[,}]')


def seq_of(value: bytes | None) -> int | None:
    """The change count a versioned value starts with (None: no value, or not versioned)."""
    if not value:
        return None
    m = _SEQ.match(value)
    return int(m.group(1)) if m else None


def newest_only(batch: Iterable[Any], stored) -> list:
    """The changelog events of ``batch`` (each with ``.message`` of partition, key
    and value) that do not step a key back: a versioned value older than the one
    stored (``stored(partition, key)``) or kept earlier in the batch is left out;
    one of the same count too (it is the same state written again). Tombstones
    and unversioned values are kept."""
    kept = []
    latest: dict[tuple[int, bytes], int | None] = {}
    for event in batch:
        msg = event.message
        new = seq_of(msg.value)
        slot = (msg.partition, msg.key)
        if new is not None:
            current = latest[slot] if slot in latest else seq_of(stored(msg.partition, msg.key))
            if current is not None and new <= current:
                continue  # an older state written late (by a fenced worker): never a step back
        latest[slot] = new
        kept.append(event)
    return kept


class VersionedTable(faust.Table):
    """A table of versioned JSON values (``{"applied":N,...}``, N growing with
    every input applied to the key): a changelog record replaces the stored value only if
    its N is greater. Tombstones and unversioned values apply as usual."""

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        super().apply_changelog_batch(newest_only(batch, self._stored))

    def _stored(self, partition: int, key: bytes) -> bytes | None:
        db_for = getattr(self.data, "_db_for_partition", None)
        if db_for is None:  # not RocksDB (the memory store): look the key up as the table does
            return self.data.get(key) if hasattr(self.data, "get") else None
        return db_for(partition).get(key)


# ---------------------------------------------------------------------------
# the consumer
# ---------------------------------------------------------------------------


def next_commit(acked: list[int], committed: int | None) -> tuple[int | None, list[int]]:
    """The offset a partition can be committed to: past the offsets acknowledged one after
    another from ``committed`` (the next offset to process), and those offsets (to forget).
    None while ``committed`` is unknown or the record at it is not acknowledged. ``acked``
    is sorted in place; offsets below ``committed`` (processed again) are returned to forget."""
    if not acked or committed is None:
        return None, []
    acked.sort()
    i = 0
    while i < len(acked) and acked[i] < committed:
        i += 1
    done = acked[:i]
    nxt = committed
    while i < len(acked) and acked[i] <= nxt:
        nxt = acked[i] + 1
        done.append(acked[i])
        i += 1
    return (nxt if nxt > committed else None), done


class GuardedMessage(ConsumerMessage):
    """A consumed record that remembers an acknowledgement made while it was not safe to
    count: processing suspended (a rebalance has begun), or a generation since ended, or
    its batch's handling failed (``mark_unsafe``)."""

    __slots__ = ("unsafe",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsafe = False

    def ack(self, consumer: Any, n: int = 1) -> bool:
        app = consumer.app
        if not app.flow_control.is_active() or self.generation_id != app.consumer_generation_id:
            self.unsafe = True  # a skip (Faust acknowledges what it skips) or a late acknowledgement
        return super().ack(consumer, n)


def mark_unsafe(message: Any) -> None:
    """The record was not (or not surely) processed: its acknowledgement must not count."""
    if isinstance(message, GuardedMessage):
        message.unsafe = True


class GuardedConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer that commits only what was processed (see the module
    docstring) and tells the app when the group expelled it (``App.on_expelled``)."""

    _expel_hook_installed = False

    def _to_message(self, tp, record: Any) -> GuardedMessage:
        timestamp = record.timestamp
        return GuardedMessage(
            record.topic, record.partition, record.offset,
            timestamp / 1000.0 if timestamp is not None else None,
            record.timestamp_type, record.headers, record.key, record.value, record.checksum,
            record.serialized_key_size, record.serialized_value_size, tp,
            generation_id=self.app.consumer_generation_id,
        )

    def ack(self, message: Any) -> bool:
        if getattr(message, "unsafe", False) and self.app.topics.acks_enabled_for(message.topic):
            with ack_lock:  # done with, but not counted: it is processed again after the rebalance
                if not message.acked:
                    message.acked = True
                    self._unacked_messages.discard(message)
                    notify(self._waiting_for_ack)
            return False
        return super().ack(message)

    async def wait_empty(self) -> None:
        """Faust's wait for the records being processed to be acknowledged (at a rebalance and at
        a stop), bounded by ``STREAMS_WAIT_SECONDS``. Faust waits for ever, and can wait for a
        record that will never be acknowledged: when it clears the streams' queues at a stop, a
        record one stream of a topic has processed and another had only queued keeps its last
        reference (seen: a worker SIGTERMed under load never stopped). What is not acknowledged
        in time is not committed: the next owner processes it."""
        deadline = time.monotonic() + STREAMS_WAIT_SECONDS
        while not self.should_stop and self._unacked_messages and time.monotonic() < deadline:
            await self.commit()
            if not self._unacked_messages:
                break
            await self._wait_for_ack(timeout=1)
            self._clean_unacked_messages()
        if self._unacked_messages and not self.should_stop:
            log.warning("%d records still being processed after %.0f s; going on without them (not committed: "
                        "processed again by the next owner)", len(self._unacked_messages), STREAMS_WAIT_SECONDS)
        await self.commit_and_end_transactions()

    async def _add_gap(self, tp, offset_from: int, offset_to: int) -> None:
        # our streams' topics have no compaction and no transaction markers: a jump in the
        # offsets read means records passed over, never records that are not there
        log.debug("offsets %d..%d of %s:%d were not handed to the streams; not counted as processed",
                  offset_from, offset_to, tp.topic, tp.partition)

    def _new_offset(self, tp) -> int | None:
        offset, done = next_commit(self._acked[tp], self._committed_offset.get(tp))
        if done:
            acked = self._acked[tp]
            acked[:len(done)] = []   # ``done`` is the sorted head of ``acked``
            self._acked_index[tp].difference_update(done)
        return offset

    _seeks = 0                               # seeks to the committed offsets begun
    _seeking = 0                             # ... and not done yet
    _sought: tuple[int, int] | None = None   # (seeks, generation) of the last one done
    _dropped: set | None = None              # partitions whose records were left out while one ran
    _seek_failed: int | None = None          # the generation whose seek failed

    def _settled(self) -> tuple[int, int] | None:
        """This generation's seek to the committed offsets, if it is done (else None)."""
        done = self._sought
        current = (self._seeks, self.app.consumer_generation_id)
        return done if done == current and not self._seeking else None

    async def _wait_next_records(self, timeout: float):
        """Faust's fetch, less the records of our streams' topics fetched before this
        generation's seek to the committed offsets was done: Faust lets streams run while it
        restores tables after a rebalance, and a record fetched from the old position could be
        processed ahead of an earlier one of its partition that is read again after the seek
        (seen: a command applied before the one sent before it). Their partitions are read
        again from the committed offset once the seek is done."""
        before = self._settled()
        if before is None and not self._seeking and self._seek_failed == self.app.consumer_generation_id:
            try:  # this generation's seek failed (a broker gone): nothing is handed over until one is done
                await self.perform_seek()
            except Exception as exc:
                log.warning("seeking to the committed offsets failed again: %r", exc)
                await self.sleep(1)
                return {}, None
            before = self._settled()
        records, active = await super()._wait_next_records(timeout)
        if records and (before is None or self._settled() != before):
            left_out = {tp for tp in records if self.app.topics.acks_enabled_for(tp.topic)}
            if left_out:
                records = {tp: rs for tp, rs in records.items() if tp not in left_out}
                if self._settled() is not None:   # the seek ended during this fetch
                    await self._read_again(left_out)
                else:                             # the seek running or to come reads them again
                    self._dropped = (self._dropped or set()) | left_out
        return records, active

    async def _read_again(self, tps) -> None:
        assigned = self.assignment()
        for tp in tps:
            committed = self._committed_offset.get(tp)
            if tp in assigned and committed is not None:
                await self.seek(tp, committed)

    async def perform_seek(self) -> None:
        self._seeks += 1
        self._seeking += 1
        begun = (self._seeks, self.app.consumer_generation_id)
        try:
            await super().perform_seek()
            await self._fill_start_offsets()
        except BaseException:
            self._seek_failed = begun[1]
            raise
        finally:
            self._seeking -= 1
        if begun == (self._seeks, self.app.consumer_generation_id):
            self._sought = begun
            dropped, self._dropped = self._dropped, None
            if dropped:  # left out while the seek ran: perhaps fetched from its new position
                await self._read_again(dropped)

    async def _fill_start_offsets(self) -> None:
        # a partition never committed starts at the log's start (auto_offset_reset=earliest):
        # without it, the first commit could pass over the records before the first acknowledged
        unknown = [tp for tp in self.assignment() if self._committed_offset.get(tp) is None
                   and self.app.topics.acks_enabled_for(tp.topic)]
        if unknown:
            try:
                starts = await self.earliest_offsets(*unknown)
            except Exception as exc:  # no commit for them until one is known (the next rebalance)
                log.warning("cannot read the start offsets of %d partitions: %r", len(unknown), exc)
                return
            for tp in unknown:
                if self._committed_offset.get(tp) is None and starts.get(tp) is not None:
                    self._committed_offset[tp] = starts[tp]

    async def on_partitions_assigned(self, assigned, generation_id: int = 0) -> None:
        if not self._expel_hook_installed:
            self._install_expel_hook()
        await super().on_partitions_assigned(assigned, generation_id)

    def _install_expel_hook(self) -> None:
        """Call ``app.on_expelled`` when the coordinator no longer knows this member."""
        coordinator = getattr(self._thread._ensure_consumer(), "_coordinator", None)
        app = self.app
        if install_expel_hook(coordinator, lambda: getattr(app, "on_expelled", lambda: None)()):
            self._expel_hook_installed = True


def install_expel_hook(coordinator: Any, on_expelled) -> bool:
    """Make aiokafka's group ``coordinator`` call ``on_expelled()`` when it resets
    its generation on an error ("unknown member", "illegal generation": the group
    went on without this member), not when it leaves the group (a graceful stop
    resets it too). False if ``coordinator`` is not the aiokafka one expected."""
    if coordinator is None or not hasattr(coordinator, "reset_generation"):
        return False
    original = coordinator.reset_generation
    original_leave = getattr(coordinator, "_maybe_leave_group", None)
    leaving = False

    def reset_generation():
        original()
        closing = getattr(coordinator, "_closing", None)
        if leaving or (closing is not None and closing.done()):
            return
        on_expelled()

    async def maybe_leave_group():
        nonlocal leaving
        leaving = True
        try:
            return await original_leave()
        finally:
            leaving = False

    coordinator.reset_generation = reset_generation
    if original_leave is not None:
        coordinator._maybe_leave_group = maybe_leave_group
    return True


class GuardedTransport(faust_aiokafka.Transport):
    Consumer = GuardedConsumer


class App(faust.App):
    """``faust.App`` with ``GuardedConsumer``; ``store_dir``: the local stores
    ``on_expelled`` discards (None: expulsion is only logged)."""

    store_dir: Path | None = None
    _expelled_lock = threading.Lock()
    _expelled = False

    def _new_transport(self):
        return GuardedTransport(self.conf.broker_consumer, self)

    def VersionedTable(self, name: str, *, help: str | None = None, **kwargs: Any) -> VersionedTable:
        """Like ``App.Table``, of class ``VersionedTable``."""
        return self.tables.add(VersionedTable(self, name=name, beacon=self.tables.beacon, help=help, **kwargs))

    def on_expelled(self) -> None:
        with self._expelled_lock:
            if self._expelled:
                return
            self._expelled = True
        if self.store_dir is None:
            log.warning("expelled from the consumer group (unknown member or stale generation)")
            return
        log.error("expelled from the consumer group (unknown member or stale generation): another worker "
                  "owned this worker's partitions meanwhile, so its local stores are not to be trusted; "
                  "discarding %s and restarting in place to restore them from the changelog", self.store_dir)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        shutil.rmtree(self.store_dir, ignore_errors=True)
        try:
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        except OSError as exc:
            log.error("re-executing failed (%s); exiting with code %d for the supervisor to restart it",
                      exc, EXPELLED_EXIT_CODE)
        os._exit(EXPELLED_EXIT_CODE)
