"""Integrations and their keys, in each tenant's PostgreSQL database.

An *integration* connects one monitor of one tenant (``KINDS``) to the intake
gateway. Its *key* (``cs_<tenant>_<random>``, see ``streams.domain.auth``) is
the secret the monitor sends: in the URL (``/v1/integrations/<key>/<kind>``)
or as PagerDuty's ``routing_key``. Only ``sha256(key)`` is stored
(``integration_keys``, migration 0003); the key itself is shown once, by
``create`` and ``rotate``. An integration created with ``signed=True`` also
has a signing secret (``whsec_...``) for ``X-Casestream-Signature``; it is
stored as it is, because the verifier has to recompute the HMAC with it.

* ``rotate`` adds a key and makes the current keys expire after an overlap
  (24 h by default): during the overlap old and new keys are both valid, so
  the monitor can be reconfigured without losing events. A key's expiry is
  only ever shortened, never extended.
* ``revoke`` invalidates the integration and all of its keys at once (an
  integration is not un-revoked: create a new one).
* Validity (expiry, revocation) is judged by PostgreSQL's clock.

``authenticate`` is on the gateway's hot path. Results are cached per key
hash for ``cache_seconds`` (5 s by default) -- valid keys, and unknown,
expired or revoked ones alike, so a flood of bad keys does not reach
PostgreSQL either -- and concurrent look-ups of one key share one query.
Misses are kept apart (at most ``MAX_MISSES``, the oldest dropped first), so
a flood of made-up keys can never push valid keys out of the cache; how
many *different* made-up keys reach PostgreSQL is bounded by the gateway's
limiter of failed authentications per client address.
Consequence: a revocation or rotation takes effect in *other* processes (each
gateway instance has its own cache) within ``cache_seconds``; the process
that revokes or rotates drops its own cached entries at once. A positive
entry never outlives the key's own ``expires_at``. The cache holds at most
``MAX_CACHE`` entries. PostgreSQL errors are raised, never cached: the
gateway should answer 503 to them, not 401.

The tenant databases are ``sinks.postgres.database_name(tenant, db_prefix)``;
the store creates and migrates a tenant's database on its first use of that
tenant (``sinks.postgres.migrate``: idempotent, under an advisory lock), then
keeps one small asyncpg pool per tenant.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable

import orjson

from streams.domain.auth import hash_key, key_tenant, new_key

KINDS = ("pagerduty", "alertmanager", "grafana", "datadog", "events", "slack")
# slack: Slack's interactivity requests (buttons); its signing secret is the
# one Slack issues for the app (given at create), not one casestream makes
ID_PREFIX = "int_"
SECRET_PREFIX = "whsec_"
MAX_NAME = 200
MAX_OPTIONS_BYTES = 16 * 1024
_ID_RE = re.compile(r"int_[0-9a-f]{12}", re.ASCII)


@dataclass(frozen=True)
class Integration:
    """One integration. Cached and shared between requests: treat ``options`` as read-only."""

    id: str
    tenant: str
    kind: str
    name: str
    options: dict
    signing_secret: str | None
    created_at: datetime
    revoked_at: datetime | None


class IntegrationError(ValueError):
    """Unknown tenant or integration, bad kind, name or options; the message says what to do."""


def endpoint(kind: str, key: str) -> str:
    """How a monitor of ``kind`` sends with ``key``."""
    if kind == "pagerduty":
        return f"POST /v2/enqueue with routing_key={key}"
    if kind == "slack":
        return f"Slack app Interactivity Request URL: https://<gateway>/v1/integrations/{key}/slack/actions"
    return f"POST /v1/integrations/{key}/{kind}"


class IntegrationStore:
    """Integrations of the tenants named by ``tenants`` (names, or a mapping keyed by name)."""

    MAX_CACHE = 100_000
    MAX_MISSES = 10_000
    POOL_MAX = 4

    def __init__(self, dsn: str, db_prefix: str, tenants: Iterable[str], cache_seconds: float = 5.0,
                 *, clock: Callable[[], float] = time.monotonic):
        self.dsn = dsn
        self.db_prefix = db_prefix
        self.tenants = frozenset(tenants)
        self.cache_seconds = float(cache_seconds)
        self._clock = clock                     # cache expiry only (validity is PostgreSQL's clock)
        self._pools: dict[str, object] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache: dict[str, tuple[float, Integration | None]] = {}   # key hash -> (expires, result)
        self._misses: dict[str, float] = {}     # key hash -> expires: unknown, expired or revoked keys
        self._inflight: dict[str, asyncio.Future] = {}

    # -- plumbing ---------------------------------------------------------------

    def _check_tenant(self, tenant: str) -> None:
        if tenant not in self.tenants:
            raise IntegrationError(f"unknown tenant {tenant!r}; configured tenants are: "
                                   f"{', '.join(sorted(self.tenants)) or 'none'}")

    async def _pool(self, tenant: str):
        pool = self._pools.get(tenant)
        if pool is not None:
            return pool
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            pool = self._pools.get(tenant)
            if pool is None:
                import asyncpg

                from sinks.postgres import database_name, migrate

                name = database_name(tenant, self.db_prefix)
                await migrate(self.dsn, name)
                pool = await asyncpg.create_pool(self.dsn, database=name, min_size=1, max_size=self.POOL_MAX,
                                                 timeout=10, command_timeout=10)
                self._pools[tenant] = pool
        return pool

    def _unknown(self, tenant: str, integration_id: str) -> IntegrationError:
        return IntegrationError(f"no integration {integration_id!r} in tenant {tenant!r}; "
                                f"see 'casestream integrations list --tenant {tenant}'")

    def _forget(self, integration_id: str) -> None:
        """Drop this process's cached look-ups of an integration's keys."""
        for h in [h for h, (_, i) in self._cache.items() if i is not None and i.id == integration_id]:
            del self._cache[h]

    # -- management ---------------------------------------------------------------

    async def create(self, tenant: str, kind: str, name: str, options: dict | None = None,
                     signed: bool = False, signing_secret: str | None = None) -> tuple[Integration, str]:
        """A new integration and its key (the key is not stored: show it once).
        ``signing_secret``: a secret issued elsewhere (Slack's app signing secret)."""
        self._check_tenant(tenant)
        if kind not in KINDS:
            raise IntegrationError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if kind == "slack" and not signing_secret:
            raise IntegrationError("a slack integration needs Slack's signing secret (--slack-signing-secret; "
                                   "Slack app settings, Basic Information)")
        if signing_secret is not None and (kind != "slack" or signed):
            raise IntegrationError("a given signing secret is for slack integrations only")
        name = (name or "").strip()
        if not name or len(name) > MAX_NAME:
            raise IntegrationError(f"name: 1-{MAX_NAME} characters, got {len(name)}")
        options = {} if options is None else options
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise IntegrationError("options: a JSON object (string keys)")
        try:
            options_json = orjson.dumps(options).decode()
        except TypeError as exc:
            raise IntegrationError(f"options: not JSON-serializable ({exc})") from None
        if len(options_json) > MAX_OPTIONS_BYTES:
            raise IntegrationError(f"options: {len(options_json)} bytes as JSON; at most {MAX_OPTIONS_BYTES}")
        integration_id = ID_PREFIX + secrets.token_hex(6)
        key = new_key(tenant, secrets.token_urlsafe(24))
        secret = SECRET_PREFIX + secrets.token_urlsafe(24) if signed else signing_secret
        pool = await self._pool(tenant)
        async with pool.acquire() as conn, conn.transaction():
            created_at = await conn.fetchval(
                "INSERT INTO integrations (id, kind, name, options, signing_secret) "
                "VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING created_at",
                integration_id, kind, name, options_json, secret)
            await conn.execute("INSERT INTO integration_keys (key_hash, integration_id, created_at) "
                               "VALUES ($1, $2, $3)", hash_key(key), integration_id, created_at)
        return Integration(integration_id, tenant, kind, name, orjson.loads(options_json), secret,
                           created_at, None), key

    async def list(self, tenant: str) -> list[dict]:
        """Every integration of the tenant, oldest first, with its keys' dates and validity.
        Never a key, a key hash or a signing secret."""
        self._check_tenant(tenant)
        pool = await self._pool(tenant)
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                "SELECT id, kind, name, options::text AS options, signing_secret IS NOT NULL AS signed, "
                "created_at, revoked_at FROM integrations ORDER BY created_at, id")
            keys = await conn.fetch(
                "SELECT integration_id, created_at, expires_at, revoked_at, "
                "(revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())) AS valid "
                "FROM integration_keys ORDER BY created_at, expires_at NULLS LAST")
        by_id: dict[str, list[dict]] = {}
        for k in keys:
            by_id.setdefault(k["integration_id"], []).append(
                {"created_at": k["created_at"], "expires_at": k["expires_at"], "revoked_at": k["revoked_at"],
                 "valid": k["valid"]})
        out = []
        for r in rows:
            ks = by_id.get(r["id"], [])
            if r["revoked_at"] is not None:
                for k in ks:
                    k["valid"] = False
            out.append({"id": r["id"], "kind": r["kind"], "name": r["name"], "options": orjson.loads(r["options"]),
                        "signed": r["signed"], "created_at": r["created_at"], "revoked_at": r["revoked_at"],
                        "keys": ks})
        return out

    async def rotate(self, tenant: str, integration_id: str, overlap_seconds: int = 86400) -> str:
        """A new key; the integration's current keys stay valid ``overlap_seconds`` more (0: none)."""
        self._check_tenant(tenant)
        if not _ID_RE.fullmatch(integration_id or ""):
            raise self._unknown(tenant, integration_id)
        if overlap_seconds < 0:
            raise IntegrationError(f"overlap: zero or more seconds, got {overlap_seconds}")
        pool = await self._pool(tenant)
        key = new_key(tenant, secrets.token_urlsafe(24))
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT revoked_at FROM integrations WHERE id = $1 FOR UPDATE", integration_id)
            if row is None:
                raise self._unknown(tenant, integration_id)
            if row["revoked_at"] is not None:
                raise IntegrationError(f"integration {integration_id} was revoked at "
                                       f"{row['revoked_at'].isoformat()}; create a new one")
            await conn.execute(
                "UPDATE integration_keys "
                "SET expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + make_interval(secs => $2)) "
                "WHERE integration_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
                integration_id, float(overlap_seconds))
            await conn.execute("INSERT INTO integration_keys (key_hash, integration_id) VALUES ($1, $2)",
                               hash_key(key), integration_id)
        self._forget(integration_id)
        return key

    async def revoke(self, tenant: str, integration_id: str) -> None:
        """Invalidate the integration and all its keys now (idempotent)."""
        self._check_tenant(tenant)
        if not _ID_RE.fullmatch(integration_id or ""):
            raise self._unknown(tenant, integration_id)
        pool = await self._pool(tenant)
        async with pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE integrations SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING id",
                integration_id)
            if found is None:
                raise self._unknown(tenant, integration_id)
            await conn.execute("UPDATE integration_keys SET revoked_at = now() "
                               "WHERE integration_id = $1 AND revoked_at IS NULL", integration_id)
        self._forget(integration_id)

    # -- the gateway's look-up -------------------------------------------------------

    async def authenticate(self, key: str) -> Integration | None:
        """The integration of a valid key; None for a key not in our format, of an
        unknown tenant, or unknown, expired or revoked. Cached (module docstring)."""
        tenant = key_tenant(key)
        if tenant is None or tenant not in self.tenants:
            return None
        h = hash_key(key)
        hit = self._cache.get(h)
        if hit is not None:
            if hit[0] > self._clock():
                return hit[1]
            del self._cache[h]
        miss = self._misses.get(h)
        if miss is not None:
            if miss > self._clock():
                return None
            del self._misses[h]
        fut = self._inflight.get(h)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup(tenant, h))
            self._inflight[h] = fut
            fut.add_done_callback(lambda f, h=h: self._done(h, f))
        return await asyncio.shield(fut)

    def _done(self, h: str, fut: asyncio.Future) -> None:
        self._inflight.pop(h, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: no "never retrieved" noise when every waiter has gone

    async def _lookup(self, tenant: str, h: str) -> Integration | None:
        row = await self._fetch(tenant, h)
        result = None
        ttl = self.cache_seconds
        if row is not None:
            result = Integration(row["id"], tenant, row["kind"], row["name"], orjson.loads(row["options"]),
                                 row["signing_secret"], row["created_at"], row["revoked_at"])
            if row["remaining"] is not None:
                ttl = min(ttl, row["remaining"])
        if ttl > 0:
            if result is None:
                self._remember_miss(h, self._clock() + ttl)
            else:
                self._remember(h, self._clock() + ttl, result)
        return result

    async def _fetch(self, tenant: str, h: str):
        """The row of a valid key's integration (None: unknown, expired or revoked): one query."""
        pool = await self._pool(tenant)
        return await pool.fetchrow(
            "SELECT i.id, i.kind, i.name, i.options::text AS options, i.signing_secret, i.created_at, "
            "i.revoked_at, EXTRACT(EPOCH FROM k.expires_at - now())::float8 AS remaining "
            "FROM integration_keys k JOIN integrations i ON i.id = k.integration_id "
            "WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND i.revoked_at IS NULL "
            "AND (k.expires_at IS NULL OR k.expires_at > now())", h)

    def _remember_miss(self, h: str, expires: float) -> None:
        if len(self._misses) >= self.MAX_MISSES:
            now = self._clock()
            for k in [k for k, e in self._misses.items() if e <= now]:
                del self._misses[k]
            while len(self._misses) >= self.MAX_MISSES:  # still full: the oldest go
                del self._misses[next(iter(self._misses))]
        self._misses.pop(h, None)
        self._misses[h] = expires

    def _remember(self, h: str, expires: float, result: Integration | None) -> None:
        if len(self._cache) >= self.MAX_CACHE:
            now = self._clock()
            for k in [k for k, (e, _) in self._cache.items() if e <= now]:
                del self._cache[k]
            while len(self._cache) >= self.MAX_CACHE:  # still full: the oldest entries go
                del self._cache[next(iter(self._cache))]
        self._cache.pop(h, None)
        self._cache[h] = (expires, result)

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        self._cache.clear()
        self._misses.clear()
        for p in pools:
            await p.close()
