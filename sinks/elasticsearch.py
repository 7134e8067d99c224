"""Elasticsearch indexer: one search document per case, per tenant index.

The index (``cases-<tenant>`` by default) is created with an explicit
mapping. Each batch: fetch the current documents of the batch's cases
(``mget``), fold the new events into them with the domain's ``apply``, and
write them in one ``bulk`` with external versioning on the case ``version``
-- duplicates and replays are harmless, an older version never overwrites a
newer one, and a version conflict counts as success. A document behind the
batch's events (a version gap: the document was refused before, or a record
never reached the sink) is repaired, not left: the events in between are read
back from the domain-event log (``sinks/history.py``) and folded in, so the
document always ends equal to the fold of the case's events
(``casestream_projection_repairs_total``).

Errors: connection errors, timeouts, 429 and 502/503/504 answers (after the
client's own retries) and bulk items answered 429 or 5xx are transient: the
batch is retried with the sink's ``Backoff``. A document the index refuses
for good (any other 4xx bulk item but 409, e.g. a mapping error) is not
retried: its records are returned as ``Rejected`` and the projection agent
dead-letters them (``projection_rejected``). Documents are built
from an allowlist of fields (never by copying the event); people appear by
id only (names and emails are not indexed).

On-call properties (escalation policy, step, targets, responders, SLA
breaches) are indexed the same way: targets as ``kind:id`` keywords,
responders as ``responder_users`` (user ids); the state's ``responders``
records, which carry names and emails, are never indexed.

The mapping is strict. Opening an existing index puts the full mapping again
(``put_mapping`` only adds fields; a changed type is an error), so an index
created before a field was added accepts documents with it.
"""

from __future__ import annotations

import logging

from sinks.base import Backoff, Rejected, SinkRecord
from sinks.history import CaseHistory, Gap
from streams import metrics
from streams.config import Tenant
from streams.domain import cases as domain

log = logging.getLogger("casestream.sinks.elasticsearch")

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})   # a request answered so: retried with backoff
KEYWORD = {"type": "keyword"}
DATE = {"type": "date", "format": "epoch_millis"}
MAPPING = {
    "dynamic": "strict",
    "properties": {
        "case_id": KEYWORD, "tenant": KEYWORD, "dedup_key": KEYWORD, "status": KEYWORD,
        "case_type": KEYWORD, "work_type": KEYWORD, "severity": KEYWORD, "priority": KEYWORD,
        "urgency": KEYWORD, "source": KEYWORD, "project": KEYWORD, "component": KEYWORD,
        "group": KEYWORD, "class": KEYWORD, "tags": KEYWORD, "assignee_id": KEYWORD,
        "summary": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 1024}}},
        "created_at": DATE, "updated_at": DATE, "last_seen_at": DATE, "status_changed_at": DATE,
        "acknowledged_at": DATE, "resolved_at": DATE,
        "occurrence_count": {"type": "long"}, "comment_count": {"type": "long"}, "version": {"type": "long"},
        "time_to_acknowledge_seconds": {"type": "double"}, "time_to_resolve_seconds": {"type": "double"},
        # on-call properties (people by id only)
        "escalation_policy_id": KEYWORD, "escalation_policy_step_id": KEYWORD,
        "escalation_policy_retry_count": {"type": "long"}, "escalation_active": {"type": "boolean"},
        "is_shadow": {"type": "boolean"}, "targets": KEYWORD, "responder_users": KEYWORD,
        "responders_added_at": DATE, "time_to_first_acknowledge": {"type": "long"}, "sla_breaches": KEYWORD,
    },
}
_FIELDS = ("case_id", "tenant", "dedup_key", "status", "case_type", "work_type", "severity", "priority",
           "urgency", "source", "project", "component", "group", "class", "tags", "summary", "created_at",
           "updated_at", "last_seen_at", "status_changed_at", "acknowledged_at", "resolved_at",
           "occurrence_count", "comment_count", "version",
           "escalation_policy_id", "escalation_policy_step_id", "responders_added_at")


def index_name(tenant: Tenant, prefix: str = "") -> str:
    """The tenant's index (an alias): ``index`` from tenants.yaml, else ``cases-<tenant>``, after ``prefix``."""
    return f"{prefix}{tenant.index or f'cases-{tenant.name}'}"


def concrete_index_name(alias: str) -> str:
    from datetime import datetime, timezone

    return f"{alias}-{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S%f')}"


async def create_index(client, name: str) -> None:
    from elasticsearch import BadRequestError

    try:
        await client.indices.create(index=name, mappings=MAPPING)
    except BadRequestError as exc:
        if "resource_already_exists" not in str(exc):
            raise


def document(case: dict) -> dict:
    """The search document of a case: an allowlist, people by id only."""
    doc = {f: case.get(f) for f in _FIELDS}
    doc["tags"] = list(case.get("tags") or [])
    doc["assignee_id"] = (case.get("assignee") or {}).get("id")
    created = case.get("created_at")
    ack, res = case.get("acknowledged_at"), case.get("resolved_at")
    doc["time_to_acknowledge_seconds"] = (ack - created) / 1000 if ack is not None and created is not None else None
    doc["time_to_resolve_seconds"] = (res - created) / 1000 if res is not None and created is not None else None
    # on-call: a case folded before these fields existed has the defaults
    doc["escalation_policy_retry_count"] = case.get("escalation_policy_retry_count") or 0
    doc["escalation_active"] = bool(case.get("escalation_active"))
    doc["is_shadow"] = bool(case.get("is_shadow"))
    doc["targets"] = [f"{t['kind']}:{t['id']}" for t in case.get("targets") or []]
    doc["responder_users"] = list(case.get("responder_users") or [])  # ids, never the records
    doc["sla_breaches"] = list(case.get("sla_breaches") or [])
    ttfa = case.get("time_to_first_acknowledge")
    if ttfa is None and ack is not None and created is not None:
        ttfa = ack - created  # what apply computes at the first acknowledge (ms)
    doc["time_to_first_acknowledge"] = ttfa
    return doc


def state_from_document(doc: dict) -> dict:
    """Enough of a case, from its document, for ``apply`` of later events."""
    state = dict(doc)
    aid = state.pop("assignee_id", None)
    state["assignee"] = {"id": aid, "name": None, "email": None} if aid else None
    state.pop("time_to_acknowledge_seconds", None)
    state.pop("time_to_resolve_seconds", None)
    for k, v in domain.ONCALL_DEFAULTS.items():  # a document indexed before the on-call fields
        if state.get(k) is None:
            state[k] = list(v) if isinstance(v, list) else v
    state["targets"] = [dict(zip(("kind", "id"), t.split(":", 1))) for t in state["targets"]]
    # names and emails are not indexed: responders come back by id only
    state["responders"] = [{"id": uid, "name": None, "email": None} for uid in state["responder_users"]]
    return state


class ElasticsearchSink:
    name = "elasticsearch"

    def __init__(self, url: str, index: str, tenant: Tenant, history: CaseHistory, backoff: Backoff | None = None,
                 create: bool = True):
        self.url = url
        self.index = index
        self.create = create  # False: the index is made by someone else (a rebuild)
        self.tenant = tenant
        self.history = history  # where a case's events missing from a batch are read back (sinks/history.py)
        self.backoff = backoff or Backoff()
        self.client = None
        self.skipped = 0

    def _retry_on(self) -> tuple[type[BaseException], ...]:
        from elasticsearch import ConnectionError as ESConnectionError, ConnectionTimeout

        return (ESConnectionError, ConnectionTimeout, OSError, _Retryable)

    async def open(self) -> None:
        from elasticsearch import AsyncElasticsearch

        if self.client is None:
            self.client = AsyncElasticsearch(self.url, request_timeout=30)
        if self.create:
            await self.backoff.run(f"elasticsearch open {self.index}", lambda: _transient(self.ensure_index()),
                                   self._retry_on())

    async def ensure_index(self) -> None:
        """The alias ``self.index`` over a concrete index (``<alias>-initial``, after a rebuild
        ``<alias>-<utc time>``), created when absent;
        an existing index gets the current mapping's new fields.

        Writers and readers use the alias; a rebuild fills a fresh concrete
        index and swaps the alias (``streams/replay.py``).
        """
        if await self.client.indices.exists(index=self.index):
            # additive: adds the fields a newer MAPPING has (a changed type fails here, loudly)
            await self.client.indices.put_mapping(index=self.index, dynamic=MAPPING["dynamic"],
                                                  properties=MAPPING["properties"])
            return
        # the first concrete index has a fixed name: workers opening at once all create that one index
        # (creating it again is harmless) and add the one alias; a name each would leave the alias over
        # several indices, with no write index, and every document rejected
        concrete = f"{self.index}-initial"
        await create_index(self.client, concrete)
        await self.client.indices.update_aliases(actions=[{"add": {"index": concrete, "alias": self.index}}])

    async def write_batch(self, records: list[SinkRecord]) -> list[Rejected]:
        """The records whose document the index refused for good (the rest is indexed)."""
        if not records:
            return []
        if self.client is None:
            await self.open()
        return await self.backoff.run(f"elasticsearch bulk to {self.index}", lambda: _transient(self._write(records)),
                                      self._retry_on())

    async def _write(self, records: list[SinkRecord]) -> list[Rejected]:
        by_case: dict[str, list[dict]] = {}
        record_of: dict[tuple[str, int], SinkRecord] = {}
        for r in records:
            by_case.setdefault(r.event["case_id"], []).append(r.event)
            record_of.setdefault((r.event["case_id"], r.event["version"]), r)
        ids = sorted(by_case)
        got = await self.client.mget(index=self.index, ids=ids)
        unread = [d for d in got.body["docs"] if "error" in d]
        if unread:  # e.g. a shard not recovered yet after a restart: "not found" would skip its events
            raise _Retryable(f"mget {unread[0].get('_id')}: {unread[0]['error']}")
        current = {d["_id"]: d["_source"] for d in got.body["docs"] if d.get("found")}
        indexed: dict[str, dict | None] = {}   # the state of each case's document (None: no document)
        pending: dict[str, dict[int, dict]] = {}  # case -> version -> event to fold onto it
        gaps: list[Gap] = []
        for cid in ids:
            doc = current.get(cid)
            state = state_from_document(doc) if doc else None
            version = state["version"] if state else 0
            # one event per version: a batch may hold an event twice (Kafka redelivers at least once), and a
            # repeat must not end the fold below early (what came after it would never be indexed)
            evs = {e["version"]: e for e in by_case[cid] if e["version"] > version}
            if not evs:
                continue  # all already indexed: a redelivery
            indexed[cid], pending[cid] = state, evs
            if sorted(evs) != list(range(version + 1, version + 1 + len(evs))):
                last = record_of[(cid, max(evs))]   # the events in between sit below it in the log
                gaps.append(Gap(cid, version, last.topic, last.partition, last.offset))
        repaired = await self._repair(gaps, pending) if gaps else set()
        ops: list[dict] = []
        written: list[tuple[str, list[SinkRecord]]] = []   # per document written: its case, the records in it
        for cid, evs in pending.items():
            state, used = indexed[cid], []
            for v in sorted(evs):
                if v != (state["version"] if state else 0) + 1:
                    self.skipped += 1
                    log.error("%s: %s: version %d is in neither the batch nor the domain-event log; "
                              "indexed up to %s", self.index, cid, (state["version"] if state else 0) + 1,
                              state and state["version"])
                    break
                state = domain.apply(self.tenant, state, evs[v])
                if (cid, v) in record_of:
                    used.append(record_of[(cid, v)])
            if state is indexed[cid]:
                continue  # nothing to fold: the next version is missing
            written.append((cid, used))
            ops.append({"index": {"_index": self.index, "_id": cid, "version": state["version"],
                                  "version_type": "external"}})
            ops.append(document(state))
        if not ops:
            return []
        # no explicit refresh: the server refreshes every second by itself (Elasticsearch, and the stand-in too)
        resp = await self.client.bulk(operations=ops, refresh=False)
        rejected: list[Rejected] = []
        if resp.body.get("errors"):
            for item, (cid, used) in zip(resp.body["items"], written):
                res = item.get("index", {})
                status = res.get("status", 200)
                if status == 409 or status < 300:
                    continue  # a newer or equal version is there: success
                if status == 429 or status >= 500:
                    raise _Retryable(f"bulk item {res.get('_id')}: {status} {res.get('error')}")
                self.skipped += 1
                repaired.discard(cid)
                why = f"bulk item {status}: {_error_text(res.get('error'))}"
                log.error("%s: document %s refused for good (dead-lettered): %s", self.index, res.get("_id"), why)
                rejected.extend(Rejected(r, why) for r in used)
        if repaired:
            metrics.PROJECTION_REPAIRS.labels(self.tenant.name, self.name).inc(len(repaired))
        return rejected

    async def _repair(self, gaps: list[Gap], pending: dict[str, dict[int, dict]]) -> set[str]:
        """Add the events the batch lacks between each gap's document and its events, read back from the
        domain-event log, to ``pending``; the cases now gapless."""
        from aiokafka.errors import KafkaError, KafkaTimeoutError

        try:
            found = await self.history.missing(gaps)
        except KafkaError as exc:  # the log unreachable for the moment: the batch is retried
            if exc.retriable or isinstance(exc, KafkaTimeoutError):
                raise _Retryable(f"reading the domain-event log back: {exc!r}") from exc
            raise
        repaired = set()
        for g in gaps:
            evs = pending[g.case_id]
            for e in found.get(g.case_id, ()):
                evs.setdefault(e["version"], e)
            if sorted(evs) == list(range(g.indexed + 1, g.indexed + 1 + len(evs))):
                repaired.add(g.case_id)
                log.warning("%s: %s had version %d indexed and the batch lacks versions after it; those were "
                            "read back from %s[%d]", self.index, g.case_id, g.indexed, g.topic, g.partition)
        return repaired

    async def flush(self) -> None:
        """Searchable now (a rebuild's end), not at the server's next refresh."""
        if self.client is not None:
            await self.client.indices.refresh(index=self.index)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


class _Retryable(Exception):
    """A request or bulk item failed in a way worth retrying (429, 5xx, an unread shard)."""


async def _transient(call):
    """``await call``, with the server's overloaded/unavailable answers (``TRANSIENT_STATUSES``) raised
    as ``_Retryable`` (the client has retried them already; the sink's backoff takes over)."""
    from elasticsearch import ApiError

    try:
        return await call
    except ApiError as exc:
        if exc.meta.status in TRANSIENT_STATUSES:
            raise _Retryable(f"{exc.meta.status} {exc.message}") from exc
        raise


def _error_text(error) -> str:
    """A bulk item's error, one line: ``type: reason`` (and the cause's)."""
    if not isinstance(error, dict):
        return str(error)
    text = f"{error.get('type')}: {error.get('reason')}"
    cause = error.get("caused_by")
    if isinstance(cause, dict):
        text += f" (caused by {cause.get('type')}: {cause.get('reason')})"
    return " ".join(text.split())[:1000]
