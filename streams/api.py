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
from collections import defaultdict
from pathlib import Path

import orjson
from aiohttp import web

from sinks.elasticsearch import index_name
from sinks.postgres import database_name, read_case, read_timeline
from streams.config import load_tenants
from streams.query import ParamError, build_analytics, build_search, percentiles, shape_search
from streams.settings import Settings


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
        a = build_analytics(params)
        resp = await self._search(tenant, a.body)
        buckets = []
        for b in (resp or {}).get("aggregations", {}).get("buckets", {}).get("buckets", []):
            row = {"start": b["key"], "count": b["doc_count"]}
            if a.metric != "count":
                row["mean_seconds"] = (b.get("mean") or {}).get("value")
            if a.group_by:
                row["groups"] = [{"value": g["key"], "count": g["doc_count"],
                                  **({"mean_seconds": (g.get("mean") or {}).get("value")} if a.metric != "count" else {})}
                                 for g in b["groups"]["buckets"]]
            buckets.append(row)
        if a.metric != "count" and resp is not None:
            await self._add_percentiles(tenant, a, buckets)
        return {"metric": a.metric, "interval": a.interval, "group_by": a.group_by, "buckets": buckets}

    async def _add_percentiles(self, tenant: str, a, buckets: list[dict]) -> None:
        """Percentiles per bucket (and group), computed from the values themselves.

        The percentiles aggregation is not available on every server (the
        local stand-in lacks it), and nearest-rank from the raw values is
        exact, so the values are paged out with search_after.
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
