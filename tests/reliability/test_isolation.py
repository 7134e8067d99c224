"""What stays apart (issue 11 §4, scenarios 11 and 12).

11. Tenant isolation: both tenants fed with markers of their own (and one dedup key they share); then no
    byte of tenant A is in any topic of B's family, any table of B's database, any document of B's index,
    or any answer of the API under B -- and each tenant's own marker is found in its own (the scans can
    see what they look for).
12. Responder names and e-mails: an on-call configuration with people of unique names, pages that reach
    all of them, acknowledgements, assignments and notes by and about them; then no document of any
    Elasticsearch index holds a name or an address (raw ``_source`` text), while PostgreSQL does.

Each test counts its own figures from what it reads back and ends with a ``reliability:`` report line.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from streams.config import MAX_RECORD_BYTES, get_tenant, load_topics
from tests.integration.test_api import api, get  # noqa: F401  (api: a fixture, `casestream api` running)
from tests.reliability.checker import Model
from tests.reliability.harness import Projections
from tests.reliability.report import PeakRss, Report, record, scale

pytestmark = pytest.mark.integration

TENANTS = ("on-call", "case-management")


# -- what a tenant holds, everywhere -------------------------------------------------------------------------

def tenant_topics(stack, tenant: str) -> list[str]:
    """Every topic of the tenant on the broker: its family (topics.yaml and the tables' changelogs) and
    any other named after it (relay topics, Faust's own)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    on_broker = asyncio.run(run())
    family = {t.name for t in load_topics(tenant).all_topics()}
    assert family <= on_broker, family - on_broker
    app_id = load_topics(tenant).app_id
    return sorted(family | {t for t in on_broker if t.startswith((f"{tenant}.", f"{app_id}-"))})


def topic_hits(stack, topic: str, markers: list[bytes]) -> dict[bytes, int]:
    """marker -> records of ``topic`` (all of it, from the beginning to its end now) whose key, value or
    headers hold it: raw bytes, whatever the encoding (Avro strings are UTF-8 too)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka import stop_consumer

    async def run():
        # from the beginning: the first position of an assigned partition (a seek would race the reset)
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka, enable_auto_commit=False, group_id=None,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=MAX_RECORD_BYTES)
        await consumer.start()
        hits = dict.fromkeys(markers, 0)
        try:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(tps)
            end = await consumer.end_offsets(tps)
            deadline = time.monotonic() + 60
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                assert time.monotonic() < deadline, f"reading {topic} to its end"
                for recs in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                    for r in recs:
                        blob = b"\0".join([r.key or b"", r.value or b""] + [v or b"" for _, v in r.headers or ()])
                        for m in markers:
                            hits[m] += m in blob
        finally:
            await stop_consumer(consumer)
        return hits

    return asyncio.run(run())


def table_hits(stack, tenant: str, markers: list[str]) -> dict[str, dict[str, int]]:
    """table -> marker -> rows of the tenant's database whose text holds it (every table)."""
    tables = [r["t"] for r in stack.pg(tenant, "SELECT table_name AS t FROM information_schema.tables "
                                               "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")]
    out = {}
    for t in tables:
        out[t] = {m: stack.pg(tenant, f'SELECT count(*) AS n FROM "{t}" x WHERE x::text LIKE $1',
                              f"%{m}%")[0]["n"] for m in markers}
    return out


def index_docs(stack, target: str) -> list[dict]:
    """Every document of the indices ``target`` names (raw hits; fails if there are more than one page)."""
    stack.es("POST", f"/{target}/_refresh?expand_wildcards=all")
    r = stack.es("POST", f"/{target}/_search?expand_wildcards=all",
                 {"query": {"match_all": {}}, "size": 10000, "track_total_hits": True})
    hits = r["hits"]["hits"]
    assert r["hits"]["total"]["value"] == len(hits), (r["hits"]["total"], len(hits))
    return hits


def projected(stack, tenant: str, events: dict[tuple[str, int], str]) -> dict[str, int]:
    """case id -> its latest version among ``events`` ((case, version) -> event id), once both projections
    (PostgreSQL and the index) are at exactly those versions."""
    latest: dict[str, int] = {}
    for cid, ver in events:
        latest[cid] = max(latest.get(cid, 0), ver)
    live = Projections(stack, tenant, stack.db_prefix, stack.index(tenant))
    stack.poll(live.versions(sorted(latest)), lambda got: got == (latest, latest),
               what=f"{tenant}: both projections up to date")
    return latest


# -- 11. tenant isolation -------------------------------------------------------------------------------------

def _feed(run_id: str, marker: str, n: int, day: datetime) -> tuple[list, list[str]]:
    """One tenant's inputs, every field it may hold carrying ``marker``; and the keys of its cases."""
    person = {"id": f"u-{marker}", "name": f"Name {marker}", "email": f"{marker}@example.com"}
    keys = [f"{marker}/k{i}" for i in range(n)] + [f"{run_id}/shared"]   # the last one both tenants use
    at = (day + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    msgs: list = [{"event_id": f"{marker}-t{i}", "action": "trigger", "dedup_key": k, "timestamp": at,
                   "summary": f"disk full {marker}", "source": f"host-{marker}", "tags": [f"tag:{marker}"],
                   "custom_details": {"marker": marker}} for i, k in enumerate(keys)]
    msgs += [{"event_id": f"{marker}-a{i}", "action": "acknowledge", "dedup_key": k} for i, k in enumerate(keys[::2])]
    msgs += [{"event_id": f"{marker}-r{i}", "action": "resolve", "dedup_key": k} for i, k in enumerate(keys[1::4])]
    msgs += [{"event_id": f"{marker}-c", "command": "comment", "dedup_key": keys[0], "actor": person,
              "text": f"looked at it {marker}"},
             {"event_id": f"{marker}-s", "command": "assign", "dedup_key": keys[0], "actor": person,
              "assignee": person},
             {"event_id": f"{marker}-x", "action": "resolve", "dedup_key": f"{marker}/never-opened"},
             b'{"not json ' + marker.encode()]
    return msgs, keys


def test_tenants_share_nothing(stack, api, engine_set, run_id):  # noqa: F811
    """Each tenant gets triggers, acknowledgements, resolves, commands and bad input, every field carrying a
    marker of its own, plus a dedup key both use. Once each tenant's log, dead letters and projections hold
    its inputs: the other tenant's marker is in none of its topics, tables, index documents or API answers
    (search, facets, a case and its timeline by the other's case ids, analytics of the day used)."""
    started, rss, n = time.monotonic(), PeakRss(), scale(12)
    day = datetime(2036, 1, 1, tzinfo=timezone.utc) + timedelta(days=int(run_id[:6], 16) % 3000)
    markers = {t: f"iso{run_id}{t.replace('-', '')}" for t in TENANTS}
    fed, cases, lost, doubled, effects = {}, {}, 0, 0, 0
    for t in TENANTS:
        msgs, keys = _feed(run_id, markers[t], n, day)
        stack.send(t, msgs)
        model = Model(get_tenant(t))
        for m in msgs:
            model.send(m if isinstance(m, bytes) else orjson.dumps(m), int(time.time() * 1000))
        fed[t] = (msgs, keys, model)
    for t, (msgs, keys, model) in fed.items():
        want = {e["event_id"] for e in model.events}
        ids = {m["event_id"] for m in msgs if isinstance(m, dict)}

        def mine(e, keys=set(keys), ids=ids):
            return e.get("dedup_key") in keys and e.get("caused_by") in ids
        events = stack.read(t, "domain-events", mine, until=lambda f, want=want: want <= {e["event_id"] for e in f},
                            deadline=120, settle=1.0)
        distinct = {(e["case_id"], e["version"]): e["event_id"] for e in events}
        doubled += len(distinct) - len(set(distinct.values()))
        effects += len(distinct) + len(model.rejected)
        lost += len(want - set(distinct.values()))
        cases[t] = projected(stack, t, distinct)
        stack.read(t, "dlq", lambda r, m=markers[t]: m in (r.get("original") or ""), count=len(model.rejected))
    rss.sample(stack.oncall.proc.pid, stack.cm.proc.pid)

    leaks: dict[str, object] = {}
    seen: dict[str, set[str]] = {}
    for a, b in (TENANTS, TENANTS[::-1]):
        ma, mb = markers[a], markers[b]
        # topics: every one of B's; its own marker shows the scan sees what it looks for
        own = set()
        for topic in tenant_topics(stack, b):
            hits = topic_hits(stack, topic, [ma.encode(), mb.encode()])
            if hits[ma.encode()]:
                leaks[f"topic {topic}"] = hits[ma.encode()]
            if hits[mb.encode()]:
                own.add(topic)
        # the database: every table
        for table, hits in table_hits(stack, b, [ma, mb]).items():
            if hits[ma]:
                leaks[f"table {b}.{table}"] = hits[ma]
            if hits[mb]:
                own.add(f"table {table}")
        # the index: every document of every index behind B's alias
        docs = orjson.dumps(index_docs(stack, stack.index(b))).decode()
        if ma in docs:
            leaks[f"index {stack.index(b)}"] = docs.count(ma)
        if mb in docs:
            own.add("index")
        # the API under B: A's marker, tag and case ids
        calls = {"search q": (f"/v1/{b}/cases", {"q": ma}), "search tag": (f"/v1/{b}/cases", {"tag": f"tag:{ma}"}),
                 "facets": (f"/v1/{b}/cases", {"facets": "tags,source", "size": 200}),
                 "analytics": (f"/v1/{b}/analytics", {"metric": "count", "interval": "day", "group_by": "source",
                                                      "created_from": day.isoformat(),
                                                      "created_to": (day + timedelta(days=1)).isoformat()})}
        for cid in cases[a]:
            calls[f"case {cid}"] = (f"/v1/{b}/cases/{cid}", {})
            calls[f"timeline {cid}"] = (f"/v1/{b}/cases/{cid}/timeline", {})
        answers = {}
        for what, (path, params) in calls.items():
            status, body = answers[what] = get(api, path, **params)
            text = orjson.dumps(body).decode()
            if what.startswith(("case ", "timeline ")):   # not found (the answer names the id asked for)
                if status != 404 or ma in text:
                    leaks[f"api {b} {what}"] = (status, text[:200])
            elif status != 200 or ma in text or any(cid in text for cid in cases[a]):
                leaks[f"api {b} {what}"] = (status, text[:200])
        day_counts = answers["analytics"][1]["buckets"]
        if sum(x["count"] for x in day_counts) != len(cases[b]):   # a day only this test's cases use
            leaks[f"api {b} analytics count"] = day_counts
        status, body = get(api, f"/v1/{b}/cases", tag=f"tag:{mb}", size=200)
        if body.get("total") == len(cases[b]):
            own.add("api")
        seen[b] = own

    def expected_own(t: str) -> set[str]:
        family = load_topics(t)
        return {"api", "index", "table cases", "table case_states", "table timeline",
                family.changelog("keys").name} | {family.name(r) for r in ("intake", "intake-routed",
                                                                         "domain-events", "dlq")}
    blind = {t: sorted(expected_own(t) - seen[t]) for t in TENANTS}
    report = record(Report(
        "11 tenant isolation", engine_set.profile, events_in=sum(len(f[0]) for f in fed.values()),
        effects_out=effects, lost=lost, doubled=doubled, divergent=len(leaks),
        duration_s=round(time.monotonic() - started, 1), peak_rss_mib=rss.peak,
        notes=f"divergent = places of one tenant holding the other's data, looked for in every topic of its "
              f"family ({ {t: len(tenant_topics(stack, t)) for t in TENANTS} }), every table, every document of "
              f"its index and {len(calls)} API calls each; its own marker was seen in "
              f"{ {t: len(seen[t]) for t in TENANTS} } of them"))
    report.assert_clean(f"leaks: {leaks}")
    assert not any(blind.values()), f"scans that did not see the tenant's own marker: {blind}"


# -- 12. responder names and e-mails ------------------------------------------------------------------------

def test_responder_names_and_emails_stay_out_of_every_index(fresh_stack, tmp_path, engine_set, run_id):
    """The paging suite's people (test_paging_e2e.ONCALL: a schedule, a user step, a team step) renamed to
    names and addresses no other test uses; pages escalate until all three are responders; one is
    acknowledged by a person (a command with their record as actor), one assigned to a person, one noted on
    with a comment naming them. Then not one document of any Elasticsearch index (every index, hidden ones
    too, raw ``_source`` text, case-insensitive) holds a name or an address; PostgreSQL holds them (where
    they live is in the report)."""
    from tests.integration.test_paging_e2e import MIN, ONCALL, Pager

    stack, started, rss = fresh_stack, time.monotonic(), PeakRss()
    surname = f"Pii{run_id}"
    pager = Pager(stack, "on-call", ONCALL.replace("Pagerson", surname).replace("pagerson", surname.lower()),
                  tmp_path, (int(time.time() * 1000) // MIN) * MIN)
    people = {uid: {"id": uid, "name": u.name, "email": u.email} for uid, u in pager.model.oncall.users.items()}
    secrets = sorted({p["name"] for p in people.values()} | {p["email"] for p in people.values()} | {surname})
    assert len(people) == 3 and all(surname in p["name"] and surname.lower() in p["email"] for p in people.values())
    worker = pager.start()
    t0, prefix, n = pager.now, f"{run_id}/", scale(4)
    keys = [f"{prefix}p{i}" for i in range(max(n, 3))]
    sent = [{"event_id": f"{run_id}-t{i}", "action": "trigger", "dedup_key": k, "summary": f"page {i}"}
            for i, k in enumerate(keys)]
    pager.send(sent)
    pager.events(prefix, len(pager.expected(prefix)))
    pager.at(t0 + 6 * MIN)                                         # the second step: u-cat
    pager.events(prefix, len(pager.expected(prefix)))
    ann, ben, cat = people["u-ann"], people["u-ben"], people["u-cat"]
    commands = [
        {"event_id": f"{run_id}-ack", "command": "set_status", "dedup_key": keys[0], "actor": ann,
         "status": "ACKNOWLEDGED"},
        {"event_id": f"{run_id}-assign", "command": "assign", "dedup_key": keys[1], "actor": cat, "assignee": ben},
        {"event_id": f"{run_id}-note", "command": "comment", "dedup_key": keys[2], "actor": cat,
         "text": f"{ann['name']} ({ann['email']}) and {ben['name']} are looking"}]
    pager.send(commands)
    sent += commands
    pager.events(prefix, len(pager.expected(prefix)))
    pager.at(t0 + 16 * MIN)                                        # the third step: the whole team
    want = pager.expected(prefix)
    events = pager.events(prefix, len(want))
    rss.sample(worker.proc.pid)
    distinct = {(e["case_id"], e["version"]): e["event_id"] for e in events}
    latest = projected(stack, "on-call", distinct)
    docs = Projections(stack, "on-call", stack.db_prefix, stack.index("on-call"))._docs(sorted(latest))
    # everyone was paged (all but the acknowledged page reached the whole team)
    assert sum(set(d["responder_users"]) == set(people) for d in docs.values()) == len(keys) - 1, docs

    everything = index_docs(stack, "_all")
    text = orjson.dumps(everything).decode().lower()
    found = {s: text.count(s.lower()) for s in secrets if s.lower() in text}
    assert set(latest) <= {h["_id"] for h in everything}            # the scan saw this test's documents
    places = {f"table {t}": sum(h.values()) for t, h in table_hits(stack, "on-call", secrets).items()
              if any(h.values())}
    places.update({f"topic {t}": sum(h.values()) for t in tenant_topics(stack, "on-call")
                   for h in [topic_hits(stack, t, [s.encode() for s in secrets])] if any(h.values())})
    report = record(Report(
        "12 responder names and e-mails", engine_set.profile, events_in=len(sent),
        effects_out=len(distinct), lost=len(set(want) - set(distinct)), doubled=len(distinct) - len(set(
            distinct.values())), divergent=len(found), duration_s=round(time.monotonic() - started, 1),
        peak_rss_mib=rss.peak,
        notes=f"divergent = names/addresses found in Elasticsearch ({len(everything)} documents of every index "
              f"read); they live in PostgreSQL and Kafka (occurrences of the {len(secrets)} strings): {places}"))
    report.assert_clean(f"in Elasticsearch: {found}")
    assert {"table cases", "table case_states", "table timeline"} <= set(places), places
