"""Query building (streams/query.py): parameters -> Elasticsearch bodies, and their errors."""

from __future__ import annotations

import pytest

from streams.query import (
    ParamError, build_analytics, build_search, decode_cursor, encode_cursor, percentiles, shape_search,
)


def p(**kw):
    return {k: v if isinstance(v, list) else [v] for k, v in kw.items()}


def test_filters_text_range_sort_and_facets():
    s = build_search(p(q="disk full", status="OPEN,CLOSED", tag=["a", "b"], created_from="2026-11-24T00:00:00Z",
                       created_to="2026-11-25T00:00:00Z", sort="occurrence_count", size="5", facets="status,tag"))
    q = s.body["query"]["bool"]
    assert q["must"][0]["multi_match"]["query"] == "disk full"
    assert {"terms": {"status": ["OPEN", "CLOSED"]}} in q["filter"]
    assert {"terms": {"tags": ["a", "b"]}} in q["filter"]
    assert {"range": {"created_at": {"gte": 1795478400000, "lt": 1795564800000}}} in q["filter"]
    assert s.body["sort"][0] == {"occurrence_count": {"order": "asc", "missing": "_last"}}
    assert s.body["sort"][1] == {"case_id": "asc"}  # a tie-breaker makes search_after pagination total
    assert s.size == 5 and s.facets == ["status", "tags"] and set(s.body["aggs"]) == {"status", "tags"}


def test_defaults():
    s = build_search({})
    assert s.body["query"]["bool"]["must"] == [{"match_all": {}}]
    assert s.body["sort"][0] == {"created_at": {"order": "desc", "missing": "_last"}} and s.size == 20


@pytest.mark.parametrize("params, param", [
    (p(sort="colour"), "sort"), (p(size="0"), "size"), (p(size="201"), "size"), (p(size="x"), "size"),
    (p(facets="colour"), "facets"), (p(created_from="yesterday"), "created_from"),
    (p(created_from="2026-11-24T00:00:00"), "created_from"), (p(cursor="!!"), "cursor"),
    (p(cursor=encode_cursor([1])), "cursor"), (p(colour="red"), "colour"), (p(q=["a", "b"]), "q"),
    (p(created_from="2026-11-25T00:00:00Z", created_to="2026-11-24T00:00:00Z"), "created_from"),
])
def test_bad_parameters_name_themselves(params, param):
    with pytest.raises(ParamError) as err:
        build_search(params)
    assert err.value.param == param and err.value.to_dict()["parameter"] == param


def test_cursor_round_trip_and_next_page():
    c = encode_cursor([1795478400000, "PG-x-1"])
    assert decode_cursor(c) == [1795478400000, "PG-x-1"]
    s = build_search(p(cursor=c, size="2"))
    assert s.body["search_after"] == [1795478400000, "PG-x-1"]
    resp = {"hits": {"total": {"value": 3}, "hits": [{"_source": {"case_id": "a"}, "sort": [1, "a"]},
                                                       {"_source": {"case_id": "b"}, "sort": [2, "b"]}]}}
    out = shape_search(resp, s)
    assert out["total"] == 3 and decode_cursor(out["next_cursor"]) == [2, "b"]
    resp["hits"]["hits"].pop()
    assert shape_search(resp, s)["next_cursor"] is None  # a short page is the last


def test_analytics_bodies_and_errors():
    a = build_analytics(p(metric="mtta", interval="hour", group_by="severity"))
    h = a.body["aggs"]["buckets"]
    assert h["date_histogram"]["fixed_interval"] == "1h"
    assert h["aggs"]["groups"]["terms"]["field"] == "severity"
    assert h["aggs"]["groups"]["aggs"]["mean"] == {"avg": {"field": "time_to_acknowledge_seconds"}}
    assert {"exists": {"field": "time_to_acknowledge_seconds"}} in a.body["query"]["bool"]["filter"]
    assert build_analytics({}).metric == "count"
    for bad, param in ((p(metric="p99"), "metric"), (p(interval="week"), "interval"), (p(group_by="x"), "group_by")):
        with pytest.raises(ParamError) as err:
            build_analytics(bad)
        assert err.value.param == param


def test_percentiles_nearest_rank():
    assert percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None}
    vals = list(range(1, 101))
    assert percentiles(vals) == {"p50": 50, "p90": 90, "p95": 95, "p99": 99}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0}
    assert percentiles([3, 1, 2])["p50"] == 2
