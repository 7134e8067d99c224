"""Query building (streams/query.py): parameters -> Elasticsearch bodies, and their errors."""

from __future__ import annotations

import pytest

from streams.query import (
    ParamError, build_analytics, build_search, decode_cursor, encode_cursor, percentiles, shape_percentiles,
    shape_search,
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
    assert s.body["_source"] == {"excludes": ["state"]}  # the stored case state is not a search result


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


def test_analytics_asks_the_server_for_percentiles_unless_told_not_to():
    a = build_analytics(p(metric="mttr", group_by="severity"))
    h = a.body["aggs"]["buckets"]
    want = {"percentiles": {"field": "time_to_resolve_seconds", "percents": [50, 90, 95, 99], "keyed": False}}
    assert h["aggs"]["pct"] == want and h["aggs"]["groups"]["aggs"]["pct"] == want
    assert "pct" not in build_analytics(p(metric="mttr"), with_percentiles=False).body["aggs"]["buckets"]["aggs"]
    assert build_analytics(p(metric="count")).body["aggs"]["buckets"]["aggs"] == {}


def test_percentiles_interpolate_between_the_closest_ranks():
    assert percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0}
    assert percentiles([3, 1, 2])["p50"] == 2
    # what Elasticsearch 8.19's percentiles aggregation answered for these values (exact below 2 000 values)
    assert percentiles([120, 60]) == {"p50": 90.0, "p90": 114.0, "p95": 117.0, "p99": 119.4}
    assert percentiles(list(range(1, 101))) == {"p50": 50.5, "p90": 90.10000000000001, "p95": 95.05, "p99": 99.01}
    assert percentiles([1] * 9 + [1000]) == {"p50": 1.0, "p90": 100.89999999999965, "p95": 550.4499999999989,
                                             "p99": 910.0900000000001}
    assert percentiles([30, 60, 120]) == {"p50": 60.0, "p90": 108.0, "p95": 114.0, "p99": 118.8}


def test_shape_percentiles_reads_the_unkeyed_answer():
    agg = {"values": [{"key": 50.0, "value": 90.0}, {"key": 90.0, "value": 114.0}, {"key": 95.0, "value": 117.0},
                      {"key": 99.0, "value": 119.4}]}
    assert shape_percentiles(agg) == {"p50": 90.0, "p90": 114.0, "p95": 117.0, "p99": 119.4}
    assert shape_percentiles(None) == {"p50": None, "p90": None, "p95": None, "p99": None}
