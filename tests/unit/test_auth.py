"""streams.domain.auth: integration keys, request signatures, rate limits."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets

import pytest

from streams.domain.auth import (
    KEY_PREFIX, RateLimiter, Refusal, TokenBucket, hash_key, key_tenant, new_key, sign, verify_signature,
)

SECRET = "whsec_" + "s" * 32
BODY = b'{"status": "firing", "alerts": []}'
T = 1_800_000_000


# --------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["on-call", "case-management", "a", "x" * 63, "t1-2"])
def test_key_round_trip(tenant):
    random_part = secrets.token_urlsafe(24)
    key = new_key(tenant, random_part)
    assert key == f"cs_{tenant}_{random_part}"
    assert key.startswith(KEY_PREFIX)
    assert key_tenant(key) == tenant


def test_random_part_may_hold_underscores_and_dashes():
    key = new_key("on-call", "_-" * 16)
    assert key_tenant(key) == "on-call"


@pytest.mark.parametrize("key", [
    "", "cs_", "cs_on-call", "cs_on-call_", "cs__" + "a" * 32,
    "xs_on-call_" + "a" * 32,                 # wrong prefix
    "CS_on-call_" + "a" * 32,
    "cs_On-call_" + "a" * 32,                 # tenant names are lower case
    "cs_1tenant_" + "a" * 32,                 # ... and start with a letter
    "cs_" + "x" * 64 + "_" + "a" * 32,        # tenant name too long
    "cs_on-call_" + "a" * 15,                 # random part too short
    "cs_on-call_" + "a" * 129,                # ... too long
    "cs_on-call_" + "a" * 31 + "=",           # not url-safe
    "cs_on-call_" + "a" * 31 + "/",
    "cs_on-call_" + "a" * 31 + "é",
    "cs_on call_" + "a" * 32,
    " cs_on-call_" + "a" * 32,
    "cs_on-call_" + "a" * 32 + "\n",
    None, 42, b"cs_on-call_" + b"a" * 32,
])
def test_key_tenant_rejects_foreign_formats(key):
    assert key_tenant(key) is None


@pytest.mark.parametrize("tenant, random_part", [
    ("On-call", "a" * 32), ("on_call", "a" * 32), ("", "a" * 32), ("on-call", "short"), ("on-call", "a" * 31 + "+"),
])
def test_new_key_refuses_what_key_tenant_would_not_read(tenant, random_part):
    with pytest.raises(ValueError):
        new_key(tenant, random_part)


def test_hash_is_sha256_hex_and_not_the_key():
    key = new_key("on-call", "k" * 32)
    h = hash_key(key)
    assert h == hashlib.sha256(key.encode()).hexdigest()
    assert len(h) == 64 and key not in h
    assert hash_key(key) == h
    assert hash_key(new_key("on-call", "j" * 32)) != h


# --------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------


def test_sign_is_the_documented_hmac():
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, T) == f"t={T},v1={expected}"


def test_valid_signature():
    assert verify_signature(SECRET, sign(SECRET, BODY, T), BODY, T) is None
    assert verify_signature(SECRET, sign(SECRET, b"", T), b"", T + 10) is None


def test_wrong_secret():
    assert verify_signature(SECRET, sign("whsec_other", BODY, T), BODY, T) == "signature mismatch"


def test_tampered_body():
    assert verify_signature(SECRET, sign(SECRET, BODY, T), BODY + b" ", T) == "signature mismatch"
    assert verify_signature(SECRET, sign(SECRET, BODY, T), BODY.replace(b"firing", b"resolved"), T) \
        == "signature mismatch"


def test_timestamp_is_signed_too():
    mac = sign(SECRET, BODY, T).split("v1=")[1]
    assert verify_signature(SECRET, f"t={T + 1},v1={mac}", BODY, T) == "signature mismatch"


@pytest.mark.parametrize("skew, ok", [(0, True), (300, True), (-300, True), (301, False), (-301, False),
                                      (86400, False), (-86400, False)])
def test_tolerance_boundary_both_ways(skew, ok):
    # skew > 0: the signature is older than now (stale); < 0: from the future
    header = sign(SECRET, BODY, T - skew)
    why = verify_signature(SECRET, header, BODY, T)
    assert (why is None) == ok
    if not ok:
        assert why == "timestamp outside the 300 s tolerance"


def test_tolerance_is_a_parameter():
    header = sign(SECRET, BODY, T - 60)
    assert verify_signature(SECRET, header, BODY, T, tolerance=60) is None
    assert verify_signature(SECRET, header, BODY, T, tolerance=59) == "timestamp outside the 59 s tolerance"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing(header):
    assert verify_signature(SECRET, header, BODY, T) == "missing signature"


@pytest.mark.parametrize("header", [
    "garbage",
    "v1=abc",                                    # no timestamp
    f"t={T}",                                    # no signature
    f"t={T},v0=abc",                             # only unknown schemes
    f"t=abc,v1={'0' * 64}",                      # timestamp not a number
    f"t=-{T},v1={'0' * 64}",
    f"t={T}.5,v1={'0' * 64}",
    f"t={T},t={T},v1={'0' * 64}",                # two timestamps
    f"t={T},v1=",                                # empty value
    f"t={T},,v1={'0' * 64}",
    f"t={T};v1={'0' * 64}",
    "t=" + "9" * 40 + ",v1=" + "0" * 64,         # absurd timestamp
    f"t={T},v1=" + "0" * 10000,                  # absurdly long
])
def test_malformed(header):
    assert verify_signature(SECRET, header, BODY, T) == "malformed signature header"


def test_non_ascii_signature_is_a_mismatch_not_a_crash():
    assert verify_signature(SECRET, f"t={T},v1=é{'0' * 63}", BODY, T) == "signature mismatch"


def test_spaces_and_unknown_schemes_are_tolerated():
    mac = sign(SECRET, BODY, T).split("v1=")[1]
    assert verify_signature(SECRET, f" t={T} , v0=whatever , v1={mac} ", BODY, T) is None


def test_several_v1_values_any_one_matches():
    old = sign("whsec_old_secret", BODY, T).split("v1=")[1]
    new = sign(SECRET, BODY, T).split("v1=")[1]
    assert verify_signature(SECRET, f"t={T},v1={old},v1={new}", BODY, T) is None
    assert verify_signature(SECRET, f"t={T},v1={new},v1={old}", BODY, T) is None
    assert verify_signature("whsec_old_secret", f"t={T},v1={new},v1={old}", BODY, T) is None
    assert verify_signature("whsec_third", f"t={T},v1={new},v1={old}", BODY, T) == "signature mismatch"


def test_wrong_signature_with_stale_timestamp_says_mismatch():
    assert verify_signature(SECRET, sign("whsec_other", BODY, T - 1000), BODY, T) == "signature mismatch"


# --------------------------------------------------------------------------
# token bucket
# --------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_rate():
    b = TokenBucket(rate=10, burst=100)
    assert b.take(100, now=1000.0) == 0.0          # full at first use
    assert b.take(1, now=1000.0) == pytest.approx(0.1)
    assert b.take(5, now=1000.0) == pytest.approx(0.5)
    assert b.take(5, now=1000.4) == pytest.approx(0.1)   # 4 tokens refilled, 1 missing; nothing taken
    assert b.take(5, now=1000.5) == 0.0                  # 5 tokens
    assert b.take(1, now=1000.5) == pytest.approx(0.1)


def test_bucket_refill_is_capped_at_burst():
    b = TokenBucket(rate=10, burst=100)
    assert b.take(100, now=0.0) == 0.0
    assert b.take(100, now=1_000_000.0) == 0.0           # a long idle refills to burst, not beyond
    assert b.take(1, now=1_000_000.0) == pytest.approx(0.1)


def test_refused_take_takes_nothing():
    b = TokenBucket(rate=1, burst=10)
    assert b.take(8, now=0.0) == 0.0
    assert b.take(5, now=0.0) == pytest.approx(3.0)
    assert b.take(5, now=0.0) == pytest.approx(3.0)      # still 2 tokens: the refusals took nothing
    assert b.take(2, now=0.0) == 0.0


def test_bucket_clock_going_back_refills_nothing():
    b = TokenBucket(rate=1, burst=10)
    assert b.take(10, now=100.0) == 0.0
    assert b.take(1, now=50.0) == pytest.approx(1.0)
    assert b.take(1, now=101.0) == 0.0


def test_request_larger_than_burst_never_passes():
    b = TokenBucket(rate=1000, burst=10)
    assert b.take(11, now=0.0) == math.inf
    assert b.take(11, now=1e9) == math.inf
    assert b.take(10, now=1e9) == 0.0


def test_zero_tokens_always_pass():
    b = TokenBucket(rate=1, burst=1)
    assert b.take(1, now=0.0) == 0.0
    assert b.take(0, now=0.0) == 0.0


@pytest.mark.parametrize("rate, burst", [(0, 10), (-1, 10), (1, 0), (1, 0.5), (math.inf, 10), (1, math.inf),
                                         (math.nan, 10)])
def test_bucket_limits_are_validated(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


# --------------------------------------------------------------------------
# rate limiter
# --------------------------------------------------------------------------


def test_defaults_are_generous():
    rl = RateLimiter()
    assert rl.per_integration == (50, 500) and rl.per_tenant == (500, 5000)
    assert rl.check("on-call", "int_a", 500, now=0.0) is None


def test_integration_refusal_names_the_integration():
    rl = RateLimiter(per_integration=(1, 5), per_tenant=(100, 1000))
    assert rl.check("on-call", "int_a", 5, now=0.0) is None
    r = rl.check("on-call", "int_a", 2, now=0.0)
    assert r == Refusal("integration", "int_a", 1.0, 5.0, pytest.approx(2.0), 2, False)
    assert "int_a" in r.message and "retry after" in r.message
    assert rl.check("on-call", "int_b", 5, now=0.0) is None        # another integration has its own bucket
    assert rl.check("on-call", "int_a", 2, now=2.0) is None         # refilled


def test_tenant_bucket_is_shared_by_its_integrations():
    rl = RateLimiter(per_integration=(100, 100), per_tenant=(1, 10))
    assert rl.check("on-call", "int_a", 6, now=0.0) is None
    r = rl.check("on-call", "int_b", 6, now=0.0)
    assert r is not None and (r.scope, r.subject) == ("tenant", "on-call")
    assert r.retry_after == pytest.approx(2.0) and (r.rate, r.burst) == (1.0, 10.0)
    assert rl.check("case-management", "int_c", 10, now=0.0) is None   # other tenants are not affected
    assert rl.check("on-call", "int_b", 4, now=0.0) is None


def test_nothing_taken_from_the_integration_when_the_tenant_refuses():
    rl = RateLimiter(per_integration=(1, 10), per_tenant=(1, 10))
    assert rl.check("on-call", "int_a", 10, now=0.0) is None           # the tenant bucket is now empty
    r = rl.check("on-call", "int_b", 10, now=0.0)
    assert r.scope == "tenant"
    # int_b's bucket is still full: once the tenant refills, int_b passes its whole burst
    assert rl.check("on-call", "int_b", 10, now=10.0) is None


def test_nothing_taken_from_the_tenant_when_the_integration_refuses():
    rl = RateLimiter(per_integration=(1, 5), per_tenant=(1, 10))
    assert rl.check("on-call", "int_a", 5, now=0.0) is None
    assert rl.check("on-call", "int_a", 5, now=0.0).scope == "integration"
    assert rl.check("on-call", "int_b", 5, now=0.0) is None            # the tenant still held 5


def test_both_refuse_the_longer_wait_is_reported():
    rl = RateLimiter(per_integration=(1, 10), per_tenant=(10, 10))
    assert rl.check("on-call", "int_a", 10, now=0.0) is None
    r = rl.check("on-call", "int_a", 10, now=0.0)
    assert (r.scope, r.retry_after) == ("integration", pytest.approx(10.0))   # tenant would allow after 1 s


def test_request_larger_than_a_burst_is_refused_with_retry_after_zero():
    rl = RateLimiter(per_integration=(50, 500), per_tenant=(500, 5000))
    r = rl.check("on-call", "int_a", 501, now=0.0)
    assert r is not None and r.scope == "integration" and r.subject == "int_a"
    assert r.retry_after == 0 and r.too_large and r.requested == 501
    assert "exceed the burst" in r.message
    rl = RateLimiter(per_integration=(50, 10_000), per_tenant=(500, 5000))
    r = rl.check("on-call", "int_a", 6000, now=0.0)
    assert (r.scope, r.subject, r.retry_after, r.too_large) == ("tenant", "on-call", 0, True)
    assert rl.check("on-call", "int_a", 5000, now=0.0) is None          # the refusals took nothing


def test_forgotten_full_buckets_behave_as_new(monkeypatch):
    monkeypatch.setattr(RateLimiter, "MAX_BUCKETS", 3)
    rl = RateLimiter(per_integration=(1, 2), per_tenant=(1000, 1000))
    for i in range(10):
        assert rl.check("on-call", f"int_{i}", 2, now=float(i * 10)) is None
    assert len(rl._integrations) <= 3
    assert rl.check("on-call", "int_9", 1, now=90.0).scope == "integration"   # a recent, empty one is kept


def test_limiter_limits_are_validated():
    with pytest.raises(ValueError):
        RateLimiter(per_integration=(0, 10))
    with pytest.raises(ValueError):
        RateLimiter(per_tenant=(10, 0))


# --------------------------------------------------------------------------
# replays: a signature is good once within its window
# --------------------------------------------------------------------------


def test_a_signature_is_accepted_once():
    from streams.domain.auth import REPLAYED, SeenSignatures

    seen = SeenSignatures()
    header = sign(SECRET, BODY, T)
    assert verify_signature(SECRET, header, BODY, T, seen=seen) is None
    assert verify_signature(SECRET, header, BODY, T + 5, seen=seen) == REPLAYED
    assert REPLAYED.startswith("signature already used")
    # the same MAC in another header (an extra v1 value, spaces, another order) is the same signature
    mac = header.split("v1=")[1]
    assert verify_signature(SECRET, f" v1={'0' * 64} , t={T}, v1={mac}", BODY, T + 6, seen=seen) == REPLAYED
    # another body, another time, another secret: other signatures
    assert verify_signature(SECRET, sign(SECRET, BODY + b" ", T), BODY + b" ", T, seen=seen) is None
    assert verify_signature(SECRET, sign(SECRET, BODY, T + 1), BODY, T + 1, seen=seen) is None
    assert verify_signature("whsec_other", sign("whsec_other", BODY, T), BODY, T, seen=seen) is None
    # without a record of what was seen, nothing is refused as a replay (the old behaviour)
    assert verify_signature(SECRET, header, BODY, T) is None


def test_a_refused_signature_is_not_recorded():
    from streams.domain.auth import SeenSignatures

    seen = SeenSignatures()
    stale = sign(SECRET, BODY, T - 301)
    assert verify_signature(SECRET, stale, BODY, T, seen=seen).startswith("timestamp outside")
    assert verify_signature(SECRET, sign("whsec_wrong", BODY, T), BODY, T, seen=seen) == "signature mismatch"
    assert len(seen) == 0
    assert verify_signature(SECRET, sign(SECRET, BODY, T), BODY, T, seen=seen) is None
    assert len(seen) == 1


def test_seen_signatures_expire_after_their_window():
    from streams.domain.auth import SeenSignatures

    seen = SeenSignatures()
    header = sign(SECRET, BODY, T)
    assert verify_signature(SECRET, header, BODY, T - 300, seen=seen) is None    # t may lie ahead too
    assert len(seen) == 1
    assert verify_signature(SECRET, header, BODY, T + 300, seen=seen).startswith("signature already used")
    assert seen.claim("other", T + 1000, T + 301)                              # any call expires what is due
    assert len(seen) == 1 and "other" in seen
    assert verify_signature(SECRET, header, BODY, T + 301, seen=seen).startswith("timestamp outside")


def test_seen_signatures_are_capped_dropping_the_soonest_to_expire():
    from streams.domain.auth import SeenSignatures

    seen = SeenSignatures(max_entries=3)
    for key, expires in (("a", 50), ("b", 10), ("c", 30)):
        assert seen.claim(key, expires, 0)
    assert seen.claim("d", 40, 0)
    assert len(seen) == 3 and "b" not in seen and {"a", "c", "d"} <= set(seen)
    assert not seen.claim("a", 60, 1)          # still held
    with pytest.raises(ValueError):
        SeenSignatures(max_entries=0)


def test_a_released_signature_may_be_used_again():
    from streams.domain.auth import SeenSignatures, signature_key

    seen = SeenSignatures()
    header = sign(SECRET, BODY, T)
    assert verify_signature(SECRET, header, BODY, T, seen=seen) is None
    seen.release(signature_key(SECRET, header, BODY))      # nothing was accepted (e.g. Kafka down): retry allowed
    assert verify_signature(SECRET, header, BODY, T, seen=seen) is None
    assert verify_signature(SECRET, header, BODY, T, seen=seen).startswith("signature already used")
    assert signature_key(SECRET, "garbage", BODY) is None
    seen.release("never claimed")               # harmless
    for _ in range(5):                          # claim/release cycles keep the bookkeeping bounded
        seen.release(signature_key(SECRET, header, BODY))
        assert verify_signature(SECRET, header, BODY, T, seen=seen) is None
    assert len(seen) == 1 and len(seen._heap) <= 2 * seen.max_entries + 8


def test_address_limiter_counts_only_what_is_not_given_back_and_stays_bounded():
    from streams.domain.auth import AddressLimiter

    lim = AddressLimiter((1, 3), max_buckets=4)
    for _ in range(10):                       # authenticated requests: taken and given back
        assert lim.take("a", 0.0) == 0.0
        lim.give_back("a", 0.0)
    assert [lim.take("a", 0.0) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    assert lim.take("a", 1.0) == 0.0           # refilled at 1/s
    assert lim.take("b", 1.0) == 0.0           # another address, another bucket
    for i in range(20):
        lim.take(f"c{i}", 1.0)
    assert len(lim) <= 4
    lim.give_back("never seen", 1.0)          # harmless
    with pytest.raises(ValueError):
        AddressLimiter((0, 1))
