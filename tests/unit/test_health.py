"""Stall detection (streams/health.py): pure, with an injected clock."""

from __future__ import annotations

from streams.health import StallDetector, input_lag


def test_input_lag_counts_what_is_neither_read_nor_committed():
    ends = {"a:0": 10, "a:1": 5, "a:2": 7}
    assert input_lag(ends, {"a:0": 9, "a:1": None, "a:2": 3}, {"a:0": 10, "a:1": 2, "a:2": None}) == 0 + 3 + 3
    assert input_lag(ends, {}, {}) == 22
    assert input_lag({"a:0": 4}, {"a:0": 3}, {"a:0": 4}) == 0


def test_no_progress_with_lag_beyond_the_limit_is_a_stall():
    d = StallDetector(60, now=0)
    assert not d.observe({"a:0": None}, 100, recovering=False, now=10)
    assert not d.observe({"a:0": None}, 100, recovering=False, now=70)  # 60 s since t=10
    assert d.observe({"a:0": None}, 100, recovering=False, now=71)
    assert d.stalled_for(71) == 61


def test_progress_resets_the_clock():
    d = StallDetector(60, now=0)
    d.observe({"a:0": 1}, 100, recovering=False, now=0)
    assert not d.observe({"a:0": 2}, 100, recovering=False, now=50)
    assert not d.observe({"a:0": 2}, 100, recovering=False, now=109)
    assert d.observe({"a:0": 2}, 100, recovering=False, now=111)


def test_no_lag_or_recovery_is_never_a_stall():
    d = StallDetector(60, now=0)
    assert not d.observe({"a:0": 1}, 0, recovering=False, now=500)
    assert not d.observe({"a:0": 1}, None, recovering=False, now=600)  # end offsets unknown
    assert not d.observe({"a:0": 1}, 100, recovering=True, now=700)
    # recovery counted as progress: the limit runs from its end
    assert not d.observe({"a:0": 1}, 100, recovering=False, now=759)
    assert d.observe({"a:0": 1}, 100, recovering=False, now=761)


def test_an_idle_worker_is_not_stalled_when_input_arrives():
    """The limit counts from when input started waiting: a worker idle for
    longer than the limit that sees one new message is not stalled (seen on
    Apache Kafka: the health check ran between the produce and the read)."""
    d = StallDetector(60, now=0)
    assert not d.observe({"a:0": 5}, 0, recovering=False, now=5)
    assert not d.observe({"a:0": 5}, 0, recovering=False, now=135)  # idle for 130 s
    assert not d.observe({"a:0": 5}, 1, recovering=False, now=140)  # a message arrives
    assert not d.observe({"a:0": 5}, 1, recovering=False, now=195)
    assert d.observe({"a:0": 5}, 1, recovering=False, now=201)      # waiting > 60 s, not read: stalled


def test_a_shutdown_that_hangs_ends_the_process_after_its_deadline():
    import threading

    from streams.health import ShutdownDeadline

    exited = threading.Event()
    got = []
    d = ShutdownDeadline(0.05, code=1, exit=lambda code, msg: (got.append((code, msg)), exited.set()))
    d.start()
    d.start()  # a second signal does not arm a second timer
    assert exited.wait(5), "the deadline never fired"
    assert got[0][0] == 1 and "did not finish within 0.05 s" in got[0][1] and len(got) == 1


def test_a_cancelled_or_disabled_deadline_does_nothing():
    from streams.health import ShutdownDeadline

    got = []
    d = ShutdownDeadline(30, exit=lambda code, msg: got.append(code))   # long: a loaded machine never fires it first
    d.start()
    d.cancel()
    d._timer.join(5)
    assert not d._timer.is_alive()   # cancelled: the timer thread ended without firing
    ShutdownDeadline(0, exit=lambda code, msg: got.append(code)).start()
    assert got == []


def test_a_commit_stuck_behind_records_read_but_not_in_flight_is_reported_once_per_period():
    from streams.health import CommitWatch

    w = CommitWatch(15.0)
    assert w.observe(0, {"p0": (100, 150, False), "p1": (100, 150, True), "p2": (100, 99, False)}) == []
    assert w.observe(14, {"p0": (100, 150, False), "p1": (100, 160, True), "p2": (100, 99, False)}) == []
    assert w.observe(15, {"p0": (100, 160, False), "p1": (100, 170, True), "p2": (100, 99, False)}) == ["p0"]
    assert w.observe(16, {"p0": (100, 160, False)}) == []          # not again at once
    assert w.observe(30, {"p0": (100, 160, False)}) == ["p0"]      # again after a period


def test_a_commit_that_moves_or_waits_for_work_in_flight_is_not_stuck():
    from streams.health import CommitWatch

    w = CommitWatch(15.0)
    for t, committed in enumerate(range(0, 300, 10)):
        assert w.observe(t * 5, {"p": (committed, committed + 50, False)}) == []
    assert w.observe(0, {"q": (None, 10, False)}) == [] and w.observe(100, {"q": (None, 10, False)}) == []
    # read == committed: everything handed over was committed, or a seek has just set the position
    assert w.observe(0, {"r": (100, 100, False)}) == [] and w.observe(100, {"r": (100, 100, False)}) == []
