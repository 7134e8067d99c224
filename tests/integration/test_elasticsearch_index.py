"""The Elasticsearch indexer: one document per case, external versioning."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from schemas import decode, encode
from sinks.base import SinkRecord
from sinks import build_sinks
from sinks.elasticsearch import MAPPING, STORED_STATE, ElasticsearchSink, document, index_name
from streams.config import get_tenant
from streams.domain.cases import replay
from streams.settings import load_settings
from tests.reliability.checker import clean

pytestmark = [pytest.mark.integration, pytest.mark.smoke]


class NoGaps:
    """The log of batches without a version gap: never read back."""

    async def missing(self, gaps):
        raise AssertionError(f"version gaps in batches that have none: {gaps}")



def test_cases_become_documents(stack, run_id):
    key = f"{run_id}/es"
    actor = {"id": "u-9", "name": "Private Name", "email": "private@example.com"}
    stack.send("on-call", [
        {"event_id": f"{run_id}-1", "action": "trigger", "dedup_key": key, "summary": "Disk full on db-7",
         "severity": "critical", "tags": ["db", "disk"], "custom_details": {"secret": "not indexed"},
         "timestamp": "2026-11-24T10:00:00Z"},
        {"event_id": f"{run_id}-2", "command": "assign", "dedup_key": key, "actor": actor, "assignee": actor,
         "timestamp": "2026-11-24T10:01:00Z"},
        {"event_id": f"{run_id}-3", "action": "acknowledge", "dedup_key": key, "timestamp": "2026-11-24T10:02:00Z"},
        {"event_id": f"{run_id}-4", "action": "resolve", "dedup_key": key, "timestamp": "2026-11-24T10:30:00Z"},
    ])
    case_id = stack.read("on-call", "domain-events", lambda r: r.get("dedup_key") == key, count=1)[0]["case_id"]
    doc = stack.poll(lambda: stack.es("GET", f"/{stack.index('on-call')}/_doc/{case_id}"),
                     lambda d: d.get("found") and d["_source"]["version"] == 4, what="the document at version 4")
    src = doc["_source"]
    assert doc["_version"] == 4
    assert (src["status"], src["severity"], src["tags"], src["assignee_id"]) == ("RESOLVED", "critical",
                                                                                ["db", "disk"], "u-9")
    assert src["time_to_acknowledge_seconds"] == 120 and src["time_to_resolve_seconds"] == 1800
    flat = str(src)
    assert "Private Name" not in flat and "private@example.com" not in flat and "not indexed" not in flat
    mapping = stack.es("GET", f"/{stack.index('on-call')}/_mapping")
    (concrete, body), = mapping.items()  # the alias points at one concrete index
    assert concrete.startswith(stack.index("on-call") + "-")
    assert body["mappings"]["properties"]["summary"] == MAPPING["properties"]["summary"]
    # the other tenant's index never sees it
    other = stack.es("GET", f"/{stack.index('case-management')}/_doc/{case_id}")
    assert not other.get("found")


def test_duplicates_and_older_versions_never_overwrite(stack, run_id):
    tenant = get_tenant("case-management")
    key = f"{run_id}/es-direct"
    stack.send("case-management", [
        {"event_id": f"{run_id}-{i}", "action": "trigger", "dedup_key": key, "summary": f"s{i}"} for i in range(3)])
    events = sorted(stack.read("case-management", "domain-events", lambda r: r.get("dedup_key") == key, count=3),
                    key=lambda e: e["version"])
    events = [{k: v for k, v in e.items() if not k.startswith("_")} for e in events]
    index = f"{stack.index_prefix}direct-{run_id}"

    async def drive():
        sink = ElasticsearchSink(stack.elasticsearch, index, tenant, NoGaps())
        await sink.open()
        try:
            recs = [SinkRecord("t", 0, i, e) for i, e in enumerate(events)]
            await sink.write_batch([recs[0], recs[0], recs[1]])   # an event twice in one batch
            first = (await sink.client.get(index=index, id=events[0]["case_id"])).body["_source"]["version"]
            await sink.write_batch(recs)          # redelivery of 1-2, plus 3
            await sink.write_batch(recs[:1])      # an old event again
            await sink.write_batch([recs[2]])     # the newest again
            return sink.skipped, first
        finally:
            await sink.close()

    try:
        skipped, first = asyncio.run(drive())
        doc = stack.es("GET", f"/{index}/_doc/{events[0]['case_id']}")
        assert skipped == 0 and first == 2   # the repeat did not stop the fold at version 1
        assert doc["_version"] == 3 and doc["_source"]["occurrence_count"] == 3 and doc["_source"]["version"] == 3
    finally:
        stack.es_drop(index)


# --------------------------------------------------------------------------
# a version gap is repaired from the domain-event log
# --------------------------------------------------------------------------

CASE = ("trigger", "trigger", "acknowledge", "trigger", "resolve")   # versions 1-5 of one case


def _case_in_the_log(stack, tenant: str, key: str, run_id: str) -> list[SinkRecord]:
    """A case of five versions made by the session's worker, its events read from T.domain-events with
    their coordinates, in version order: what the live indexer is fed."""
    stack.send(tenant, [{"event_id": f"{run_id}-{key}-{i}", "action": a, "dedup_key": key, "summary": "gap"}
                        for i, a in enumerate(CASE)])
    found = stack.read(tenant, "domain-events", lambda r: r.get("dedup_key") == key,
                       until=lambda f: len({e["version"] for e in f}) == len(CASE))
    by_version = {e["version"]: e for e in found}
    return [SinkRecord(stack.topic(tenant, "domain-events"), e["_partition"], e["_offset"], clean(e))
            for _, e in sorted(by_version.items())]


def _live_indexer(stack, tenant: str, prefix: str):
    """The Elasticsearch sink a worker builds (``build_sinks``), over the index ``<prefix>cases-<tenant>``."""
    settings = load_settings(dict(stack.env, CASESTREAM_PROJECTIONS="elasticsearch", CASESTREAM_INDEX_PREFIX=prefix))
    sink, = build_sinks(settings, get_tenant(tenant))
    return sink


def _repairs(tenant: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("casestream_projection_repairs_total",
                                     {"tenant": tenant, "sink": "elasticsearch"}) or 0.0


GAPS = {  # batch by batch, the versions of the case that reach the indexer
    "out of order": [[1], [3, 4], [2], [5]],
    "a gap inside a batch": [[1, 3, 5]],
    "no document yet": [[4, 5]],
}


def test_a_version_gap_is_repaired_from_the_log(stack, run_id):
    """Whatever order a case's events reach the indexer in, its document ends (and, from the first
    batch past the gap, stays) equal to the fold of every event of the case: the events the batch lacks
    are read back from the log, not left for a replay."""
    tenant = "on-call"
    cases = {name: _case_in_the_log(stack, tenant, f"{run_id}/gap{i}", run_id) for i, name in enumerate(GAPS)}
    prefix = f"{stack.index_prefix}gap-{run_id}-"
    sink = _live_indexer(stack, tenant, prefix)
    repairs = _repairs(tenant)

    async def drive():
        seen = {}
        await sink.open()
        try:
            for name, batches in GAPS.items():
                records, seen[name] = cases[name], []
                for batch in batches:
                    assert await sink.write_batch([records[v - 1] for v in batch]) == []
                    doc = await sink.client.get(index=sink.index, id=records[0].event["case_id"])
                    seen[name].append(doc.body["_source"]["version"])
            return seen
        finally:
            await sink.close()

    try:
        seen = asyncio.run(drive())
        for name, batches in GAPS.items():
            events = [r.event for r in cases[name]]
            doc = stack.es("GET", f"/{index_name(get_tenant(tenant), prefix)}/_doc/{events[0]['case_id']}")
            assert doc["_source"] == document(replay(get_tenant(tenant), events)), name
            # each batch leaves the document at the newest version seen so far
            assert seen[name] == [max(v for b in batches[:i + 1] for v in b) for i in range(len(batches))], name
        assert _repairs(tenant) - repairs == len(GAPS)
    finally:
        stack.es_drop(index_name(get_tenant(tenant), prefix))


def test_a_document_refused_once_then_accepted_is_repaired(stack, run_id):
    """The index refuses a case's document for good (a write block: 403), so those events are handed
    back to be dead-lettered; once the index accepts documents again, the case's next event brings the
    document up to the fold of all its events, the refused ones included."""
    tenant = "on-call"
    records = _case_in_the_log(stack, tenant, f"{run_id}/refused", run_id)
    prefix = f"{stack.index_prefix}refused-{run_id}-"
    sink = _live_indexer(stack, tenant, prefix)

    async def drive():
        await sink.open()
        try:
            assert await sink.write_batch(records[:1]) == []
            await sink.client.indices.put_settings(index=sink.index, settings={"index.blocks.write": True})
            refused = await sink.write_batch(records[1:3])
            await sink.client.indices.put_settings(index=sink.index, settings={"index.blocks.write": False})
            for r in records[3:]:
                assert await sink.write_batch([r]) == []
            return refused
        finally:
            await sink.close()

    try:
        refused = asyncio.run(drive())
        assert [r.record for r in refused] == records[1:3] and "403" in refused[0].reason, refused
        events = [r.event for r in records]
        doc = stack.es("GET", f"/{index_name(get_tenant(tenant), prefix)}/_doc/{events[0]['case_id']}")
        assert doc["_source"] == document(replay(get_tenant(tenant), events))
    finally:
        stack.es_drop(index_name(get_tenant(tenant), prefix))


# --------------------------------------------------------------------------
# on-call properties (the scenario of tests/unit/helpers.py, through the codec)
# --------------------------------------------------------------------------

_UNIT = str(Path(__file__).resolve().parents[1] / "unit")
if _UNIT not in sys.path:
    sys.path.insert(0, _UNIT)

from helpers import ALICE, BOB, World, emit, oncall_scenario  # noqa: E402

ONCALL_FIELDS = ("escalation_policy_id", "escalation_policy_step_id", "escalation_policy_retry_count",
                 "escalation_active", "is_shadow", "targets", "responder_users", "responders_added_at",
                 "time_to_first_acknowledge", "sla_breaches")
# before the on-call fields, and before documents stored their case state
OLD_MAPPING = dict(MAPPING, properties={k: v for k, v in MAPPING["properties"].items()
                                        if k not in ONCALL_FIELDS and k != STORED_STATE})


def _wire(events: list[dict]) -> list[dict]:
    """The events as a sink receives them: encoded and decoded."""
    return [decode(encode(e)) for e in events]


def _drive(url: str, index: str, tenant, batches: list[list[dict]], create: bool = True) -> int:
    async def run():
        sink = ElasticsearchSink(url, index, tenant, NoGaps(), create=create)
        await sink.open()
        try:
            for n, batch in enumerate(batches):
                await sink.write_batch([SinkRecord("t", 0, n * 1000 + i, e) for i, e in enumerate(batch)])
            await sink.flush()
            return sink.skipped
        finally:
            await sink.close()

    return asyncio.run(run())


def test_oncall_properties_are_indexed_by_id_only(stack, run_id):
    tenant = get_tenant("on-call")
    w = World(tenant, prefix=f"{run_id}-")
    events = _wire(oncall_scenario(w, key=f"{run_id}/oncall"))
    page_id, low_id = events[0]["case_id"], events[-1]["case_id"]
    page = [e for e in events if e["case_id"] == page_id]
    index = f"{stack.index_prefix}oncall-{run_id}"
    try:
        # the second batch folds onto the state the indexed document stores (STORED_STATE), not onto memory
        skipped = _drive(stack.elasticsearch, index, tenant,
                         [page[:4], page[4:] + [e for e in events if e["case_id"] == low_id]])
        assert skipped == 0
        src = stack.es("GET", f"/{index}/_doc/{page_id}")["_source"]
        assert src == document(replay(tenant, page))  # as if folded in one go
        assert src["version"] == len(page) == src[STORED_STATE]["version"]
        assert src["responder_users"] == ["u-alice", "u-carol", "u-bob"]
        assert src["targets"] == ["user:u-alice", "schedule:sch-primary", "team:team-db"]
        assert (src["escalation_policy_id"], src["escalation_policy_step_id"], src["escalation_active"],
                src["is_shadow"], src["sla_breaches"]) == ("ep-db", "ep-db-s1", False, False, ["resolution"])
        assert src["time_to_first_acknowledge"] == src["acknowledged_at"] - src["created_at"] > 0
        flat = str(src)
        for secret in (ALICE["name"], ALICE["email"], BOB["name"], BOB["email"]):
            assert secret not in flat
        assert "responders" not in src
        low = stack.es("GET", f"/{index}/_doc/{low_id}")["_source"]
        assert (low["is_shadow"], low["escalation_active"], low["urgency"], low["targets"]) == (
            True, True, "low", ["user:u-bob"])
        # the new fields are searchable with their mapped types
        hits = stack.es("POST", f"/{index}/_search", {"query": {"bool": {"filter": [
            {"term": {"responder_users": "u-carol"}}, {"term": {"targets": "team:team-db"}},
            {"term": {"escalation_active": False}}, {"range": {"time_to_first_acknowledge": {"gt": 0}}},
            {"range": {"responders_added_at": {"gte": page[0]["occurred_at"]}}}]}}})
        assert [h["_id"] for h in hits["hits"]["hits"]] == [page_id]
        assert stack.es("POST", f"/{index}/_search", {"query": {"term": {"responder_users": "Alice Doe"}}}
                        )["hits"]["total"]["value"] == 0
    finally:
        stack.es_drop(index)


def test_index_with_the_old_mapping_gets_the_new_fields_on_open(stack, run_id):
    """An index created before the on-call fields (strict mapping) accepts them after open (put_mapping)."""
    tenant = get_tenant("on-call")
    w = World(tenant, prefix=f"{run_id}-")
    events = _wire(oncall_scenario(w, key=f"{run_id}/old"))
    page_id = events[0]["case_id"]
    page = [e for e in events if e["case_id"] == page_id]
    alias = f"{stack.index_prefix}old-{run_id}"
    concrete = f"{alias}-20250101000000000000"
    try:
        assert stack.es("PUT", f"/{concrete}", {"mappings": OLD_MAPPING}).get("acknowledged")
        assert stack.es("POST", "/_aliases", {"actions": [{"add": {"index": concrete, "alias": alias}}]}
                        ).get("acknowledged")
        # a case indexed by the old code: version 1, no on-call fields, no stored state (read from its fields)
        old_doc = {k: v for k, v in document(replay(tenant, page[:1])).items()
                   if k not in ONCALL_FIELDS and k != STORED_STATE}
        put = stack.es("PUT", f"/{alias}/_doc/{page_id}?version=1&version_type=external", old_doc)
        assert put.get("result") == "created", put
        # the old mapping is strict: today's documents are rejected ...
        rejected = stack.es("PUT", f"/{alias}/_doc/other?version=1&version_type=external",
                            document(replay(tenant, page[:1])))
        assert rejected["_status"] == 400 and "strict_dynamic_mapping" in str(rejected), rejected
        # ... until the sink opens the index: the later events fold onto the old document
        assert _drive(stack.elasticsearch, alias, tenant, [page[1:]]) == 0
        mapping = stack.es("GET", f"/{alias}/_mapping")[concrete]["mappings"]
        assert mapping["dynamic"] == "strict"
        assert {f: mapping["properties"][f] for f in ONCALL_FIELDS} == {f: MAPPING["properties"][f]
                                                                       for f in ONCALL_FIELDS}
        assert mapping["properties"][STORED_STATE]["enabled"] is False   # added too: kept, never searchable
        src = stack.es("GET", f"/{alias}/_doc/{page_id}")["_source"]
        assert src == document(replay(tenant, page))
        assert src["responder_users"] == ["u-alice", "u-carol", "u-bob"] and "Alice Doe" not in str(src)
        # opening again is harmless (the same mapping is put again)
        assert _drive(stack.elasticsearch, alias, tenant, [page]) == 0
        assert stack.es("GET", f"/{alias}/_doc/{page_id}")["_version"] == len(page)
    finally:
        stack.es_drop(alias)
