"""Integration keys, request signatures and rate limits. Pure: no I/O, no clock.

Integration keys
    ``cs_<tenant>_<random>``: the secret a monitor puts in the URL
    (``/v1/integrations/<key>/alertmanager``) or in PagerDuty's
    ``routing_key``. The tenant is readable from the key (``key_tenant``) so
    the gateway knows which tenant database to look in; tenant names never
    contain ``_`` (``^[a-z][a-z0-9-]{0,62}$``), so the first ``_`` after the
    prefix ends the tenant. Only ``hash_key(key)`` (SHA-256, hex) is stored:
    keys are 192 random bits, so a fast hash is enough (no salt or slow KDF
    is needed against guessing), and a leaked table gives no usable key.

Signatures (optional per integration)
    ``X-Casestream-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`` over
    ``f"{t}.".encode() + raw_body`` with the integration's signing secret
    (``whsec_...``). Several ``v1=`` values may be sent (the sender rotating
    its secret); one match is enough. The timestamp must lie within the
    tolerance (300 s) of the receiver's clock, both ways, and within that
    window a signature is accepted once (``SeenSignatures``: a replay of a
    request that was accepted is refused). Comparison is constant-time.
    Unlike keys, signing secrets are
    stored as they are: the verifier must recompute the HMAC, so it needs the
    secret itself, not a hash of it.

Rate limits
    Token buckets, per integration and per tenant. Time is a parameter
    (seconds, any monotonic origin). The limiter lives in one process: every
    gateway instance has its own buckets, so N instances behind a load
    balancer admit up to N times the configured rates in total.
    ``AddressLimiter`` runs before a key is looked up: a bucket per client
    address, from which every request takes a token and an authenticated one
    gives it back, so only failed authentications (unknown keys, bad
    signatures) use it up and a flood of made-up keys cannot reach PostgreSQL.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import re
from dataclasses import dataclass

KEY_PREFIX = "cs_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE = 300

_TENANT_RE = re.compile(r"[a-z][a-z0-9-]{0,62}", re.ASCII)       # streams.config.TENANT_NAME_RE
_RANDOM_RE = re.compile(r"[A-Za-z0-9_-]{16,128}", re.ASCII)      # url-safe base64 alphabet
_KEY_RE = re.compile(r"cs_([a-z][a-z0-9-]{0,62})_([A-Za-z0-9_-]{16,128})", re.ASCII)
_T_RE = re.compile(r"[0-9]{1,15}", re.ASCII)
_MAX_HEADER = 8192

MISSING = "missing signature"
MALFORMED = "malformed signature header"
MISMATCH = "signature mismatch"
REPLAYED = "signature already used (a replay); sign each request anew"


# --------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------


def new_key(tenant: str, random_part: str) -> str:
    """``cs_<tenant>_<random_part>``; random_part: 16-128 url-safe characters
    (the store uses ``secrets.token_urlsafe(24)``: 32 characters)."""
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant name {tenant!r} does not match ^[a-z][a-z0-9-]{{0,62}}$")
    if not _RANDOM_RE.fullmatch(random_part):
        raise ValueError("the random part of a key is 16-128 url-safe characters (A-Z a-z 0-9 _ -)")
    return f"{KEY_PREFIX}{tenant}_{random_part}"


def key_tenant(key: str) -> str | None:
    """The tenant a key belongs to, or None when ``key`` is not in our format."""
    if not isinstance(key, str):
        return None
    m = _KEY_RE.fullmatch(key)
    return m.group(1) if m else None


def hash_key(key: str) -> str:
    """What is stored of a key: SHA-256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------


def _mac(secret: str, body: bytes, t: int) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int) -> str:
    """The full header value: ``t=<t>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``."""
    return f"t={int(t)},{SIGNATURE_VERSION}={_mac(secret, body, int(t))}"


def _parse_header(header: str | None) -> tuple[int, list[bytes]] | str:
    """``(t, v1 values)`` of a signature header, or the reason it is unusable."""
    if header is None or not header.strip():
        return MISSING
    if len(header) > _MAX_HEADER:
        return MALFORMED
    t: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            return MALFORMED
        if name == "t":
            if t is not None or not _T_RE.fullmatch(value):
                return MALFORMED
            t = int(value)
        elif name == SIGNATURE_VERSION:
            candidates.append(value.encode("ascii", "replace"))
    if t is None or not candidates:
        return MALFORMED
    return t, candidates


def signature_key(secret: str, header: str | None, body: bytes) -> str | None:
    """What ``SeenSignatures`` records of a signature ``verify_signature`` accepted
    (the MAC of its timestamp and body: any header carrying it is the same
    signature); None for a header that is not usable."""
    parsed = _parse_header(header)
    if isinstance(parsed, str):
        return None
    return f"{SIGNATURE_VERSION}:{_mac(secret, body, parsed[0])}"


def verify_signature(secret: str, header: str | None, body: bytes, now: int,
                     tolerance: int = DEFAULT_TOLERANCE, seen: SeenSignatures | None = None) -> str | None:
    """None when ``header`` signs ``body`` with ``secret`` at a time within
    ``tolerance`` seconds of ``now``; else a short reason: "missing
    signature", "malformed signature header", "signature mismatch",
    "timestamp outside the <tolerance> s tolerance" or (with ``seen``)
    ``REPLAYED``.

    The header is ``t=<unix seconds>`` and one or more ``v1=<hex>``
    (comma-separated, spaces allowed); other schemes (``v0=``) are ignored.
    The signature is checked before the timestamp, so a sender with a skewed
    clock is told about the clock, and a wrong secret is told "mismatch".
    With ``seen``, a good signature is recorded there until its window ends
    and refused as a replay when it comes again (only good ones are recorded).
    """
    parsed = _parse_header(header)
    if isinstance(parsed, str):
        return parsed
    t, candidates = parsed
    mac = _mac(secret, body, t)
    expected = mac.encode()
    matched = False
    for c in candidates:  # no early exit: the time taken does not say which value matched
        matched |= hmac.compare_digest(expected, c)
    if not matched:
        return MISMATCH
    if abs(int(now) - t) > tolerance:
        return f"timestamp outside the {tolerance:g} s tolerance"
    if seen is not None and not seen.claim(f"{SIGNATURE_VERSION}:{mac}", t + tolerance + 1, now):
        return REPLAYED
    return None


class SeenSignatures:
    """Signatures accepted lately, each kept until its window ends: a second
    use within the window is a replay.

    ``claim(key, expires, now)`` records ``key`` until ``expires`` (seconds,
    the clock ``now`` is on) and says whether it was new; entries due by
    ``now`` are dropped on every call. At most ``max_entries`` are kept: when
    full, the entry closest to its end goes (memory stays bounded; only
    holders of a secret can add entries, so this takes more good signatures
    within one window than a gateway accepts). ``release(key)`` forgets a
    claim (the request it came with was not accepted: a retry is no replay).
    In this process only (like the rate limits); not thread-safe.
    """

    MAX_ENTRIES = 100_000

    def __init__(self, max_entries: int = MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._expires: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []   # (expires, key); entries not in _expires are stale

    def __len__(self) -> int:
        return len(self._expires)

    def __contains__(self, key: str) -> bool:
        return key in self._expires

    def __iter__(self):
        return iter(list(self._expires))

    def _pop(self) -> None:
        expires, key = heapq.heappop(self._heap)
        if self._expires.get(key) == expires:
            del self._expires[key]

    def claim(self, key: str, expires: float, now: float) -> bool:
        while self._heap and self._heap[0][0] <= now:
            self._pop()
        if key in self._expires:
            return False
        while len(self._expires) >= self.max_entries:
            self._pop()
        self._expires[key] = expires
        heapq.heappush(self._heap, (expires, key))
        if len(self._heap) > 2 * self.max_entries + 8:   # released claims left stale heap entries
            self._heap = [(e, k) for k, e in self._expires.items()]
            heapq.heapify(self._heap)
        return True

    def release(self, key: str | None) -> None:
        if key is not None:
            self._expires.pop(key, None)


# --------------------------------------------------------------------------
# rate limits
# --------------------------------------------------------------------------


class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` tokens per second; full at first use.

    ``now`` is seconds on any monotonic scale; a ``now`` earlier than the last
    one seen (a clock stepping back) refills nothing.
    """

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float):
        if not rate > 0 or not burst >= 1 or math.isinf(rate) or math.isinf(burst):
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (finite), got {rate}/{burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last: float | None = None

    def _refill(self, now: float) -> None:
        if self.last is None:
            self.last = now
            return
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def wait(self, n: int, now: float) -> float:
        """Seconds until ``n`` tokens are available (0.0: now; inf: never, n > burst). Takes nothing."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens ({n})")
        self._refill(now)
        if n > self.burst:
            return math.inf
        if n <= self.tokens:
            return 0.0
        return (n - self.tokens) / self.rate

    def take(self, n: int, now: float) -> float:
        """0.0 when ``n`` tokens were taken; else the seconds until they would
        be available (``math.inf`` when n exceeds the burst), nothing taken."""
        w = self.wait(n, now)
        if w == 0.0:
            self.tokens -= n
        return w

    def give(self, n: int, now: float) -> None:
        """Put ``n`` taken tokens back (never above the burst)."""
        self._refill(now)
        self.tokens = min(self.burst, self.tokens + n)

    def full(self, now: float) -> bool:
        """True when the bucket is as good as new (it may be forgotten)."""
        return self.last is None or self.tokens + max(0.0, now - self.last) * self.rate >= self.burst


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: which bucket (``scope`` "integration" or
    "tenant"; ``subject`` the integration id or tenant name), its limits, and
    the seconds after which the same request would pass. ``retry_after`` is 0
    when it can never pass (more events than the burst; ``too_large``)."""

    scope: str
    subject: str
    rate: float
    burst: float
    retry_after: float
    requested: int = 0
    too_large: bool = False

    @property
    def message(self) -> str:
        who = f"{self.scope} {self.subject}"
        if self.too_large:
            return (f"{self.requested} events in one request exceed the burst of {who} ({self.burst:g}); "
                    f"send at most {self.burst:g} per request")
        return (f"rate limit of {who} exceeded ({self.rate:g} events/s, burst {self.burst:g}); "
                f"retry after {self.retry_after:.3g} s")


class RateLimiter:
    """Token buckets per integration and per tenant, in this process only.

    ``per_integration`` and ``per_tenant`` are ``(events per second, burst)``.
    A request of n events passes only when both buckets hold n tokens, and
    then takes n from both; a refused request takes nothing. Buckets that
    have refilled completely are forgotten once there are many of them.
    Not thread-safe (one event loop).
    """

    MAX_BUCKETS = 10_000

    def __init__(self, per_integration: tuple[float, float] = (50, 500),
                 per_tenant: tuple[float, float] = (500, 5000)):
        TokenBucket(*per_integration), TokenBucket(*per_tenant)  # validate now, not at the first request
        self.per_integration = (float(per_integration[0]), float(per_integration[1]))
        self.per_tenant = (float(per_tenant[0]), float(per_tenant[1]))
        self._integrations: dict[tuple[str, str], TokenBucket] = {}
        self._tenants: dict[str, TokenBucket] = {}

    def _bucket(self, buckets: dict, key, limits: tuple[float, float], now: float) -> TokenBucket:
        b = buckets.get(key)
        if b is None:
            if len(buckets) >= self.MAX_BUCKETS:
                for k in [k for k, v in buckets.items() if v.full(now)]:
                    del buckets[k]
            b = buckets[key] = TokenBucket(*limits)
        return b

    def check(self, tenant: str, integration_id: str, n: int, now: float) -> Refusal | None:
        """None when the n events may pass (taken from both buckets); else the refusal."""
        ib = self._bucket(self._integrations, (tenant, integration_id), self.per_integration, now)
        tb = self._bucket(self._tenants, tenant, self.per_tenant, now)
        iw, tw = ib.wait(n, now), tb.wait(n, now)
        if iw == 0.0 and tw == 0.0:
            ib.tokens -= n
            tb.tokens -= n
            return None
        # the bucket that can never pass, else the one that keeps the request waiting longer
        if tw > iw:
            scope, subject, (rate, burst), w = "tenant", tenant, self.per_tenant, tw
        else:
            scope, subject, (rate, burst), w = "integration", integration_id, self.per_integration, iw
        if math.isinf(w):
            return Refusal(scope, subject, rate, burst, 0.0, n, True)
        return Refusal(scope, subject, rate, burst, w, n, False)


class AddressLimiter:
    """A token bucket per client address, in front of authentication.

    ``take(address, now)`` takes a token (0.0) or says how many seconds until
    one is there (nothing taken); ``give_back(address, now)`` returns the
    token of a request that turned out to be authenticated. So a sender with
    a good key is never slowed here, and an address failing authentication
    gets ``rate`` failures per second after a burst. At most ``MAX_BUCKETS``
    addresses are tracked: refilled buckets are forgotten first, then the
    oldest (memory stays bounded; a forgotten address starts full again).
    """

    MAX_BUCKETS = 10_000

    def __init__(self, limits: tuple[float, float] = (10, 100), max_buckets: int = MAX_BUCKETS):
        TokenBucket(*limits)  # validate now
        self.rate, self.burst = float(limits[0]), float(limits[1])
        self.max_buckets = max_buckets
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, address: str, now: float) -> float:
        b = self._buckets.get(address)
        if b is None:
            if len(self._buckets) >= self.max_buckets:
                for k in [k for k, v in self._buckets.items() if v.full(now)]:
                    del self._buckets[k]
                while len(self._buckets) >= self.max_buckets:
                    del self._buckets[next(iter(self._buckets))]
            b = self._buckets[address] = TokenBucket(self.rate, self.burst)
        return b.take(1, now)

    def give_back(self, address: str, now: float) -> None:
        b = self._buckets.get(address)
        if b is not None:
            b.give(1, now)
