"""What casestream adds to Faust so that rebalances, takeovers and zombies lose nothing.

Found by the fault suite (tests/reliability/test_faults.py) on Apache Kafka:

* **Records lost inside the worker around a rebalance.** Seen in the
  fault suite: a record read by faust-streaming and handed to the stream
  buffers is dropped there (the buffers are cleared when partitions are
  revoked) and, now and then, not fetched again: it is never applied, and
  its partition's commit waits behind it for ever. ``streams.health.CommitWatch``
  (run by the health timer, ``agents/intake.py``) finds such a partition --
  its commit has not moved for 15 s although records past it were read and
  none is being processed -- and reads it again from the committed offset;
  processing is idempotent, so what was applied is recognised. (An earlier
  guard here discarded records whose fetch straddled a generation change and
  sought back; its seek raced with the consumer's prefetch and lost records
  itself, so it is gone.)

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
from pathlib import Path
from typing import Any, Iterable

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)

EXPELLED_EXIT_CODE = 4  # if re-executing itself fails: the supervisor restarts it

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


class GuardedConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer that tells the app when the group expelled it (``App.on_expelled``)."""

    _expel_hook_installed = False

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
