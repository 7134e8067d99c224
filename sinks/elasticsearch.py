"""Elasticsearch indexer: one search document per case, per tenant index.

The index (``cases-<tenant>`` by default) is created with an explicit
mapping, derived from the case fields of ``streams/domain/case_schema.py``.
Each batch: fetch the current documents of the batch's cases (``mget``),
fold the new events onto the case state each document stores (its
``state`` object: mapped ``enabled: false``, so kept in ``_source`` and
never searchable; no payloads, people by id only) with the fold of
``sinks/base.py``, and write them in one ``bulk`` with external versioning
on the case ``version``
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
id only (names and emails are not indexed, nor stored). Searches leave the
stored state out (``streams/query.py``). A document indexed before documents
held their state is read back from its fields (``state_from_document``) and
gets its state at its case's next event.

On-call properties (escalation policy, step, targets, responders, SLA
breaches) are indexed the same way: targets as ``kind:id`` keywords,
responders as ``responder_users`` (user ids); the state's ``responders``
records, which carry names and emails, are never indexed.

The mapping is strict. Opening an existing index puts the full mapping again
(``put_mapping`` only adds fields; a changed type is an error), so an index
created before a field was added (the on-call fields, the stored state)
accepts documents with it.
"""

from __future__ import annotations

import logging

from sinks.base import Backoff, BatchingSink, CaseEvents, Rejected, SinkRecord
from sinks.history import CaseHistory, Gap
from streams import metrics
from streams.config import Tenant
from streams.domain import case_schema

log = logging.getLogger("casestream.sinks.elasticsearch")

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})   # a request answered so: retried with backoff
# how the registry's index kinds (streams/domain/case_schema.py) map
_KINDS = {
    case_schema.KEYWORD: {"type": "keyword"},
    case_schema.TEXT: {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 1024}}},
    case_schema.DATE: {"type": "date", "format": "epoch_millis"},
    case_schema.LONG: {"type": "long"},
    case_schema.DOUBLE: {"type": "double"},
    case_schema.BOOLEAN: {"type": "boolean"},
}
_INDEXED = tuple(f for f in case_schema.FIELDS if f.index is not None)
STORED_STATE = case_schema.STORED_STATE
MAPPING = {
    "dynamic": "strict",
    "properties": {
        **{f.name: _KINDS[f.index] for f in _INDEXED},
        **{f.name: _KINDS[f.index] for f in case_schema.SEARCH_FIELDS},
        # the case state later events fold onto: kept in _source, never searchable (people by id only)
        STORED_STATE: {"type": "object", "enabled": False},
    },
}


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


def _search_value(f: case_schema.CaseField, v):
    if f.type == case_schema.TARGETS:
        return [f"{t['kind']}:{t['id']}" for t in v or []]
    if f.type == case_schema.STRS:
        return list(v or [])
    return v


def document(case: dict) -> dict:
    """The search document of a case: its indexed fields (an allowlist, people by id only), the
    computed ones, and the state to fold later events onto (no payloads, people by id only)."""
    case = case_schema.with_defaults(case)  # a case folded before the on-call fields existed has the defaults
    doc = {f.name: _search_value(f, case.get(f.name)) for f in _INDEXED}
    doc.update({f.name: f.of(case) for f in case_schema.SEARCH_FIELDS})
    doc[STORED_STATE] = case_schema.index_state(case)
    return doc


def stored_state(doc: dict) -> dict:
    """The case state a document holds (of a document indexed before it held one: rebuilt from its fields)."""
    state = doc.get(STORED_STATE)
    return state if state is not None else state_from_document(doc)


def state_from_document(doc: dict) -> dict:
    """Enough of a case, from the fields of a document indexed before documents held their state
    (``STORED_STATE``), for ``apply`` of later events. Such a document is rewritten with its state
    at its case's next event; this is only read for documents no event has touched since."""
    state = {k: v for k, v in doc.items() if k != STORED_STATE}
    aid = state.get("assignee_id")
    for f in case_schema.SEARCH_FIELDS:
        state.pop(f.name, None)
    state["assignee"] = {"id": aid, "name": None, "email": None} if aid else None
    state = case_schema.with_defaults(state)  # a document indexed before the on-call fields
    state["targets"] = [dict(zip(("kind", "id"), t.split(":", 1))) for t in state["targets"]]
    # names and emails are not indexed: responders come back by id only
    state["responders"] = [{"id": uid, "name": None, "email": None} for uid in state["responder_users"]]
    return state


class ElasticsearchSink(BatchingSink):
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

    @property
    def target(self) -> str:
        return self.index

    def is_open(self) -> bool:
        return self.client is not None

    def retryable(self) -> tuple[type[BaseException], ...]:
        from elasticsearch import ConnectionError as ESConnectionError, ConnectionTimeout

        return (ESConnectionError, ConnectionTimeout, OSError, _Retryable)

    async def connect(self) -> None:
        from elasticsearch import AsyncElasticsearch

        if self.client is None:
            self.client = AsyncElasticsearch(self.url, request_timeout=30)
        if self.create:
            await _transient(self.ensure_index())

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

    async def write_once(self, records: list[SinkRecord]) -> list[Rejected]:
        """The records whose document the index refused for good (the rest is indexed)."""
        return await _transient(self._index(records))

    async def _load(self, ids: list[str]) -> dict[str, dict]:
        got = await self.client.mget(index=self.index, ids=ids)
        unread = [d for d in got.body["docs"] if "error" in d]
        if unread:  # e.g. a shard not recovered yet after a restart: "not found" would skip its events
            raise _Retryable(f"mget {unread[0].get('_id')}: {unread[0]['error']}")
        return {d["_id"]: stored_state(d["_source"]) for d in got.body["docs"] if d.get("found")}

    async def _index(self, records: list[SinkRecord]) -> list[Rejected]:
        ops: list[dict] = []
        written: list[tuple[str, list[SinkRecord]]] = []   # per document written: its case, the records in it
        repaired: set[str] = set()
        for f in await self.fold_batch(records, self._load, self._repair):
            if f.missing is not None:
                self.skipped += 1
                log.error("%s: %s: version %d is in neither the batch nor the domain-event log; "
                          "indexed up to %s", self.index, f.case_id, f.missing, f.state and f.state["version"])
            if not f.changed:
                continue  # nothing to fold: the next version is missing
            if f.repaired:
                repaired.add(f.case_id)
            written.append((f.case_id, f.records))
            ops.append({"index": {"_index": self.index, "_id": f.case_id, "version": f.state["version"],
                                  "version_type": "external"}})
            ops.append(document(f.state))
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

    async def _repair(self, gaps: list[CaseEvents]) -> None:
        """Add to each case with a version gap the events the batch lacks between its document and its
        events, read back from the domain-event log."""
        from aiokafka.errors import KafkaError, KafkaTimeoutError

        try:
            found = await self.history.missing([Gap(c.case_id, c.stored_version, c.last.topic, c.last.partition,
                                                    c.last.offset) for c in gaps])
        except KafkaError as exc:  # the log unreachable for the moment: the batch is retried
            if exc.retriable or isinstance(exc, KafkaTimeoutError):
                raise _Retryable(f"reading the domain-event log back: {exc!r}") from exc
            raise
        for c in gaps:
            c.add(found.get(c.case_id, ()))
            if c.gapless():
                log.warning("%s: %s had version %d indexed and the batch lacks versions after it; those were "
                            "read back from %s[%d]", self.index, c.case_id, c.stored_version, c.last.topic,
                            c.last.partition)

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
