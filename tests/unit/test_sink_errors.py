"""Which sink errors are transient (retried with the sink's Backoff) and which documents are refused
for good (handed back to the projection agent, which dead-letters them).

The Elasticsearch client here is a small stand-in answering ``mget``/``bulk`` with what the server
would answer (tests/integration/test_elasticsearch_index.py runs the sink on a real server)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from fastavro import parse_schema
from fastavro.validation import validate

from helpers import CM, World, trigger
from sinks.base import Backoff, Rejected, SinkRecord
from sinks.elasticsearch import ElasticsearchSink
from sinks.history import Gap
from streams.config import PROJECT_ROOT

DLQ_SCHEMA = parse_schema(orjson.loads((PROJECT_ROOT / "schemas/json/DeadLetter.avsc").read_bytes()))


class Sleeps:
    def __init__(self):
        self.calls: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.calls.append(delay)


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AdminShutdownError", "CrashShutdownError", "CannotConnectNowError",
                                  "ConnectionDoesNotExistError", "ConnectionFailureError",
                                  "TooManyConnectionsError", "SerializationError", "DeadlockDetectedError",
                                  "InterfaceError"])
def test_postgres_errors_of_a_server_going_away_are_transient(name):
    import asyncpg

    from sinks.postgres import retry_on

    exc = getattr(asyncpg, name, None) or getattr(asyncpg.exceptions, name)
    assert isinstance(exc("the server is stopping"), retry_on())


@pytest.mark.parametrize("name", ["UniqueViolationError", "UndefinedTableError", "DataError", "SyntaxOrAccessError"])
def test_postgres_errors_of_a_bad_write_are_not_retried(name):
    import asyncpg

    from sinks.postgres import retry_on

    assert not isinstance(getattr(asyncpg, name)("no"), retry_on())


def test_postgres_sink_retries_a_shutdown_mid_write():
    import asyncpg

    from sinks.postgres import PostgresSink

    sleeps = Sleeps()
    sink = PostgresSink("postgresql://unused", "db", CM, backoff=Backoff(sleep=sleeps))
    sink.pool = object()  # opened
    calls = []

    async def write(records):
        calls.append(records)
        if len(calls) == 1:
            raise asyncpg.AdminShutdownError("terminating connection due to administrator command")

    sink.write_once = write
    assert asyncio.run(sink.write_batch([SinkRecord("t", 0, 0, {})])) == []
    assert len(calls) == 2 and len(sleeps.calls) == 1


# --------------------------------------------------------------------------
# Elasticsearch
# --------------------------------------------------------------------------


def api_error(status: int):
    from elastic_transport import ApiResponseMeta, HttpHeaders
    from elasticsearch import ApiError

    return ApiError(f"status {status}", ApiResponseMeta(status, "1.1", HttpHeaders(), 0.01, None),
                    {"error": {"type": "x"}, "status": status})


class Response:
    def __init__(self, body):
        self.body = body


class Client:
    """``mget``: nothing indexed yet; ``bulk``: the next scripted answer (an exception is raised)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.bulks: list[list[dict]] = []

    async def mget(self, index, ids):
        return Response({"docs": [{"_id": i, "found": False} for i in ids]})

    async def bulk(self, operations, refresh):
        self.bulks.append(operations)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            answer = answer(operations)
        return Response(answer)

    async def close(self):
        pass


def _records(n: int = 2) -> list[SinkRecord]:
    w = World(CM)
    for i in range(n):
        w.open_case(f"key-{i}")
    return [SinkRecord("case-management.domain-events", 0, off, e) for off, e in enumerate(w.events)]


def _items(statuses: dict[int, tuple[int, dict | None]]):
    """A bulk answer: item i gets statuses[i] (default 201)."""
    def answer(ops):
        docs = ops[0::2]
        items = []
        for i, op in enumerate(docs):
            status, error = statuses.get(i, (201, None))
            res = {"_id": op["index"]["_id"], "status": status}
            if error:
                res["error"] = error
            items.append({"index": res})
        return {"errors": any(s >= 300 for s, _ in statuses.values()), "items": items}
    return answer


def _sink(client, history=None) -> tuple[ElasticsearchSink, Sleeps]:
    sleeps = Sleeps()
    sink = ElasticsearchSink("http://unused", "cases-case-management", CM, history or History([]),
                             backoff=Backoff(sleep=sleeps), create=False)
    sink.client = client
    return sink, sleeps


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_elasticsearch_overloaded_or_unavailable_is_retried(status):
    client = Client([api_error(status), _items({})])
    sink, sleeps = _sink(client)
    assert asyncio.run(sink.write_batch(_records())) == []
    assert len(client.bulks) == 2 and len(sleeps.calls) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_elasticsearch_refusing_the_request_is_not_retried(status):
    from elasticsearch import ApiError

    client = Client([api_error(status), _items({})])
    sink, sleeps = _sink(client)
    with pytest.raises(ApiError):
        asyncio.run(sink.write_batch(_records()))
    assert len(client.bulks) == 1 and sleeps.calls == []


@pytest.mark.parametrize("status", [429, 503])
def test_bulk_items_429_503_are_retried(status):
    client = Client([_items({1: (status, {"type": "es_rejected_execution_exception"})}), _items({})])
    sink, sleeps = _sink(client)
    assert asyncio.run(sink.write_batch(_records())) == []
    assert len(client.bulks) == 2 and len(sleeps.calls) == 1


def test_a_document_refused_for_good_is_handed_back_with_its_records():
    records = _records(3)
    error = {"type": "mapper_parsing_exception", "reason": "failed to parse field [created_at]"}
    client = Client([_items({0: (409, {"type": "version_conflict_engine_exception"}), 1: (400, error)})])
    sink, sleeps = _sink(client)
    rejected = asyncio.run(sink.write_batch(records))
    assert sleeps.calls == [] and len(client.bulks) == 1       # not retried: it would be refused again
    refused_case = client.bulks[0][2]["index"]["_id"]
    assert [r.record for r in rejected] == [r for r in records if r.event["case_id"] == refused_case]
    assert all(isinstance(r, Rejected) for r in rejected)
    assert "400" in rejected[0].reason and "mapper_parsing_exception" in rejected[0].reason
    assert "failed to parse field [created_at]" in rejected[0].reason


def test_a_refused_document_becomes_a_valid_dead_letter():
    from agents.projections import dead_letter_of
    from streams.domain.intake import PROJECTION_REJECTED, REASONS

    assert PROJECTION_REJECTED == "projection_rejected" and PROJECTION_REJECTED in REASONS
    rec = _records(1)[0]
    dl = dead_letter_of("elasticsearch", Rejected(rec, "bulk item 400: mapper_parsing_exception"), 1234)
    assert validate(dl, DLQ_SCHEMA, raise_errors=True)
    assert dl["reason"] == PROJECTION_REJECTED and dl["dead_lettered_at"] == 1234
    assert dl["detail"] == "elasticsearch refused the document of case " \
        f"{rec.event['case_id']} (version {rec.event['version']}): bulk item 400: mapper_parsing_exception"
    assert dl["source"] == {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
    assert orjson.loads(dl["original"]) == rec.event


def test_replaying_a_refused_document_says_to_reindex():
    from streams import dlq
    from streams.config import load_topics

    family = load_topics("case-management")
    rec = _records(1)[0]
    from agents.projections import dead_letter_of

    dl = dead_letter_of("elasticsearch", Rejected(rec, "x"), 1)
    dl["source"]["topic"] = family.name("domain-events")
    p = dlq.plan(dl, CM, family)
    assert not p.publish and "reindex" in p.skip


class History:
    """The domain-event log as the sink reads it back: scripted answers (an exception is raised; none
    left: the test did not expect the log to be read)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.asked: list[list[Gap]] = []

    async def missing(self, gaps):
        self.asked.append(gaps)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _one_case(versions: int) -> list[dict]:
    w = World(CM)
    w.open_case("k")
    for _ in range(versions - 1):
        w.send(trigger("k"))
    return w.events


def test_a_gap_is_filled_from_the_log_even_when_kafka_is_away_a_moment():
    from aiokafka.errors import KafkaConnectionError

    events = _one_case(3)
    client = Client([_items({})])
    history = History([KafkaConnectionError("broker away"), {events[0]["case_id"]: [events[0]]}])
    sink, sleeps = _sink(client, history)
    # nothing indexed (the client's mget), and the batch holds versions 2 and 3 of the case
    assert asyncio.run(sink.write_batch([SinkRecord("t", 4, 10 + i, e) for i, e in enumerate(events[1:])])) == []
    assert history.asked[-1] == [Gap(events[0]["case_id"], 0, "t", 4, 11)]
    assert len(sleeps.calls) == 1 and len(client.bulks) == 1     # retried, then written once
    (op, doc), = zip(client.bulks[0][0::2], client.bulks[0][1::2])
    assert op["index"]["version"] == 3 and doc["occurrence_count"] == 3


def test_a_gap_the_log_cannot_fill_leaves_the_document_and_says_so():
    events = _one_case(3)
    client = Client([])
    sink, sleeps = _sink(client, History([{}]))
    assert asyncio.run(sink.write_batch([SinkRecord("t", 0, 5, events[2])])) == []
    assert client.bulks == [] and sink.skipped == 1 and sleeps.calls == []


class StoringClient(Client):
    """``bulk`` stores the documents (external versioning), ``mget`` answers them."""

    def __init__(self):
        super().__init__([])
        self.docs: dict[str, dict] = {}

    async def mget(self, index, ids):
        return Response({"docs": [{"_id": i, "found": True, "_source": orjson.loads(orjson.dumps(self.docs[i]))}
                                  if i in self.docs else {"_id": i, "found": False} for i in ids]})

    async def bulk(self, operations, refresh):
        self.bulks.append(operations)
        for op, doc in zip(operations[0::2], operations[1::2]):
            if doc["version"] > self.docs.get(op["index"]["_id"], {}).get("version", 0):
                self.docs[op["index"]["_id"]] = doc
        return Response({"errors": False, "items": []})


def test_a_batch_folds_onto_the_state_its_document_stores(monkeypatch):
    import sinks.elasticsearch as es
    from helpers import OC, oncall_scenario
    from streams.domain.cases import replay

    w = World(OC)
    events = oncall_scenario(w)
    page = [e for e in events if e["case_id"] == events[0]["case_id"]]
    client = StoringClient()
    sink, _ = _sink(client)
    sink.tenant = OC
    records = [SinkRecord("t", 0, i, e) for i, e in enumerate(page)]
    assert asyncio.run(sink.write_batch(records[:3])) == []

    def not_from_fields(doc):
        raise AssertionError("folded from the document's fields, not from its stored state")

    monkeypatch.setattr(es, "state_from_document", not_from_fields)
    assert asyncio.run(sink.write_batch(records[2:])) == []   # a redelivered event, then the rest
    assert client.docs[page[0]["case_id"]] == es.document(replay(OC, page)) and sink.skipped == 0
