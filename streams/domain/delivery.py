"""Outbound notification delivery: outcomes, retries, circuit breaking. Pure.

No I/O and no clock: every time is a parameter (seconds; wall-clock unix
seconds wherever an HTTP date may be involved, i.e. ``classify``; any one
consistent scale elsewhere), and randomness is injected (``rand``: a
callable returning a float in [0, 1), e.g. ``random.random``).

Outcomes (``classify``)
    ``delivered``  any 2xx.
    ``retry``      no response at all (timeout, connection refused, DNS or TLS
                   failure: ``status`` is None), 408, 429 and every 5xx.
    ``permanent``  everything else: other 4xx, 3xx (redirects are never
                   followed, so a redirect is a misconfigured endpoint), 1xx
                   and nonsense codes (>= 600).
    When a status is present it decides, whatever ``error`` says (an error
    while reading the body of a 200 still means the receiver accepted it).
    For 429 and 503 a ``Retry-After`` header (delta-seconds or an HTTP date)
    sets ``retry_at``, capped at ``max_retry_after`` seconds from now.

Backoff (``backoff``): capped exponential with *equal jitter*
    ``d = min(cap, base * 2 ** (attempt - 1))``; the delay is uniform in
    ``[d/2, d]``. Equal rather than full jitter (uniform in ``[0, d]``): the
    clients here are independent delivery workers retrying against a
    receiver that is down, and a guaranteed minimum spacing (never an
    immediate re-hammer because ``rand()`` was close to 0) matters more than
    the slightly better spreading of full jitter. ``attempt`` counts the
    attempts made so far (1 after the first failure).

Retry schedule (``next_attempt``): when to try again, or None when the
    outcome is final or the next try would fall outside the retry window
    (default 24 h counted from the *first* attempt).

``CircuitBreaker`` (one per endpoint) and ``EndpointHealth`` are small
mutable objects whose state is plain data (``to_dict``/``from_dict``, JSON
types only) so the delivery agent can keep them in a table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Callable

from streams.domain.intake import derive_id

DELIVERED = "delivered"
RETRY = "retry"
PERMANENT = "permanent"
KINDS = (DELIVERED, RETRY, PERMANENT)

DEFAULT_WINDOW = 86_400.0         # retry for 24 h after the first attempt
DEFAULT_MAX_RETRY_AFTER = 3_600.0  # a Retry-After beyond this is capped

_RETRYABLE_4XX = (408, 429)
_RETRY_AFTER_STATUSES = (429, 503)
_DELTA_RE = re.compile(r"[0-9]{1,12}", re.ASCII)


@dataclass(frozen=True)
class Outcome:
    """``kind``: delivered | retry | permanent; ``retry_at``: when the
    receiver asked to be retried (Retry-After), else None (use backoff);
    ``reason``: a short human-readable explanation for logs and the UI."""

    kind: str
    retry_at: float | None
    reason: str

    @property
    def final(self) -> bool:
        return self.kind != RETRY


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from ``now`` (>= 0) per a ``Retry-After`` value, or
    None when absent or unparseable. Accepts delta-seconds (``"120"``) and an
    HTTP date (``"Wed, 21 Oct 2026 07:28:00 GMT"``, ``now`` being unix
    seconds); a date in the past means 0."""
    if value is None:
        return None
    v = value.strip()
    if not v or len(v) > 64:
        return None
    if _DELTA_RE.fullmatch(v):
        return float(int(v))
    try:
        when = parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=timezone.utc)
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


def classify(status: int | None, error: str | None, retry_after_header: str | None, now: float, *,
             max_retry_after: float = DEFAULT_MAX_RETRY_AFTER) -> Outcome:
    """The outcome of one delivery attempt (see the module docstring)."""
    if status is None:
        return Outcome(RETRY, None, error or "no response")
    if 200 <= status <= 299:
        return Outcome(DELIVERED, None, f"HTTP {status}")
    if status in _RETRYABLE_4XX or 500 <= status <= 599:
        retry_at = None
        reason = f"HTTP {status}"
        if status in _RETRY_AFTER_STATUSES:
            wait = parse_retry_after(retry_after_header, now)
            if wait is not None:
                capped = min(wait, max_retry_after)
                retry_at = now + capped
                reason += f", Retry-After {capped:g} s" + (" (capped)" if capped < wait else "")
        return Outcome(RETRY, retry_at, reason)
    if 300 <= status <= 399:
        return Outcome(PERMANENT, None, f"HTTP {status} (redirects are not followed)")
    return Outcome(PERMANENT, None, f"HTTP {status}")


def backoff(attempt: int, base: float = 1.0, cap: float = 3600.0, *, rand: Callable[[], float]) -> float:
    """Equal-jitter capped exponential backoff: uniform in ``[d/2, d]`` with
    ``d = min(cap, base * 2 ** (attempt - 1))``; ``attempt`` >= 1."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if not (base > 0 and cap > 0) or math.isinf(base) or math.isinf(cap):
        raise ValueError(f"backoff needs finite base > 0 and cap > 0, got {base}/{cap}")
    exp = attempt - 1
    d = cap if exp >= 1024 else min(cap, base * 2.0 ** exp)
    r = min(max(float(rand()), 0.0), 1.0)
    return d / 2 + r * (d / 2)


def next_attempt(first_at: float, attempt: int, outcome: Outcome, now: float, window: float = DEFAULT_WINDOW, *,
                 base: float = 1.0, cap: float = 3600.0, rand: Callable[[], float]) -> float | None:
    """When to make attempt ``attempt + 1`` (``attempt``: attempts made so far,
    the last of which produced ``outcome`` at ``now``), or None: the outcome
    is final (delivered/permanent), or that time falls beyond
    ``first_at + window``. A ``retry_at`` from ``Retry-After`` replaces the
    backoff (it is already capped by ``classify``)."""
    if outcome.kind != RETRY:
        return None
    deadline = first_at + window
    if now >= deadline:
        return None
    if outcome.retry_at is not None:
        at = max(outcome.retry_at, now)
    else:
        at = now + backoff(attempt, base, cap, rand=rand)
    return at if at <= deadline else None


def delivery_id(event_id: str, endpoint: str) -> str:
    """Deterministic id of the delivery of one event to one endpoint (the
    same across retries and redeliveries: receivers deduplicate on it)."""
    return derive_id("delivery", event_id, endpoint)


# --------------------------------------------------------------------------
# circuit breaker
# --------------------------------------------------------------------------

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-endpoint breaker.

    closed --N consecutive failures--> open --``open_for`` s--> half-open
    (the first ``allow`` after the pause moves it and admits exactly one
    probe; further ``allow`` calls say no while the probe is out) --probe
    success--> closed (pause reset to ``open_for``) | --probe failure--> open
    again with the pause doubled, up to ``max_open_for``.

    A probe whose result is never recorded (the worker died) is given up
    after ``probe_timeout`` s and another probe is admitted. Results
    recorded while open (requests that were in flight when it opened) are
    ignored. ``retry_at`` tells when an open breaker will admit a probe.
    """

    def __init__(self, failure_threshold: int = 5, open_for: float = 60.0, max_open_for: float = 3600.0,
                 probe_timeout: float = 300.0):
        if failure_threshold < 1 or not open_for > 0 or max_open_for < open_for or not probe_timeout > 0:
            raise ValueError("circuit breaker needs failure_threshold >= 1, open_for > 0, "
                             "max_open_for >= open_for and probe_timeout > 0")
        self.failure_threshold = int(failure_threshold)
        self.open_for = float(open_for)
        self.max_open_for = float(max_open_for)
        self.probe_timeout = float(probe_timeout)
        self.state = CLOSED
        self.failures = 0                 # consecutive failures while closed
        self.opened_at: float | None = None
        self.current_open_for = self.open_for
        self.probe_at: float | None = None  # when the outstanding half-open probe was admitted

    @property
    def retry_at(self) -> float | None:
        """When an open breaker admits a probe; None unless open."""
        if self.state != OPEN or self.opened_at is None:
            return None
        return self.opened_at + self.current_open_for

    def allow(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now < self.opened_at + self.current_open_for:
                return False
            self.state = HALF_OPEN
            self.probe_at = now
            return True
        # half-open: one probe at a time
        if self.probe_at is not None and now < self.probe_at + self.probe_timeout:
            return False
        self.probe_at = now
        return True

    def record(self, success: bool, now: float) -> None:
        if self.state == CLOSED:
            if success:
                self.failures = 0
            else:
                self.failures += 1
                if self.failures >= self.failure_threshold:
                    self._open(now, self.open_for)
        elif self.state == HALF_OPEN:
            if success:
                self.state = CLOSED
                self.failures = 0
                self.opened_at = None
                self.probe_at = None
                self.current_open_for = self.open_for
            else:
                self._open(now, min(self.max_open_for, self.current_open_for * 2))
        # OPEN: late results of requests admitted before it opened are ignored

    def _open(self, now: float, pause: float) -> None:
        self.state = OPEN
        self.opened_at = now
        self.current_open_for = pause
        self.probe_at = None
        self.failures = 0

    def to_dict(self) -> dict:
        return {"state": self.state, "failures": self.failures, "opened_at": self.opened_at,
                "current_open_for": self.current_open_for, "probe_at": self.probe_at,
                "failure_threshold": self.failure_threshold, "open_for": self.open_for,
                "max_open_for": self.max_open_for, "probe_timeout": self.probe_timeout}

    @classmethod
    def from_dict(cls, d: dict) -> "CircuitBreaker":
        cb = cls(d.get("failure_threshold", 5), d.get("open_for", 60.0), d.get("max_open_for", 3600.0),
                 d.get("probe_timeout", 300.0))
        state = d.get("state", CLOSED)
        if state not in (CLOSED, OPEN, HALF_OPEN):
            raise ValueError(f"unknown circuit breaker state {state!r}")
        if state == OPEN and d.get("opened_at") is None:
            raise ValueError("an open circuit breaker needs opened_at")
        cb.state = state
        cb.failures = int(d.get("failures", 0))
        cb.opened_at = d.get("opened_at")
        cb.current_open_for = float(d.get("current_open_for", cb.open_for))
        cb.probe_at = d.get("probe_at")
        return cb

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.to_dict()!r})"


# --------------------------------------------------------------------------
# endpoint health
# --------------------------------------------------------------------------


class EndpointHealth:
    """Consecutive *permanent* failures of one endpoint; ``disabled`` once
    there have been ``disable_after`` in a row. A delivery resets the count;
    retryable failures leave it alone (the breaker deals with those). A
    disabled endpoint stays disabled until ``enable()`` (an operator fixed
    it); ``record`` does not re-enable it."""

    def __init__(self, disable_after: int = 5):
        if disable_after < 1:
            raise ValueError(f"disable_after must be >= 1, got {disable_after}")
        self.disable_after = int(disable_after)
        self.consecutive_permanent = 0
        self.disabled = False
        self.disabled_at: float | None = None
        self.last_reason: str | None = None

    def record(self, outcome: Outcome | str, now: float, reason: str | None = None) -> None:
        """``outcome``: an :class:`Outcome` or its kind."""
        kind = outcome.kind if isinstance(outcome, Outcome) else outcome
        if kind not in KINDS:
            raise ValueError(f"unknown outcome kind {kind!r}")
        if isinstance(outcome, Outcome) and reason is None:
            reason = outcome.reason
        if kind == DELIVERED:
            self.consecutive_permanent = 0
        elif kind == PERMANENT:
            self.consecutive_permanent += 1
            self.last_reason = reason
            if not self.disabled and self.consecutive_permanent >= self.disable_after:
                self.disabled = True
                self.disabled_at = now

    def enable(self) -> None:
        self.disabled = False
        self.disabled_at = None
        self.consecutive_permanent = 0

    def to_dict(self) -> dict:
        return {"disable_after": self.disable_after, "consecutive_permanent": self.consecutive_permanent,
                "disabled": self.disabled, "disabled_at": self.disabled_at, "last_reason": self.last_reason}

    @classmethod
    def from_dict(cls, d: dict) -> "EndpointHealth":
        h = cls(d.get("disable_after", 5))
        h.consecutive_permanent = int(d.get("consecutive_permanent", 0))
        h.disabled = bool(d.get("disabled", False))
        h.disabled_at = d.get("disabled_at")
        h.last_reason = d.get("last_reason")
        return h

    def __repr__(self) -> str:
        return f"EndpointHealth({self.to_dict()!r})"
