"""Analytics percentiles (streams/api.py QueryService): the server's percentiles
aggregation when it has one, the values scanned when it answers that it has
not, and the answer remembered for the process. A fake search client, no server."""

from __future__ import annotations

import asyncio

from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import BadRequestError

from streams.api import QueryService
from streams.query import percentiles
from streams.settings import load_settings

DAY = 1930089600000  # 2031-03-01
VALUES = {"critical": [60, 120], "warning": [30]}


def _unkeyed(vals):
    return {"values": [{"key": float(k[1:]), "value": v} for k, v in percentiles(vals).items()]}


class FakeSearch:
    """Answers the analytics search like Elasticsearch; ``has_percentiles=False``
    answers the aggregation as a server without it does (HTTP 400)."""

    def __init__(self, has_percentiles: bool):
        self.has_percentiles = has_percentiles
        self.bodies: list[dict] = []

    async def search(self, index, body):
        self.bodies.append(body)
        text = repr(body)
        if "'percentiles'" in text and not self.has_percentiles:
            raise BadRequestError("parsing_exception", ApiResponseMeta(400, "1.1", HttpHeaders(), 0.0,
                                                                        NodeConfig("http", "127.0.0.1", 9200)),
                                  {"error": {"type": "parsing_exception",
                                             "reason": "Unknown aggregation type [percentiles] did you mean [terms]?"},
                                   "status": 400})
        if body.get("size", 0) > 0:  # the scan: every document, then an empty page
            if body.get("search_after"):
                return _Resp({"hits": {"hits": []}})
            hits = [{"_source": {"created_at": DAY + 60_000 * i, "time_to_acknowledge_seconds": v, "severity": sev},
                     "sort": [f"case-{sev}-{i}"]} for sev, vals in VALUES.items() for i, v in enumerate(vals)]
            return _Resp({"hits": {"hits": hits}})
        with_pct = "pct" in body["aggs"]["buckets"]["aggs"]
        every = [v for vals in VALUES.values() for v in vals]
        bucket = {"key": DAY, "doc_count": len(every), "mean": {"value": sum(every) / len(every)},
                  "groups": {"buckets": [{"key": sev, "doc_count": len(vals), "mean": {"value": sum(vals) / len(vals)},
                                          **({"pct": _unkeyed(vals)} if with_pct else {})}
                                         for sev, vals in VALUES.items()]},
                  **({"pct": _unkeyed(every)} if with_pct else {})}
        return _Resp({"aggregations": {"buckets": {"buckets": [bucket]}}})

    async def close(self):
        pass


class _Resp:
    def __init__(self, body):
        self.body = body


def run(has_percentiles: bool, requests: int = 2):
    svc = QueryService(load_settings({}))
    svc._es = FakeSearch(has_percentiles)
    params = {"metric": ["mtta"], "interval": ["day"], "group_by": ["severity"]}

    async def go():
        return [await svc.analytics("on-call", params) for _ in range(requests)]

    return svc, asyncio.run(go())


WANT = {"critical": {"p50": 90.0, "p90": 114.0, "p95": 117.0, "p99": 119.4},
        "warning": {"p50": 30, "p90": 30, "p95": 30, "p99": 30}}


def _groups(answer):
    return {g["value"]: g["percentiles_seconds"] for g in answer["buckets"][0]["groups"]}


def test_a_server_with_the_aggregation_is_asked_once_per_request_and_never_scanned():
    svc, answers = run(True)
    assert all(_groups(a) == WANT for a in answers)
    assert answers[0]["buckets"][0]["percentiles_seconds"] == {"p50": 60.0, "p90": 108.0, "p95": 114.0, "p99": 118.8}
    assert len(svc._es.bodies) == 2 and all(b["size"] == 0 for b in svc._es.bodies)
    assert svc.server_percentiles is True


def test_a_server_without_it_is_scanned_and_the_answer_remembered():
    svc, answers = run(False, requests=3)
    assert all(_groups(a) == WANT for a in answers)
    assert answers[0]["buckets"][0]["percentiles_seconds"] == {"p50": 60.0, "p90": 108.0, "p95": 114.0, "p99": 118.8}
    asked = ["percentiles" in repr(b) for b in svc._es.bodies]
    assert asked.count(True) == 1 and asked[0]  # asked once, refused, never again in this process
    assert svc.server_percentiles is False


def test_another_bad_request_is_not_taken_for_a_missing_aggregation():
    svc = QueryService(load_settings({}))

    class Refuses(FakeSearch):
        async def search(self, index, body):
            raise BadRequestError("search_phase_execution_exception",
                                  ApiResponseMeta(400, "1.1", HttpHeaders(), 0.0, NodeConfig("http", "h", 1)),
                                  {"error": {"type": "search_phase_execution_exception", "reason": "all shards failed"}})

    svc._es = Refuses(True)
    try:
        asyncio.run(svc.analytics("on-call", {"metric": ["mtta"]}))
    except BadRequestError:
        pass
    else:
        raise AssertionError("the error was swallowed")
    assert svc.server_percentiles is None
