"""A Jepsen-style checker for the fault suite: a history, a model, a verdict. Pure.

* **History** -- what the test did and what it saw. Operations, in the order
  the test performed them: intake messages sent (``ok``: acknowledged by
  Kafka with ``acks=all``; ``info``: the send failed or timed out, so the
  messages may or may not be in the log) and moves of the workers' file
  clock. Observations, read at the end: every record of the domain-event
  log (repeats included), of the relay topics, every request the webhook
  receivers got, the dead letters of the run, and the projections
  (PostgreSQL states, rows and timeline, Elasticsearch documents) and what a
  replay of the log rebuilt. A message sent without ``event_id`` is known by
  its record (``record_event_id``): its send carries the record ids.
* **Model** -- the apply stage over dicts (``streams.stage.memory.MemoryStage``, with the
  tenant's on-call configuration): fed the operations in order, it says
  which domain events must exist (exact, ids included), which deliveries
  the events ask for (``streams.domain.notify.deliveries``) and which events
  each relay subscription carries (``streams.domain.relay.route_events``).
  An ``info`` message is applied when the log shows its effect (an event
  caused by it) and skipped otherwise -- the one choice consistent with the
  log; a wrong choice shows up as a divergence later in the same case.
* **Verdict** -- every anomaly found, by kind, with examples, and counts
  (raw repeats are reported, not errors: delivery is at least once, and
  consumers deduplicate by ``event_id`` / ``(case_id, version)`` / delivery
  id), and the three figures of the report (``Verdict.lost`` / ``doubled`` /
  ``divergent``):

  - *lost*: acknowledged inputs (intake event ids, timers) with fewer effects
    in the log than the model gives them (per case and event type), plus
    expected dead letters never written, deliveries never made and delivery
    outcomes never recorded;
  - *doubled*: effects present twice: a ``(case, version)`` with two
    different events (in the log or on a relay topic), an input with more
    effects of one type in one case than the model gives it (a trigger
    counted twice, a timer fired twice), a delivery outcome recorded twice
    (the receiver getting a delivery id again is a raw repeat, reported);
  - *divergent*: cases whose final state differs from the oracle's (the
    model's events and the delivery outcomes observed after them): a case
    whose log is not exactly that (an event lost, changed, unexpected, a
    gap), whose PostgreSQL state, timeline or rows, or Elasticsearch
    document (the whole document of the folded state), differs from the fold
    of its log or from a rebuild, or whose events on a relay topic are not
    the oracle's (input set = output set, the same content, per-case order);
    and anything else found wrong (a delivery with two bodies, an unexpected
    dead letter), one per item. A lost event also makes its case diverge: it
    counts in both.

What "once" means here:

* a ``(case_id, version)`` is one event: every copy in the log (and in a
  relay topic) has the same ``event_id`` and the same content; versions are
  gapless from 1; the events are exactly the model's;
* a delivery is *made once* when its receiver saw its delivery id (the
  ``X-Casestream-Delivery-Id`` header, also ``delivery.id`` in the body) at
  least once, every request with that id carried the same body (the same
  effect: the body has no attempt number or send time), and its outcome is
  recorded once on the case's timeline (one ``NotificationDelivered``).
  A SIGKILL between the HTTP answer and the recorded result makes the next
  owner send it again: that is a raw repeat, counted. Exactly-once effects
  at the receiver are its deduplication by the delivery id;
* a projection is right when it equals the fold of the log
  (``streams.domain.cases.apply``) and what a replay rebuilt.

Delivery outcomes (``NotificationDelivered`` / ``Failed``,
``EndpointDisabled``) are the one kind of event the model cannot place: they
come when an HTTP answer comes. The checker accepts them after a case's
model events (tests keep cases with deliveries apart from cases with
timers); an outcome between model events is reported as a divergence.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import orjson

from streams.config import Tenant
from streams.domain import cases as domain
from streams.domain.intake import Rejection, parse
from streams.domain.notify import OUTCOME_TYPES
from streams.domain.notify import deliveries as deliveries_for
from streams.domain.relay import route_events
from streams.stage.memory import MemoryStage
from sinks.elasticsearch import document

OK, INFO = "ok", "info"
LOST, DOUBLED, DIVERGENT = "lost", "doubled", "divergent"


def clean(record: dict) -> dict:
    """A decoded record without the reader's ``_partition`` / ``_offset`` / ``_timestamp`` / ``_headers``."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


@dataclass
class Hit:
    """One request a webhook receiver got."""

    delivery_id: str | None
    body: bytes
    path: str = ""
    status: int | None = None   # the receiver's answer (None: unknown, counted as accepted)

    @property
    def accepted(self) -> bool:
        return self.status is None or 200 <= self.status < 300


@dataclass
class History:
    # ("send", status, [raw bytes], at_ms, [record id or None] or None) | ("clock", at_ms)
    ops: list[tuple] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # every domain-event record read, repeats included
    relay: dict[str, list[dict]] = field(default_factory=dict)  # subscription id -> records read
    hits: list[Hit] = field(default_factory=list)
    dead_letters: list[dict] | None = None           # the run's records of T.dlq (None: not recorded)
    # projections, case id -> row/document: live and rebuilt by a replay
    pg_states: dict[str, dict] | None = None          # case_states.state
    pg_timeline: set[tuple[str, int, str]] | None = None  # (case_id, version, event_id)
    pg_rows: dict[str, dict] | None = None            # table -> row key -> row (every column)
    es_docs: dict[str, dict] | None = None            # _source
    replay_pg_states: dict[str, dict] | None = None
    replay_pg_timeline: set[tuple[str, int, str]] | None = None
    replay_pg_rows: dict[str, dict] | None = None
    replay_es_docs: dict[str, dict] | None = None

    def send(self, messages: list, at_ms: int, status: str = OK, record_ids: list[str] | None = None) -> None:
        """Messages published at ``at_ms`` (their record timestamp); ``record_ids``: each record's
        identity (``record_event_id``), what a message without ``event_id`` is known by."""
        assert status in (OK, INFO), status
        raws = [m if isinstance(m, bytes) else orjson.dumps(m) for m in messages]
        assert record_ids is None or len(record_ids) == len(raws), (len(raws), record_ids)
        self.ops.append(("send", status, raws, at_ms, record_ids))

    def clock(self, at_ms: int) -> None:
        self.ops.append(("clock", at_ms))

    def acked(self) -> int:
        return sum(len(op[2]) for op in self.ops if op[0] == "send" and op[1] == OK)


@dataclass
class Verdict:
    anomalies: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    stats: dict[str, int] = field(default_factory=dict)
    detail: str = ""   # the first diverging case, observed against the model, version by version
    # LOST / DOUBLED / DIVERGENT -> what is counted: inputs, effects, cases (module docstring)
    tally: dict[str, set] = field(default_factory=lambda: {LOST: set(), DOUBLED: set(), DIVERGENT: set()})

    @property
    def ok(self) -> bool:
        return not any(self.anomalies.values())

    @property
    def lost(self) -> int:
        return len(self.tally[LOST])

    @property
    def doubled(self) -> int:
        return len(self.tally[DOUBLED])

    @property
    def divergent(self) -> int:
        return len(self.tally[DIVERGENT])

    def add(self, kind: str, what, count: tuple[str, object] | None = None) -> None:
        """An anomaly; ``count``: (LOST | DOUBLED | DIVERGENT, what it counts as). An anomaly
        counted nowhere else is one divergent item of its own."""
        self.anomalies[kind].append(what)
        category, ident = count or (DIVERGENT, (kind, repr(what)))
        self.tally[category].add(ident)

    def counted(self, category: str, ident) -> None:
        """Count ``ident`` under ``category`` where an anomaly already says what is wrong."""
        self.tally[category].add(ident)

    def __str__(self) -> str:
        lines = [f"verdict: {'ok' if self.ok else 'INVALID'}; " + ", ".join(f"{k} {v}" for k, v in self.stats.items())]
        for kind, items in self.anomalies.items():
            if items:
                lines.append(f"  {kind}: {len(items)}, e.g. {items[:3]!r}"[:1500])
        if self.detail:
            lines.append(self.detail)
        return "\n".join(lines)


class Model:
    """The pure domain fed the history's operations; what must be observed."""

    def __init__(self, tenant: Tenant, oncall=None):
        self.tenant = tenant
        self.oncall = oncall
        self.mem = MemoryStage(tenant, oncall)
        self.events: list[dict] = []
        self.deliveries: dict[str, dict] = {}          # delivery id -> request
        self.relayed: dict[str, list[dict]] = defaultdict(list)  # subscription id -> events
        self.rejected: list[tuple[bytes, str]] = []
        self.dead_letters: list[dict] = []     # what each rejection writes to T.dlq: reason, event_id, original

    def _record(self, before_entries: dict, events: list[dict]) -> None:
        if not events:
            return
        self.events += events
        before = {e["case_id"]: (before_entries.get(e["dedup_key"]) or {}).get("cases", {}).get(e["case_id"])
                  for e in events}
        if self.oncall is not None:
            for r in deliveries_for(self.tenant, self.oncall, before, events):
                self.deliveries[r["delivery_id"]] = r
            for sub, e in route_events(self.tenant, self.oncall.subscriptions, before, events):
                self.relayed[sub.id].append(e)

    def _reject(self, raw: bytes, reason: str, event_id: str | None) -> None:
        self.rejected.append((raw, reason))
        self.dead_letters.append({"reason": reason, "event_id": event_id, "original": raw.decode("utf-8", "replace")})

    def _entries_of(self, *keys: str | None) -> dict:
        """The entries of ``keys`` as they are now: a decision replaces the entry of the key it
        touches, never changes one in place (a copy of all of them per input made the model
        quadratic: a 1 000 000-event history did not finish)."""
        return {k: self.mem.entries.get(k) for k in keys if k}

    def send(self, raw: bytes, at_ms: int, record_id: str | None = None) -> None:
        it = parse(raw, self.tenant, at_ms, record_id)
        if isinstance(it, Rejection):
            self._reject(raw, it.reason, record_id)
            return
        before = self._entries_of(it.dedup_key, self.mem.index.get(it.case_id) if it.case_id else None)
        d = self.mem.handle(it)
        if d.rejection is not None:
            self._reject(raw, d.rejection.reason, it.event_id)
        self._record(before, d.events)

    def advance(self, now_ms: int) -> None:
        """Fire every timer due by ``now_ms``, in due order (what ``MemoryStage.advance`` does)."""
        while True:
            due = [t for t in self.mem.pending() if t["due_at"] <= now_ms]
            if not due:
                return
            before = self._entries_of(due[0]["dedup_key"])
            self._record(before, self.mem.fire(due[0]).events)


def run_model(history: History, tenant: Tenant, oncall=None) -> Model:
    """The model after the history's operations (``info`` sends resolved by the log)."""
    observed_causes = {e.get("caused_by") for e in history.events}
    model = Model(tenant, oncall)
    for op in history.ops:
        if op[0] == "clock":
            model.advance(op[1])
            continue
        status, raws, at_ms = op[1:4]
        record_ids = (op[4] if len(op) > 4 else None) or [None] * len(raws)
        for raw, record_id in zip(raws, record_ids):
            if status == OK:
                model.send(raw, at_ms, record_id)
            else:  # indeterminate: applied iff the log says so
                event_id = orjson.loads(raw).get("event_id")
                if event_id in observed_causes:
                    model.send(raw, at_ms)
    return model


def _distinct(records: list[dict], verdict: Verdict, what: str) -> dict[tuple[str, int], dict]:
    """(case, version) -> the one event; a second, different event under one pair is an anomaly
    (a doubled effect)."""
    out: dict[tuple[str, int], dict] = {}
    for r in records:
        e = clean(r)
        k = (e["case_id"], e["version"])
        if k in out and out[k] != e:
            verdict.add(f"{what}conflict", (k, out[k]["event_id"], e["event_id"]) if out[k]["event_id"] != e["event_id"]
                        else (k, "same event id, different content"), (DOUBLED, (what or "log", k)))
            continue
        out.setdefault(k, e)
    return out


def _side_by_side(case_id: str, got: dict, want: dict) -> str:
    """A case's events, observed and modelled, one version a line (type, and what caused it)."""
    def row(e):
        return f"{e['type']} <- {e.get('caused_by')}" if e else "-"
    versions = sorted({v for c, v in got if c == case_id} | {v for c, v in want if c == case_id})
    lines = [f"  case {case_id}: version: observed | model"]
    for ver in versions:
        o, m = got.get((case_id, ver)), want.get((case_id, ver))
        mark = " " if o == m else "*"
        lines.append(f"   {mark}{ver:3d}: {row(o)} | {row(m)}")
    return "\n".join(lines)


def check(history: History, tenant: Tenant, oncall=None, *, scope=lambda e: True) -> Verdict:
    """Everything the history shows against the model. ``scope(event)`` selects the
    events of this test (by dedup key) in a log other tests may share."""
    v = Verdict()
    model = run_model(history, tenant, oncall)
    log = [e for e in history.events if scope(e)]
    got = _distinct(log, v, "")
    want = {(e["case_id"], e["version"]): e for e in model.events if scope(e)}
    v.stats.update(acked=history.acked(), log_records=len(log), distinct_events=len(got), model_events=len(want),
                   log_repeats=len(log) - len(got))

    # -- the log: exactly the model's events, plus delivery outcomes after them ------------------
    model_last = Counter()
    for (cid, ver) in want:
        model_last[cid] = max(model_last[cid], ver)
    for k, e in want.items():
        if k not in got:
            v.add("lost", (k, e["type"], e["caused_by"]), (DIVERGENT, k[0]))
        elif got[k] != e:
            diff = sorted(f for f in set(e) | set(got[k]) if e.get(f) != got[k].get(f))
            v.add("diverged", (k, e["type"], got[k]["type"], diff), (DIVERGENT, k[0]))
            if not v.detail:
                v.detail = _side_by_side(k[0], got, want)
    outcomes: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for k, e in got.items():
        if k in want:
            continue
        if e["type"] in OUTCOME_TYPES and k[1] > model_last[k[0]]:
            outcomes[e.get("delivery_id")].append(k)
        else:
            v.add("unexpected", (k, e["type"], e.get("caused_by")), (DIVERGENT, k[0]))
    by_case: dict[str, list[int]] = defaultdict(list)
    for cid, ver in got:
        by_case[cid].append(ver)
    for cid, vers in by_case.items():
        if sorted(vers) != list(range(1, len(vers) + 1)):
            v.add("gap", (cid, sorted(vers)), (DIVERGENT, cid))
    # each input's effects, per case and event type: fewer than the model's is an input lost,
    # more is an effect doubled (a trigger counted twice, a timer fired twice)
    modelled = Counter((e["case_id"], e["caused_by"], e["type"]) for e in want.values())
    observed = Counter((e["case_id"], e.get("caused_by"), e["type"]) for e in got.values()
                       if e["type"] not in OUTCOME_TYPES)
    for effect in modelled.keys() | observed.keys():
        if modelled[effect] > observed[effect]:
            v.counted(LOST, ("input", effect[1]))
        elif observed[effect] > modelled[effect]:
            v.counted(DOUBLED, ("effect",) + effect)

    # -- deliveries: each expected one made (same body every time), its outcome recorded once -----
    expected = {did: r for did, r in model.deliveries.items() if scope(r)}
    bodies: dict[str, set[bytes]] = defaultdict(set)
    hits, accepted = Counter(), Counter()
    for h in history.hits:
        bodies[h.delivery_id].add(h.body)
        hits[h.delivery_id] += 1
        accepted[h.delivery_id] += h.accepted
    for did, r in expected.items():
        if not accepted[did]:
            v.add("delivery_lost", (did, r["endpoint"], r["case_id"]), (LOST, ("delivery", did)))
        if len(outcomes.get(did, [])) != 1:
            v.add("outcome_not_once", (did, r["case_id"], outcomes.get(did, [])),
                  (DOUBLED if outcomes.get(did) else LOST, ("outcome", did)))
        elif got[outcomes[did][0]]["type"] != "NotificationDelivered":
            v.add("outcome_not_delivered", (did, got[outcomes[did][0]]["type"], got[outcomes[did][0]].get("reason")),
                  (DIVERGENT, r["case_id"]))
    for did in bodies:
        if did not in expected:
            v.add("delivery_unexpected", did)
        if len(bodies[did]) > 1:
            v.add("delivery_differs", (did, len(bodies[did])))
    for did in outcomes:
        if did not in expected:
            v.add("unexpected", ("outcome of an unknown delivery", did, outcomes[did]), (DIVERGENT, outcomes[did][0][0]))
    # raw repeats: requests the receiver accepted again for a delivery it had accepted already
    # (the effect itself is once by delivery id); retries after an error answer are counted apart
    v.stats.update(deliveries=len(expected), requests=sum(hits.values()),
                   delivery_repeats=sum(n - 1 for n in accepted.values() if n > 1),
                   retried_after_error=sum(hits.values()) - sum(accepted.values()))
    effects = len(got) + sum(1 for did in accepted if accepted[did])

    # -- dead letters: every rejection the model makes is in T.dlq (repeats reported) -------------
    if history.dead_letters is not None:
        effects += _check_dead_letters(v, model.dead_letters, history.dead_letters)

    # -- relay topics: exactly the subscribed events, each once by content, per-case order --------
    for sub_id, records in history.relay.items():
        mine = [r for r in records if scope(r)]
        copies = _distinct(mine, v, f"relay_{sub_id}_")
        wanted = {(e["case_id"], e["version"]) for e in model.relayed.get(sub_id, []) if scope(e)}
        for k in wanted - set(copies):
            v.add("relay_lost", (sub_id, k), (DIVERGENT, k[0]))
        for k in set(copies) - wanted:
            if not (copies[k]["type"] in OUTCOME_TYPES and k in got and k not in want):  # outcomes: as in the log
                v.add("relay_unexpected", (sub_id, k, copies[k]["type"]), (DIVERGENT, k[0]))
        for k, e in copies.items():
            if e != want.get(k, got.get(k, e)):
                v.add("relay_diverged", (sub_id, k), (DIVERGENT, k[0]))
        first_seen: dict[str, list[int]] = defaultdict(list)
        for r in sorted(mine, key=lambda r: (r.get("_partition", 0), r.get("_offset", 0))):
            seen = first_seen[r["case_id"]]
            if r["version"] not in seen:
                seen.append(r["version"])
        for cid, order in first_seen.items():
            if order != sorted(order):
                v.add("relay_order", (sub_id, cid, order), (DIVERGENT, cid))
        v.stats[f"relay_{sub_id}_repeats"] = len(mine) - len(copies)
        effects += len(copies)
    v.stats["effects"] = effects

    # -- projections: the fold of the log, and what a replay rebuilt ------------------------------
    folded: dict[str, dict] = {}
    for cid in by_case:
        try:
            folded[cid] = domain.replay(tenant, [got[(cid, ver)] for ver in sorted(by_case[cid])])
        except ValueError as exc:
            v.add("unfoldable", (cid, str(exc)), (DIVERGENT, cid))
    if history.pg_states is not None:
        for cid, state in folded.items():
            row = history.pg_states.get(cid)
            if row != state:
                v.add("projection_pg", (cid, row and row.get("version"), state["version"]), (DIVERGENT, cid))
        timeline = {(k[0], k[1], e["event_id"]) for k, e in got.items()}
        if history.pg_timeline is not None and history.pg_timeline != timeline:
            v.add("projection_timeline", (len(history.pg_timeline - timeline), len(timeline - history.pg_timeline)),
                  (DIVERGENT, "timeline"))
            for row in history.pg_timeline ^ timeline:
                v.counted(DIVERGENT, row[0])
    if history.es_docs is not None:
        for cid, state in folded.items():
            doc = history.es_docs.get(cid)
            if doc != document(state):
                fields = sorted(f for f in document(state) if (doc or {}).get(f) != document(state)[f])
                v.add("projection_es", (cid, doc and doc.get("version"), state["version"], fields[:5]),
                      (DIVERGENT, cid))
    for live, rebuilt, what in ((history.pg_states, history.replay_pg_states, "replay_pg"),
                                (history.es_docs, history.replay_es_docs, "replay_es"),
                                (history.pg_timeline, history.replay_pg_timeline, "replay_timeline")):
        if live is not None and rebuilt is not None and live != rebuilt:
            if isinstance(live, dict):
                cases = sorted(c for c in set(live) | set(rebuilt) if live.get(c) != rebuilt.get(c))
                a, b = live.get(cases[0]) or {}, rebuilt.get(cases[0]) or {}
                fields = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
                v.add(what, (len(cases), cases[0], {f: (a.get(f), b.get(f)) for f in fields[:5]}), (DIVERGENT, cases[0]))
                for cid in cases:
                    v.counted(DIVERGENT, cid)
            else:
                v.add(what, sorted(live ^ rebuilt)[:10], (DIVERGENT, "timeline"))
                for row in live ^ rebuilt:
                    v.counted(DIVERGENT, row[0])
    if history.pg_rows is not None and history.replay_pg_rows is not None:
        for table in sorted(set(history.pg_rows) | set(history.replay_pg_rows)):
            live, rebuilt = history.pg_rows.get(table, {}), history.replay_pg_rows.get(table, {})
            for key in sorted(k for k in set(live) | set(rebuilt) if live.get(k) != rebuilt.get(k)):
                row = live.get(key) or rebuilt[key]
                v.add("replay_rows", (table, key), (DIVERGENT, row["case_id"]))
    return v


def _dead_letter_idents(d: dict) -> tuple[tuple, tuple]:
    """What a dead letter is known by: (reason, event id), and (reason, None, original)."""
    return (d.get("reason"), d.get("event_id")), (d.get("reason"), None, d.get("original"))


def _wanted_dead_letters(expected: list[dict]) -> set[tuple]:
    """The model's dead letters, each by its event id, or by its original where it knows no id."""
    return {_dead_letter_idents(d)[0 if d.get("event_id") else 1] for d in expected}


def missing_dead_letters(expected: list[dict], observed: list[dict]) -> list[tuple]:
    """The expected dead letters (``Model.dead_letters``) with no record among ``observed``."""
    seen = {i for d in observed for i in _dead_letter_idents(d)}
    return sorted(_wanted_dead_letters(expected) - seen, key=repr)


def _check_dead_letters(v: Verdict, expected: list[dict], observed: list[dict]) -> int:
    """Each expected dead letter written, none unexpected; repeats reported. The distinct
    dead letters observed."""
    for w in missing_dead_letters(expected, observed):
        v.add("dead_letter_lost", w, (LOST, ("dead letter",) + w))
    wanted = _wanted_dead_letters(expected)
    distinct = set()
    for d in observed:
        by_id, by_original = _dead_letter_idents(d)
        distinct.add(by_id if d.get("event_id") else by_original)
        if by_id not in wanted and by_original not in wanted:
            v.add("dead_letter_unexpected", (d.get("reason"), d.get("event_id"), (d.get("detail") or "")[:200]))
    v.stats.update(dead_letters=len(wanted), dead_letter_repeats=len(observed) - len(distinct))
    return len(distinct)
