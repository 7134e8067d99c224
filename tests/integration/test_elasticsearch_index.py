"""The Elasticsearch indexer: one document per case, external versioning."""

from __future__ import annotations

import asyncio

import pytest

from sinks.base import SinkRecord
from sinks.elasticsearch import MAPPING, ElasticsearchSink
from streams.config import get_tenant

pytestmark = pytest.mark.integration


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
        sink = ElasticsearchSink(stack.elasticsearch, index, tenant)
        await sink.open()
        try:
            recs = [SinkRecord("t", 0, i, e) for i, e in enumerate(events)]
            await sink.write_batch(recs[:2])
            await sink.write_batch(recs)          # redelivery of 1-2, plus 3
            await sink.write_batch(recs[:1])      # an old event again
            await sink.write_batch([recs[2]])     # the newest again
            return sink.skipped
        finally:
            await sink.close()

    try:
        skipped = asyncio.run(drive())
        doc = stack.es("GET", f"/{index}/_doc/{events[0]['case_id']}")
        assert skipped == 0
        assert doc["_version"] == 3 and doc["_source"]["occurrence_count"] == 3 and doc["_source"]["version"] == 3
    finally:
        stack.es_drop(index)
