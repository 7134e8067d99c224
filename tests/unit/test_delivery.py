"""streams.domain.delivery: outcomes, backoff, retry schedule, breaker, endpoint health."""

import json
from email.utils import formatdate

import pytest

from streams.domain import delivery as d
from streams.domain.delivery import (DELIVERED, PERMANENT, RETRY, CircuitBreaker, EndpointHealth, Outcome, backoff,
                                     classify, delivery_id, next_attempt, parse_retry_after)
from streams.domain.intake import derive_id

NOW = 1_795_514_400.0  # 2026-11-24T10:00:00Z


# --------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_delivered(status):
    o = classify(status, None, None, NOW)
    assert o == Outcome(DELIVERED, None, f"HTTP {status}")
    assert o.final


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses(status):
    o = classify(status, None, None, NOW)
    assert o.kind == RETRY and o.retry_at is None and not o.final


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 422, 499])
def test_other_4xx_permanent(status):
    assert classify(status, None, None, NOW).kind == PERMANENT


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_permanent(status):
    o = classify(status, None, None, NOW)
    assert o.kind == PERMANENT and "redirect" in o.reason


@pytest.mark.parametrize("status", [100, 101, 600, 999])
def test_odd_statuses_permanent(status):
    assert classify(status, None, None, NOW).kind == PERMANENT


@pytest.mark.parametrize("error", ["timeout: no response within 5 s", "connect: refused", "dns: no such host", None])
def test_no_response_is_retry(error):
    o = classify(None, error, None, NOW)
    assert o.kind == RETRY and o.retry_at is None
    assert o.reason == (error or "no response")


def test_status_wins_over_error():
    # the body read failed after a 200: the receiver accepted the delivery
    assert classify(200, "timeout: reading the response body", None, NOW).kind == DELIVERED


def test_429_retry_after_seconds():
    o = classify(429, None, "120", NOW)
    assert o.kind == RETRY and o.retry_at == NOW + 120
    assert "Retry-After 120" in o.reason


def test_503_retry_after_http_date():
    o = classify(503, None, formatdate(NOW + 90, usegmt=True), NOW)
    assert o.kind == RETRY and o.retry_at == pytest.approx(NOW + 90)


def test_retry_after_capped():
    o = classify(429, None, "999999", NOW, max_retry_after=600)
    assert o.retry_at == NOW + 600 and "capped" in o.reason
    assert classify(429, None, "999999", NOW).retry_at == NOW + d.DEFAULT_MAX_RETRY_AFTER


def test_retry_after_in_the_past_means_now():
    assert classify(429, None, formatdate(NOW - 3600, usegmt=True), NOW).retry_at == NOW


@pytest.mark.parametrize("value", ["", "  ", "soon", "-5", "1.5", "Wed, 99 Foo 2026", "9" * 80])
def test_retry_after_garbage_ignored(value):
    o = classify(429, None, value, NOW)
    assert o.kind == RETRY and o.retry_at is None


def test_retry_after_only_for_429_and_503():
    assert classify(500, None, "10", NOW).retry_at is None
    assert classify(502, None, "10", NOW).retry_at is None
    assert classify(408, None, "10", NOW).retry_at is None


def test_parse_retry_after():
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after(" 0 ", NOW) == 0.0
    assert parse_retry_after(formatdate(NOW + 30, usegmt=True), NOW) == pytest.approx(30)
    # an obsolete-format date with -0000 (naive) is read as GMT
    assert parse_retry_after(formatdate(NOW + 30, usegmt=False).replace("+0000", "-0000"), NOW) == pytest.approx(30)


# --------------------------------------------------------------------------
# backoff
# --------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(1, 20))
def test_backoff_equal_jitter_bounds(attempt):
    ceiling = min(3600.0, 2.0 ** (attempt - 1))
    lo = backoff(attempt, rand=lambda: 0.0)
    hi = backoff(attempt, rand=lambda: 0.999999999)
    assert lo == ceiling / 2
    assert ceiling / 2 <= hi <= ceiling
    assert hi == pytest.approx(ceiling)


def test_backoff_values():
    assert backoff(1, rand=lambda: 0.5) == 0.75
    assert backoff(4, base=2.0, rand=lambda: 0.0) == 8.0      # 2 * 2**3 = 16, half of it
    assert backoff(30, base=1.0, cap=100.0, rand=lambda: 1.0) == 100.0
    assert backoff(10_000, rand=lambda: 0.0) == 1800.0          # no overflow


def test_backoff_clamps_rand_and_checks_arguments():
    assert backoff(3, rand=lambda: 7.0) == 4.0
    assert backoff(3, rand=lambda: -1.0) == 2.0
    with pytest.raises(ValueError):
        backoff(0, rand=lambda: 0.5)
    with pytest.raises(ValueError):
        backoff(1, base=0, rand=lambda: 0.5)
    with pytest.raises(TypeError):
        backoff(1)  # randomness must be injected


def test_backoff_grows_monotonically_at_its_lower_bound():
    lows = [backoff(a, rand=lambda: 0.0) for a in range(1, 15)]
    assert lows == sorted(lows) and lows[-1] == 1800.0


# --------------------------------------------------------------------------
# next_attempt
# --------------------------------------------------------------------------

RETRY_O = Outcome(RETRY, None, "HTTP 500")


def test_next_attempt_final_outcomes():
    for o in (Outcome(DELIVERED, None, "HTTP 200"), Outcome(PERMANENT, None, "HTTP 410")):
        assert next_attempt(NOW, 1, o, NOW, rand=lambda: 0.5) is None


def test_next_attempt_backoff():
    assert next_attempt(NOW, 1, RETRY_O, NOW + 1, rand=lambda: 0.0) == NOW + 1 + 0.5
    assert next_attempt(NOW, 5, RETRY_O, NOW + 100, rand=lambda: 0.0, base=10) == NOW + 100 + 80


def test_next_attempt_retry_after_replaces_backoff():
    o = classify(429, None, "42", NOW + 10)
    assert next_attempt(NOW, 3, o, NOW + 10, rand=lambda: 0.9) == NOW + 52
    # a Retry-After already in the past: now
    assert next_attempt(NOW, 3, Outcome(RETRY, NOW, "x"), NOW + 10, rand=lambda: 0.9) == NOW + 10


def test_next_attempt_window():
    # default window 24 h from the first attempt
    late = NOW + 86_400 - 100
    assert next_attempt(NOW, 20, RETRY_O, late, rand=lambda: 0.0) is None       # 1800 s > 100 s left
    assert next_attempt(NOW, 2, RETRY_O, late, rand=lambda: 0.0) == late + 1     # 1 s fits
    assert next_attempt(NOW, 1, RETRY_O, NOW + 86_400, rand=lambda: 0.0) is None
    assert next_attempt(NOW, 1, RETRY_O, NOW + 59, window=60, rand=lambda: 0.0) == NOW + 59.5
    assert next_attempt(NOW, 1, RETRY_O, NOW + 59.8, window=60, rand=lambda: 0.0) is None
    assert next_attempt(NOW, 1, Outcome(RETRY, NOW + 90_000, "x"), NOW + 10, rand=lambda: 0.0) is None


def test_a_whole_schedule_fits_the_window():
    t, n, times = NOW, 1, []
    while True:
        nxt = next_attempt(NOW, n, RETRY_O, t, rand=lambda: 0.5)
        if nxt is None:
            break
        assert nxt > t
        times.append(nxt)
        t, n = nxt, n + 1
    assert times[-1] <= NOW + 86_400
    assert 20 < len(times) < 60
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) <= 3600


def test_delivery_id():
    a = delivery_id("ev-1", "https://a.example/hook")
    assert a == delivery_id("ev-1", "https://a.example/hook")
    assert a == derive_id("delivery", "ev-1", "https://a.example/hook")
    assert a != delivery_id("ev-1", "https://b.example/hook")
    assert a != delivery_id("ev-2", "https://a.example/hook")
    assert len(a) == 36


# --------------------------------------------------------------------------
# circuit breaker
# --------------------------------------------------------------------------


def _fail(cb, n, now):
    for _ in range(n):
        assert cb.allow(now)
        cb.record(False, now)


def test_breaker_opens_after_consecutive_failures():
    cb = CircuitBreaker()
    _fail(cb, 4, NOW)
    assert cb.state == d.CLOSED
    cb.record(True, NOW)           # a success resets the count
    _fail(cb, 4, NOW)
    assert cb.state == d.CLOSED
    _fail(cb, 1, NOW)
    assert cb.state == d.OPEN and cb.retry_at == NOW + 60
    assert not cb.allow(NOW + 59.9)


def test_breaker_half_open_single_probe_then_close():
    cb = CircuitBreaker()
    _fail(cb, 5, NOW)
    assert cb.allow(NOW + 60)
    assert cb.state == d.HALF_OPEN
    assert not cb.allow(NOW + 60)       # exactly one probe at a time
    assert not cb.allow(NOW + 61)
    cb.record(True, NOW + 62)
    assert cb.state == d.CLOSED and cb.retry_at is None
    assert cb.allow(NOW + 62) and cb.allow(NOW + 62)


def test_breaker_probe_failure_doubles_pause_up_to_cap():
    cb = CircuitBreaker(open_for=60, max_open_for=300)
    _fail(cb, 5, NOW)
    t = NOW
    pauses = []
    for _ in range(5):
        t = cb.retry_at
        assert not cb.allow(t - 0.001)
        assert cb.allow(t)
        cb.record(False, t)
        assert cb.state == d.OPEN
        pauses.append(cb.retry_at - t)
    assert pauses == [120, 240, 300, 300, 300]
    # recovery resets the pause
    assert cb.allow(cb.retry_at)
    cb.record(True, t + 1000)
    _fail(cb, 5, t + 2000)
    assert cb.retry_at == t + 2000 + 60


def test_breaker_lost_probe_is_replaced():
    cb = CircuitBreaker(probe_timeout=30)
    _fail(cb, 5, NOW)
    assert cb.allow(NOW + 60)
    assert not cb.allow(NOW + 89)
    assert cb.allow(NOW + 90)          # the first probe never reported back
    assert not cb.allow(NOW + 91)


def test_breaker_ignores_results_while_open():
    cb = CircuitBreaker()
    _fail(cb, 5, NOW)
    cb.record(True, NOW + 1)           # a request from before it opened
    cb.record(False, NOW + 2)
    assert cb.state == d.OPEN and cb.retry_at == NOW + 60


def test_breaker_round_trip():
    cb = CircuitBreaker(failure_threshold=3, open_for=10, max_open_for=100, probe_timeout=20)
    _fail(cb, 3, NOW)
    cb.allow(NOW + 10)
    data = cb.to_dict()
    assert json.loads(json.dumps(data)) == data
    back = CircuitBreaker.from_dict(data)
    assert back.to_dict() == data and back.state == d.HALF_OPEN
    assert not back.allow(NOW + 11)
    back.record(False, NOW + 12)
    assert back.retry_at == NOW + 12 + 20
    assert CircuitBreaker.from_dict({}).to_dict() == CircuitBreaker().to_dict()
    with pytest.raises(ValueError):
        CircuitBreaker.from_dict({"state": "melted"})
    with pytest.raises(ValueError):
        CircuitBreaker.from_dict({"state": "open"})
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


# --------------------------------------------------------------------------
# endpoint health
# --------------------------------------------------------------------------


def test_endpoint_disabled_after_consecutive_permanent_failures():
    h = EndpointHealth()
    gone = Outcome(PERMANENT, None, "HTTP 410")
    for i in range(4):
        h.record(gone, NOW + i)
    h.record(Outcome(RETRY, None, "HTTP 500"), NOW + 5)   # retries neither count nor reset
    assert h.consecutive_permanent == 4 and not h.disabled
    h.record(gone, NOW + 6)
    assert h.disabled and h.disabled_at == NOW + 6 and h.last_reason == "HTTP 410"
    h.record(DELIVERED, NOW + 7)
    assert h.disabled and h.consecutive_permanent == 0   # only enable() re-enables
    h.enable()
    assert not h.disabled and h.disabled_at is None


def test_endpoint_success_resets():
    h = EndpointHealth(disable_after=2)
    h.record(PERMANENT, NOW, "HTTP 404")
    h.record(DELIVERED, NOW)
    h.record(PERMANENT, NOW, "HTTP 404")
    assert not h.disabled
    h.record(PERMANENT, NOW + 1, "HTTP 404")
    assert h.disabled


def test_endpoint_health_round_trip():
    h = EndpointHealth(disable_after=3)
    h.record(PERMANENT, NOW, "HTTP 401")
    data = h.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert EndpointHealth.from_dict(data).to_dict() == data
    with pytest.raises(ValueError):
        h.record("exploded", NOW)
    with pytest.raises(ValueError):
        EndpointHealth(disable_after=0)
