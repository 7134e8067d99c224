"""The analyst's queries, as pure functions: parameters -> Elasticsearch request.

Every parameter is validated here; a bad one raises :class:`ParamError`
naming the parameter and why (the API answers 400 with it). Nothing here
does I/O, so the HTTP service and the CLI share it and it is unit-tested
without a server.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

import orjson

from streams.domain.case_schema import STORED_STATE

FILTERS = ("status", "severity", "priority", "source", "project", "tag", "urgency", "assignee_id")
_FIELD_OF = {"tag": "tags"}
FACETS = ("status", "severity", "priority", "source", "project", "tags", "urgency", "assignee_id")
SORTS = {"created_at", "updated_at", "last_seen_at", "occurrence_count", "severity", "priority", "status"}
METRICS = ("count", "mtta", "mttr")
INTERVALS = {"hour": "1h", "day": "1d"}
GROUP_BY = ("severity", "priority", "status", "source", "project", "urgency")
MAX_SIZE = 200
PERCENTS = (50, 90, 95, 99)  # the percentiles analytics answers


class ParamError(ValueError):
    def __init__(self, param: str, why: str):
        super().__init__(f"{param}: {why}")
        self.param = param
        self.why = why

    def to_dict(self) -> dict:
        return {"error": "bad_parameter", "parameter": self.param, "message": self.why}


def _one(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name) or []
    if len(values) > 1:
        raise ParamError(name, "give it once")
    return values[0] if values else None


def _time_ms(params, name: str) -> int | None:
    v = _one(params, name)
    if v is None:
        return None
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise ParamError(name, f"not an RFC 3339 time: {v!r}") from None
    if dt.tzinfo is None:
        raise ParamError(name, "needs a time zone offset (Z or +hh:mm)")
    return int(dt.timestamp() * 1000)


def encode_cursor(sort_values: list) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(sort_values)).decode().rstrip("=")


def decode_cursor(cursor: str) -> list:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise ParamError("cursor", "malformed; pass back the next_cursor of a previous page") from None
    if not isinstance(values, list) or not values:
        raise ParamError("cursor", "malformed; pass back the next_cursor of a previous page")
    return values


@dataclass
class Search:
    body: dict
    size: int
    facets: list[str]


def build_search(params: Mapping[str, list[str]]) -> Search:
    """``GET /v1/<tenant>/cases`` parameters -> an Elasticsearch search body."""
    allowed = {"q", "sort", "size", "cursor", "facets", "created_from", "created_to", *FILTERS}
    for name in params:
        if name not in allowed:
            raise ParamError(name, f"unknown parameter; use {', '.join(sorted(allowed))}")
    must: list[dict] = []
    filters: list[dict] = []
    q = _one(params, "q")
    if q:
        # every word must match (in the summary, or a whole key, source or tag); no
        # query syntax: simple_query_string's operators differ between servers
        must.append({"multi_match": {"query": q, "fields": ["summary", "dedup_key", "source", "tags"],
                                     "operator": "and"}})
    for f in FILTERS:
        values = params.get(f) or []
        if values:
            vals = [v for item in values for v in item.split(",") if v]
            filters.append({"terms": {_FIELD_OF.get(f, f): vals}})
    lo, hi = _time_ms(params, "created_from"), _time_ms(params, "created_to")
    if lo is not None or hi is not None:
        if lo is not None and hi is not None and lo > hi:
            raise ParamError("created_from", "is after created_to")
        rng = {}
        if lo is not None:
            rng["gte"] = lo
        if hi is not None:
            rng["lt"] = hi
        filters.append({"range": {"created_at": rng}})
    sort_param = _one(params, "sort") or "-created_at"
    desc = sort_param.startswith("-")
    field = sort_param.lstrip("-+")
    if field not in SORTS:
        raise ParamError("sort", f"unknown field {field!r}; use one of {', '.join(sorted(SORTS))} (prefix - for descending)")
    size_raw = _one(params, "size") or "20"
    if not size_raw.isdigit() or not 1 <= int(size_raw) <= MAX_SIZE:
        raise ParamError("size", f"must be an integer from 1 to {MAX_SIZE}")
    size = int(size_raw)
    facets: list[str] = []
    for item in params.get("facets") or []:
        for f in item.split(","):
            f = "tags" if f == "tag" else f
            if f and f not in FACETS:
                raise ParamError("facets", f"unknown facet {f!r}; use {', '.join(FACETS)}")
            if f and f not in facets:
                facets.append(f)
    body: dict = {
        "size": size,
        "query": {"bool": {"must": must or [{"match_all": {}}], "filter": filters}},
        "sort": [{field: {"order": "desc" if desc else "asc", "missing": "_last"}}, {"case_id": "asc"}],
        "track_total_hits": True,
        "_source": {"excludes": [STORED_STATE]},   # the case state the index keeps to fold onto: not a result
    }
    cursor = _one(params, "cursor")
    if cursor:
        values = decode_cursor(cursor)
        if len(values) != 2:
            raise ParamError("cursor", "does not belong to this sort; start again without a cursor")
        body["search_after"] = values
    if facets:
        body["aggs"] = {f: {"terms": {"field": f, "size": 50}} for f in facets}
    return Search(body, size, facets)


def shape_search(resp: dict, search: Search) -> dict:
    hits = resp["hits"]["hits"]
    out = {
        "total": resp["hits"]["total"]["value"],
        "cases": [h["_source"] for h in hits],
        "next_cursor": encode_cursor(hits[-1]["sort"]) if len(hits) == search.size and hits else None,
    }
    if search.facets:
        out["facets"] = {f: [{"value": b["key"], "count": b["doc_count"]}
                             for b in resp.get("aggregations", {}).get(f, {}).get("buckets", [])]
                         for f in search.facets}
    return out


@dataclass
class Analytics:
    metric: str
    interval: str
    group_by: str | None
    body: dict


def build_analytics(params: Mapping[str, list[str]], *, with_percentiles: bool = True) -> Analytics:
    """The analytics search. ``with_percentiles``: ask the server for the
    ``percentiles`` aggregation next to each mean (not every server has it:
    without, the caller computes them from the values, :func:`percentiles`)."""
    allowed = {"metric", "interval", "group_by", "created_from", "created_to"}
    for name in params:
        if name not in allowed:
            raise ParamError(name, f"unknown parameter; use {', '.join(sorted(allowed))}")
    metric = _one(params, "metric") or "count"
    if metric not in METRICS:
        raise ParamError("metric", f"use one of {', '.join(METRICS)}")
    interval = _one(params, "interval") or "day"
    if interval not in INTERVALS:
        raise ParamError("interval", f"use one of {', '.join(INTERVALS)}")
    group_by = _one(params, "group_by")
    if group_by is not None and group_by not in GROUP_BY:
        raise ParamError("group_by", f"use one of {', '.join(GROUP_BY)}")
    filters: list[dict] = []
    lo, hi = _time_ms(params, "created_from"), _time_ms(params, "created_to")
    if lo is not None or hi is not None:
        filters.append({"range": {"created_at": {k: v for k, v in (("gte", lo), ("lt", hi)) if v is not None}}})
    value_field = {"mtta": "time_to_acknowledge_seconds", "mttr": "time_to_resolve_seconds"}.get(metric)
    if value_field:
        filters.append({"exists": {"field": value_field}})
    inner: dict = {}
    if value_field:
        inner = {"mean": {"avg": {"field": value_field}}}
        if with_percentiles:
            inner["pct"] = {"percentiles": {"field": value_field, "percents": list(PERCENTS), "keyed": False}}
    histogram = {"date_histogram": {"field": "created_at", "fixed_interval": INTERVALS[interval],
                                    "min_doc_count": 1}, "aggs": inner}
    if group_by:
        histogram["aggs"] = {**inner, "groups": {"terms": {"field": group_by, "size": 50}, "aggs": inner}}
    body = {"size": 0, "query": {"bool": {"filter": filters}}, "aggs": {"buckets": histogram}}
    return Analytics(metric, interval, group_by, body)


def percentiles(values: list[float], points=PERCENTS) -> dict[str, float | None]:
    """Percentiles of ``values``, interpolated linearly between the closest
    ranks: p at rank ``p/100 * (n - 1)`` of the sorted values (0-based), as
    numpy's default and Elasticsearch's ``percentiles`` aggregation (exact
    below 2 000 values per bucket) compute them. Exact; for servers without
    that aggregation."""
    if not values:
        return {f"p{p}": None for p in points}
    vals = sorted(values)
    out = {}
    for p in points:
        index = p / 100 * (len(vals) - 1)
        low = min(int(index), len(vals) - 1)
        high = min(low + 1, len(vals) - 1)
        out[f"p{p}"] = vals[low] + (index - low) * (vals[high] - vals[low])
    return out


def shape_percentiles(agg: dict | None, points=PERCENTS) -> dict[str, float | None]:
    """``{"p50": …}`` from a ``percentiles`` aggregation answer (``keyed: false``)."""
    got = {float(v["key"]): v.get("value") for v in (agg or {}).get("values", [])}
    return {f"p{p}": got.get(float(p)) for p in points}
