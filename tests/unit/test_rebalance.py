"""streams/rebalance.py: a versioned key never steps back; a commit never passes a record not processed."""

from types import SimpleNamespace

import orjson

from streams.rebalance import GuardedMessage, install_expel_hook, mark_unsafe, newest_only, next_commit, seq_of


def ev(key: bytes, value: bytes | None, partition: int = 0):
    return SimpleNamespace(message=SimpleNamespace(partition=partition, key=key, value=value))


def versioned(n: int, **rest) -> bytes:
    return orjson.dumps({"applied": n, **rest})


def test_seq_of_reads_the_leading_count_only():
    assert seq_of(versioned(7, x=1)) == 7
    assert seq_of(b'{"applied":3}') == 3
    assert seq_of(b'{"x":1,"applied":3}') is None  # not first: not versioned
    assert seq_of(b"") is None and seq_of(None) is None
    assert seq_of(b'{"applied":12x') is None


def test_a_late_older_state_is_left_out():
    batch = [ev(b"k", versioned(1)), ev(b"k", versioned(3)), ev(b"k", versioned(2)), ev(b"k", versioned(4))]
    kept = newest_only(batch, lambda p, k: None)
    assert [seq_of(e.message.value) for e in kept] == [1, 3, 4]


def test_the_stored_value_counts():
    stored = {(0, b"k"): versioned(5)}
    batch = [ev(b"k", versioned(4)), ev(b"k", versioned(5)), ev(b"k", versioned(6))]
    kept = newest_only(batch, lambda p, k: stored.get((p, k)))
    assert [seq_of(e.message.value) for e in kept] == [6]


def test_keys_and_partitions_are_apart():
    stored = {(0, b"a"): versioned(9)}
    batch = [ev(b"a", versioned(2)), ev(b"b", versioned(2)), ev(b"a", versioned(2), partition=1)]
    kept = newest_only(batch, lambda p, k: stored.get((p, k)))
    assert [(e.message.partition, e.message.key) for e in kept] == [(0, b"b"), (1, b"a")]


def test_tombstones_and_unversioned_values_apply_as_usual():
    stored = {(0, b"k"): versioned(9)}
    batch = [ev(b"k", None), ev(b"k", versioned(1)), ev(b"u", b"plain"), ev(b"u", b"older")]
    kept = newest_only(batch, lambda p, k: stored.get((p, k)))
    assert [e.message.value for e in kept] == [None, versioned(1), b"plain", b"older"]


class Coordinator:
    """The part of aiokafka's GroupCoordinator the expel hook wraps."""

    def __init__(self):
        import asyncio
        self.loop = asyncio.new_event_loop()
        self._closing = self.loop.create_future()
        self.resets = 0

    def reset_generation(self):
        self.resets += 1

    async def _maybe_leave_group(self):
        self.reset_generation()

    async def close(self):
        self._closing.set_result(None)
        await self._maybe_leave_group()


def test_an_error_reset_is_an_expulsion_a_leave_is_not():
    c, expelled = Coordinator(), []
    assert install_expel_hook(c, lambda: expelled.append(1))
    c.loop.run_until_complete(c._maybe_leave_group())      # unsubscribe: leaving, not expelled
    assert c.resets == 1 and expelled == []
    c.reset_generation()                                    # heartbeat answered UnknownMemberId
    assert c.resets == 2 and expelled == [1]
    c.loop.run_until_complete(c.close())                    # a graceful stop
    c.reset_generation()
    assert c.resets == 4 and expelled == [1]
    c.loop.close()


def test_no_coordinator_no_hook():
    assert not install_expel_hook(None, lambda: None)


def test_session_timeout_and_heartbeat_from_the_environment():
    from streams.settings import load_settings

    assert load_settings({}).session_timeout == 60.0 and load_settings({}).heartbeat_interval == 3.0
    short = load_settings({"CASESTREAM_SESSION_TIMEOUT": "6"})
    assert short.session_timeout == 6.0 and short.heartbeat_interval == 0.6


def test_default_instance_ids_differ_per_store_and_stay_put(tmp_path):
    from streams.settings import default_instance_id

    a, b = tmp_path / "a", tmp_path / "b"
    assert default_instance_id("on-call", a) == default_instance_id("on-call", a)
    assert default_instance_id("on-call", a) != default_instance_id("on-call", b)
    assert default_instance_id("on-call", a).startswith("on-call-")


# -- commits: only over offsets acknowledged one after another from the committed one ---------------

def test_a_commit_advances_over_consecutive_acknowledgements_from_the_committed_offset():
    acked = [44, 42, 43, 47]
    assert next_commit(acked, 42) == (45, [42, 43, 44])
    assert acked == [42, 43, 44, 47]  # sorted in place; the caller forgets the head


def test_a_commit_waits_for_the_record_at_the_committed_offset():
    # Faust itself would commit 44 here: one record (42) passed over without being processed
    assert next_commit([43], 42) == (None, [])
    assert next_commit([45, 46], 42) == (None, [])


def test_no_commit_while_the_committed_offset_is_unknown():
    # Faust itself would commit from whatever was acknowledged first
    assert next_commit([5, 6, 7], None) == (None, [])
    assert next_commit([], 3) == (None, [])


def test_offsets_below_the_committed_one_are_forgotten_without_a_commit():
    assert next_commit([3, 4], 10) == (None, [3, 4])
    assert next_commit([3, 10, 11], 10) == (12, [3, 10, 11])


class _Consumer:
    """What ``GuardedMessage.ack`` reads of the consumer: its app's flow and generation."""

    def __init__(self, active: bool = True, generation: int = 1):
        self.app = SimpleNamespace(flow_control=SimpleNamespace(is_active=lambda: active),
                                   consumer_generation_id=generation)
        self.counted = []

    def ack(self, message):  # the final acknowledgement
        self.counted.append((message.offset, message.unsafe))
        return True


def _message(offset: int = 5, generation: int = 1, refcount: int = 1) -> GuardedMessage:
    m = GuardedMessage("t", 0, offset, 0.0, 0, [], b"k", b"v", None, 1, 1, None, generation_id=generation)
    m.refcount = refcount
    return m


def test_an_acknowledgement_while_processing_is_suspended_is_unsafe():
    m = _message()
    m.ack(_Consumer(active=False))
    assert m.unsafe


def test_an_acknowledgement_from_an_ended_generation_is_unsafe():
    m = _message(generation=1)
    m.ack(_Consumer(generation=2))
    assert m.unsafe


def test_one_stream_skipping_makes_the_record_unsafe_for_all():
    # two projections read one topic: one skipped the record (a rebalance began), the other
    # processed it later; the final acknowledgement must not count it as processed
    m = _message(refcount=2)
    m.ack(_Consumer(active=False))
    c = _Consumer(active=True)
    m.ack(c)
    assert c.counted == [(5, True)]


def test_an_acknowledgement_in_the_same_generation_while_flowing_is_safe():
    m, c = _message(), _Consumer()
    m.ack(c)
    assert c.counted == [(5, False)]


def test_a_failed_batch_marks_its_records_unsafe():
    m = _message()
    mark_unsafe(m)
    assert m.unsafe
    mark_unsafe(SimpleNamespace())  # another kind of message: nothing to mark
