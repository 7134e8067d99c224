"""The analyst's view: a stateless HTTP service (aiohttp) and the query service it shares with the CLI.

Routes (JSON; every tenant served, each request kept inside its tenant's
index and database):

* ``GET /v1/<tenant>/cases`` -- search: ``q``, filters, ``sort``, ``size``,
  ``cursor`` (search_after), ``facets``.
* ``GET /v1/<tenant>/cases/<case_id>`` -- current state (PostgreSQL).
* ``GET /v1/<tenant>/cases/<case_id>/timeline`` -- events in version order.
* ``GET /v1/<tenant>/analytics?metric=count|mtta|mttr&interval=hour|day&group_by=...``
* ``GET /health``

Unknown tenant or bad parameter -> 400 ``{"error", "parameter", "message"}``;
unknown case -> 404.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from pathlib import Path

import orjson
from aiohttp import web

from sinks.elasticsearch import index_name
from sinks.postgres import database_name, read_case, read_timeline
from streams.config import load_tenants
from streams.query import (Analytics, ParamError, build_analytics, build_search, percentiles, shape_percentiles,
                           shape_search)
from streams.metrics import ANALYTICS_PERCENTILES
from streams.settings import Settings

log = logging.getLogger("casestream.api")


class NotFound(Exception):
    pass


class QueryService:
    """Reads a tenant's index and database; shared by the API and the CLI."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tenants = load_tenants(settings.tenants_file)
        self._es = None
        self._pools: dict[str, object] = {}
        self._lock = asyncio.Lock()
        # does the server have the percentiles aggregation? None: not asked yet (remembered per process)
        self.server_percentiles: bool | None = None

    def tenant(self, name: str):
        if name not in self.tenants:
            raise ParamError("tenant", f"unknown tenant {name!r}; use one of {', '.join(sorted(self.tenants))}")
        return self.tenants[name]

    @property
    def es(self):
        if self._es is None:
            from elasticsearch import AsyncElasticsearch

            self._es = AsyncElasticsearch(self.settings.elasticsearch_url, request_timeout=30)
        return self._es

    async def pool(self, tenant: str):
        import asyncpg

        async with self._lock:
            if tenant not in self._pools:
                self._pools[tenant] = await asyncpg.create_pool(
                    self.settings.postgres_dsn, database=database_name(tenant, self.settings.db_prefix),
                    min_size=1, max_size=4)
        return self._pools[tenant]

    def index(self, tenant: str) -> str:
        return index_name(self.tenants[tenant], self.settings.index_prefix)

    async def _search(self, tenant: str, body: dict) -> dict | None:
        from elasticsearch import NotFoundError

        try:
            return (await self.es.search(index=self.index(tenant), body=body)).body
        except NotFoundError:
            return None  # no index yet: nothing projected for this tenant

    async def search(self, tenant: str, params: dict[str, list[str]]) -> dict:
        self.tenant(tenant)
        s = build_search(params)
        resp = await self._search(tenant, s.body)
        if resp is None:
            return {"total": 0, "cases": [], "next_cursor": None, **({"facets": {f: [] for f in s.facets}}
                                                                       if s.facets else {})}
        return shape_search(resp, s)

    async def case(self, tenant: str, case_id: str) -> dict:
        self.tenant(tenant)
        case = await read_case(await self.pool(tenant), case_id)
        if case is None:
            raise NotFound(f"no case {case_id!r} in tenant {tenant}")
        return case

    async def timeline(self, tenant: str, case_id: str) -> list[dict]:
        self.tenant(tenant)
        events = await read_timeline(await self.pool(tenant), case_id)
        if not events:
            raise NotFound(f"no case {case_id!r} in tenant {tenant}")
        return events

    async def analytics(self, tenant: str, params: dict[str, list[str]]) -> dict:
        self.tenant(tenant)
        resp, a = await self._analytics_search(tenant, params)
        buckets = []
        server_pct = _asks_percentiles(a)
        for b in (resp or {}).get("aggregations", {}).get("buckets", {}).get("buckets", []):
            row = {"start": b["key"], "count": b["doc_count"]}
            if a.metric != "count":
                row["mean_seconds"] = (b.get("mean") or {}).get("value")
                if server_pct:
                    row["percentiles_seconds"] = shape_percentiles(b.get("pct"))
            if a.group_by:
                row["groups"] = [{"value": g["key"], "count": g["doc_count"],
                                  **({"mean_seconds": (g.get("mean") or {}).get("value")} if a.metric != "count" else {}),
                                  **({"percentiles_seconds": shape_percentiles(g.get("pct"))}
                                     if a.metric != "count" and server_pct else {})}
                                 for g in b["groups"]["buckets"]]
            buckets.append(row)
        if a.metric != "count" and resp is not None:
            if not server_pct:
                await self._add_percentiles(tenant, a, buckets)
            ANALYTICS_PERCENTILES.labels(tenant, "aggregation" if server_pct else "values").inc()
        return {"metric": a.metric, "interval": a.interval, "group_by": a.group_by, "buckets": buckets}

    async def _analytics_search(self, tenant: str, params: dict[str, list[str]]) -> tuple[dict | None, Analytics]:
        """The analytics search, with the ``percentiles`` aggregation unless the
        server is known to lack it. A server that answers the aggregation with
        an error naming it (Elasticsearch's "Unknown aggregation type
        [percentiles]") lacks it: that is remembered for this process, and the
        search is made again without it."""
        from elasticsearch import BadRequestError

        a = build_analytics(params, with_percentiles=self.server_percentiles is not False)
        try:
            resp = await self._search(tenant, a.body)
        except BadRequestError as exc:
            if not _asks_percentiles(a) or not _names_percentiles(exc):
                raise
            log.warning("the search server has no percentiles aggregation (%s); analytics computes "
                        "percentiles from the values", _es_reason(exc))
            self.server_percentiles = False
            a = build_analytics(params, with_percentiles=False)
            return await self._search(tenant, a.body), a
        if _asks_percentiles(a) and resp is not None:
            self.server_percentiles = True
        return resp, a

    async def _add_percentiles(self, tenant: str, a, buckets: list[dict]) -> None:
        """Percentiles per bucket (and group) computed from the values, for a
        server without the ``percentiles`` aggregation.

        What the API promises either way: pN is the value at rank
        ``N/100 * (n - 1)`` of the bucket's n sorted values (0-based),
        interpolated linearly between the two closest ranks (numpy's default;
        :func:`streams.query.percentiles`). Elasticsearch's aggregation
        computes exactly that for a bucket of fewer than 2 000 values (it
        keeps them all) and estimates it above (TDigest, compression 100:
        typically within a fraction of a percent of the value range); this
        fallback pages every value out with search_after and is exact for
        any count, at the cost of reading every matching document.
        """
        field = "time_to_acknowledge_seconds" if a.metric == "mtta" else "time_to_resolve_seconds"
        step = 3_600_000 if a.interval == "hour" else 86_400_000
        values: dict[tuple, list[float]] = defaultdict(list)
        body = {"size": 1000, "query": a.body["query"], "_source": ["created_at", field] + (
            [a.group_by] if a.group_by else []), "sort": [{"case_id": "asc"}]}
        while True:
            resp = await self._search(tenant, body)
            hits = (resp or {}).get("hits", {}).get("hits", [])
            for h in hits:
                src = h["_source"]
                start = src["created_at"] - src["created_at"] % step
                values[(start, None)].append(src[field])
                if a.group_by:
                    values[(start, src.get(a.group_by))].append(src[field])
            if len(hits) < body["size"]:
                break
            body["search_after"] = hits[-1]["sort"]
        for row in buckets:
            row["percentiles_seconds"] = percentiles(values.get((row["start"], None), []))
            for g in row.get("groups", []):
                g["percentiles_seconds"] = percentiles(values.get((row["start"], g["value"]), []))

    async def close(self) -> None:
        if self._es is not None:
            await self._es.close()
        for pool in self._pools.values():
            await pool.close()


def _asks_percentiles(a: Analytics) -> bool:
    return "pct" in a.body["aggs"]["buckets"]["aggs"]


def _names_percentiles(exc) -> bool:
    """A 400 whose error names the percentiles aggregation (the only thing
    called that in the request): the server does not know it."""
    return "percentiles" in orjson.dumps(getattr(exc, "body", None) or str(exc)).decode().lower()


def _es_reason(exc) -> str:
    body = getattr(exc, "body", None)
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("reason") if isinstance(err, dict) else err or exc)[:200]


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _params(request: web.Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in request.query.items():
        out.setdefault(k, []).append(v)
    return out


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ParamError as exc:
        return _json(exc.to_dict(), 400)
    except NotFound as exc:
        return _json({"error": "not_found", "message": str(exc)}, 404)


ROUTE_SETS = ("all", "query", "intake")
QUERY_KEY = web.AppKey("query", QueryService)
OPENAPI_FILE = Path(__file__).resolve().parent.parent / "schemas" / "openapi.json"


def create_api(settings: Settings, routes: str = "all") -> web.Application:
    """The HTTP service: ``routes`` = ``query`` (the analyst's view), ``intake``
    (the gateway, ``streams/gateway.py``) or ``all``. /health, /metrics and
    /openapi.json are always served."""
    if routes not in ROUTE_SETS:
        raise ValueError(f"routes: one of {', '.join(ROUTE_SETS)}")
    app = web.Application(middlewares=[errors])

    async def health(request):
        return _json({"status": "ok"})

    async def prometheus(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(request):
        return web.Response(body=OPENAPI_FILE.read_bytes(), content_type="application/json")

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/openapi.json", openapi)
    if routes in ("all", "intake"):
        from streams.gateway import add_intake_routes

        add_intake_routes(app, settings)
    if routes in ("all", "query"):
        add_query_routes(app, settings)
    return app


def add_query_routes(app: web.Application, settings: Settings) -> None:
    svc = QueryService(settings)
    app[QUERY_KEY] = svc

    async def search(request):
        return _json(await svc.search(request.match_info["tenant"], _params(request)))

    async def case(request):
        return _json(await svc.case(request.match_info["tenant"], request.match_info["case_id"]))

    async def timeline(request):
        return _json({"case_id": request.match_info["case_id"],
                      "events": await svc.timeline(request.match_info["tenant"], request.match_info["case_id"])})

    async def analytics(request):
        return _json(await svc.analytics(request.match_info["tenant"], _params(request)))

    async def on_cleanup(app):
        await svc.close()

    app.router.add_get("/v1/{tenant}/cases", search)
    app.router.add_get("/v1/{tenant}/cases/{case_id}", case)
    app.router.add_get("/v1/{tenant}/cases/{case_id}/timeline", timeline)
    app.router.add_get("/v1/{tenant}/analytics", analytics)
    app.on_cleanup.append(on_cleanup)
