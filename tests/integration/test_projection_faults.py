"""Projections under faults: a worker killed mid-batch; intake and projections as separate workers."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


def _expected(stack, tenant, run_id, count):
    events = stack.read(tenant, "domain-events", lambda r: r.get("dedup_key", "").startswith(f"{run_id}/"),
                        until=lambda f: len({(e["case_id"], e["version"]) for e in f}) >= count)
    latest: dict[str, int] = {}
    for e in events:
        latest[e["case_id"]] = max(latest.get(e["case_id"], 0), e["version"])
    return {(e["case_id"], e["version"]) for e in events}, latest


def _projected(stack, tenant, latest):
    ids = sorted(latest)
    rows = stack.pg(tenant, "SELECT case_id, version FROM cases WHERE case_id = ANY($1::text[])", ids)
    return {r["case_id"]: r["version"] for r in rows}


def _indexed(stack, tenant, latest):
    docs = stack.es("POST", f"/{stack.index(tenant)}/_mget", {"ids": sorted(latest)}).get("docs", [])
    return {d["_id"]: d["_version"] for d in docs if d.get("found")}


def test_worker_killed_mid_batch_projections_lose_and_double_nothing(fresh_stack, run_id):
    stack, tenant = fresh_stack, "on-call"
    keys = [f"{run_id}/k{i}" for i in range(150)]
    msgs = [{"event_id": f"{run_id}-{j}-{k}", "action": "trigger", "dedup_key": k, "summary": "x"}
            for j in range(3) for k in keys] + [{"event_id": f"{run_id}-a-{k}", "action": "acknowledge",
                                                  "dedup_key": k} for k in keys]
    worker = stack.worker(tenant, instance_id=f"proj-{run_id}")
    stack.send(tenant, msgs)
    # kill once the PostgreSQL projection has started, long before it is done
    stack.poll(lambda: stack.pg(tenant, "SELECT count(*) AS n FROM timeline")[0]["n"], lambda n: n >= 20,
               what="the projection to start")
    worker.kill()
    restarted = stack.worker(tenant, instance_id=worker.instance_id, data_dir=worker.data_dir)
    pairs, latest = _expected(stack, tenant, run_id, len(msgs))
    assert len(pairs) == len(msgs) and len(latest) == len(keys)
    stack.poll(lambda: _projected(stack, tenant, latest), lambda got: got == latest, what="every case row")
    stack.poll(lambda: _indexed(stack, tenant, latest), lambda got: got == latest, what="every document")
    rows = stack.pg(tenant, "SELECT case_id, version FROM timeline WHERE case_id = ANY($1::text[])", sorted(latest))
    assert len(rows) == len(pairs) and {(r["case_id"], r["version"]) for r in rows} == pairs  # none lost, none doubled
    counts = stack.pg(tenant, "SELECT occurrence_count, status FROM cases WHERE case_id = ANY($1::text[])",
                      sorted(latest))
    assert {(c["occurrence_count"], c["status"]) for c in counts} == {(3, "ACKNOWLEDGED")}
    assert restarted.alive(), restarted.log()


@pytest.mark.skipif(os.environ.get("CASESTREAM_TEST_EXTERNAL") == "1",
                    reason="stops the local Elasticsearch; not done to external servers")
def test_intake_and_projections_as_separate_workers(fresh_stack, run_id):
    stack, tenant = fresh_stack, "on-call"
    intake = stack.worker(tenant, role="intake")
    projector = stack.worker(tenant, role="projections")
    keys = [f"{run_id}/s{i}" for i in range(30)]
    stack.send(tenant, [{"event_id": f"{run_id}-{k}", "action": "trigger", "dedup_key": k, "summary": "x"}
                        for k in keys])
    _, latest = _expected(stack, tenant, run_id, len(keys))
    stack.poll(lambda: _projected(stack, tenant, latest), lambda got: got == latest, what="PostgreSQL")
    stack.poll(lambda: _indexed(stack, tenant, latest), lambda got: got == latest, what="Elasticsearch")
    # the projections worker owns no tables: no changelog topics of its own
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def topics():
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
        await admin.start()
        try:
            return await admin.list_topics()
        finally:
            await admin.close()

    names = asyncio.run(topics())
    assert "casestream-on-call-keys-changelog" in names
    assert not [t for t in names if t.startswith("casestream-on-call-projections-") and t.endswith("-changelog")]
    assert intake.alive() and projector.alive()
