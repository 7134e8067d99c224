"""The apply stage (streams/stage/apply.py, outputs.py, memory.py): what the apply agent runs, without Faust."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

import schemas
from helpers import OC, T0, intake
from streams.domain import cases as domain
from streams.domain import oncall as paging
from streams.domain.cases import RECENT_LIMIT, is_redelivery, new_entry, recorded_outputs, remember
from streams.oncall_config import load_oncall
from streams.stage import outputs as out_mod
from streams.stage.apply import ApplyBatch, Table, UnflushedOutputs, Write
from streams.stage.memory import MemoryStage
from streams.stage.outputs import OutputKind, from_recorded, messages, recorded
from streams.stage.route import route_message

CFG = """\
users:
  u-ann: {name: Ann, email: ann@example.com, contact: {webhook: "https://hooks.example.com/ann"}}
escalation_policies:
  p: {steps: [{escalate_after_seconds: 300, targets: [{user: u-ann}]},
              {escalate_after_seconds: 300, targets: [{user: u-ann}]}]}
routing_rules:
  - {id: pages, match: {source: pager}, escalation_policy: p}
endpoints:
  ops: {type: webhook, url: "https://hooks.example.com/ops"}
notification_rules:
  - {id: critical, match: {severity: critical}, endpoints: [ops]}
subscriptions:
  - {id: crit, format: avro, match: {severity: critical}}
  - {id: all, format: json}
"""

PAGE = {"action": "trigger", "dedup_key": "k", "summary": "s", "severity": "critical", "source": "pager"}
WALL = 1_800_000_000_000


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "on-call.yaml"
    p.write_text(CFG)
    return load_oncall(OC, p)


def envelope(msg: dict, offset: int = 1) -> dict:
    """A routed record, as the route stage writes it."""
    kind, _key, env = route_message(OC, "on-call.intake", 0, offset, T0, None, orjson.dumps(msg))
    assert kind == "intake-routed"
    return env


class Tables:
    """The apply agent's three tables as dicts, applied from writes as the agent applies them."""

    def __init__(self):
        self.keys: dict[str, bytes] = {}
        self.case_keys: dict[str, bytes] = {}
        self.timers: dict[str, bytes] = {}

    def batch(self, cfg, relay_ready=None) -> ApplyBatch:
        return ApplyBatch(OC, cfg, get_entry=lambda k: orjson.loads(self.keys[k]) if k in self.keys else None,
                          get_dedup_key=lambda c: self.case_keys[c].decode() if c in self.case_keys else None,
                          has_timer=lambda t: t in self.timers, relay_ready=relay_ready, wall_ms=lambda: WALL)

    def write(self, writes: list[Write]) -> None:
        tables = {Table.KEYS: self.keys, Table.CASE_KEYS: self.case_keys, Table.TIMERS: self.timers}
        for w in writes:
            if w.value is None:
                del tables[w.table][w.key]
            else:
                tables[w.table][w.key] = w.value


def wire(step) -> list[tuple]:
    return [(m.output.kind, m.output.key, m.key, m.value, m.headers) for m in step.records]


def test_a_page_produces_domain_events_relay_copies_and_delivery_requests(cfg):
    t = Tables()
    batch = t.batch(cfg)
    step = batch.apply_routed(envelope(PAGE), 7, "ctx")
    kinds = [o.kind for o in step.outputs]
    n = len(step.decision.events)
    assert kinds[:n] == [OutputKind.DOMAIN] * n and step.events == step.decision.events
    assert OutputKind.RELAY in kinds and OutputKind.NOTIFY in kinds and OutputKind.DEAD_LETTER not in kinds
    domain_outputs = step.outputs[:n]
    for o in step.outputs[n:]:
        # a copy names the very output whose event it carries, an earlier one of the same input
        assert o.copies is not None and any(o.copies is d for d in domain_outputs)
        assert o.event is o.copies.value
    ann = next(o for o in step.outputs if o.kind is OutputKind.NOTIFY and o.value["endpoint"] == "user:u-ann:webhook")
    assert ann.event["type"] == "NotificationRequested" and ann.value["case_id"] == ann.event["case_id"]
    assert "event_index" not in ann.value and "ref" not in ann.value
    # records: one per output, in order; a delivery request carries its event (and, as always, "ref")
    assert [m.output for m in step.records] == step.outputs
    note = orjson.loads(next(m.value for m in step.records if m.output is ann))
    assert note["event"] == ann.event and note["ref"] == step.outputs.index(ann.copies)
    relay = next(m for m in step.records if m.output.kind is OutputKind.RELAY and m.output.key == "crit")
    assert relay.key == relay.output.event["case_id"].encode()
    assert relay.value == schemas.encode(relay.output.event)
    assert dict(relay.headers)["schema_id"] == str(schemas.schema_id(relay.value)).encode()


def test_relay_copies_only_for_subscriptions_whose_topic_exists(cfg):
    step = Tables().batch(cfg, relay_ready={"all"}).apply_routed(envelope(PAGE), 1)
    assert {o.key for o in step.outputs if o.kind is OutputKind.RELAY} == {"all"}
    step = Tables().batch(cfg, relay_ready=set()).apply_routed(envelope(PAGE), 1)
    assert not [o for o in step.outputs if o.kind is OutputKind.RELAY]


def test_the_stored_form_is_positional_rows_and_reads_back(cfg):
    step = Tables().batch(cfg).apply_routed(envelope(PAGE), 1)
    rows = recorded(step.outputs)
    for (kind, key, value), o in zip(rows, step.outputs):
        assert (kind, key) == (o.kind.value, o.key)
        if o.copies is not None:
            assert rows[value["ref"]][2] is o.copies.value and list(value)[-1] == "ref"
    back = from_recorded(orjson.loads(orjson.dumps(rows)))
    assert [(o.kind, o.key, o.value) for o in back] == [(o.kind, o.key, o.value) for o in step.outputs]
    assert [back.index(o.copies) if o.copies else None for o in back] == \
        [step.outputs.index(o.copies) if o.copies else None for o in step.outputs]
    assert [(m.key, m.value, m.headers) for m in messages(back, WALL)] == \
        [(m.key, m.value, m.headers) for m in messages(step.outputs, WALL)]


def former_send_outputs(outputs: list, wall_ms: int) -> list[tuple]:
    """What agents/intake.py sent for a list of stored rows before streams.stage existed (its
    ``send_outputs``, with the topics' send_soon replaced by a list): the bytes must not change."""
    sent, encoded = [], {}
    for i, (kind, key, value) in enumerate(outputs):
        if kind == "domain-events":
            encoded[i] = schemas.encode(value)
            sent.append((key.encode(), encoded[i], out_mod.event_headers(value)))
        elif kind == "notify":
            sent.append((key.encode(), orjson.dumps(dict(value, event=outputs[value["ref"]][2])), None))
        elif kind == "relay":
            event = outputs[value["ref"]][2]
            if value["format"] == "avro":
                body = encoded.get(value["ref"]) or schemas.encode(event)
                headers = out_mod.event_headers(event) + [("schema_id", str(schemas.schema_id(body)).encode())]
            else:
                body, headers = orjson.dumps(event), out_mod.event_headers(event)
            sent.append((event["case_id"].encode(), body, headers))
        else:
            sent.append((key.encode() if key else None, orjson.dumps(dict(value, dead_lettered_at=wall_ms)), None))
    return sent


def test_records_are_the_bytes_the_agent_always_sent(cfg):
    t = Tables()
    batch = t.batch(cfg)
    steps = [batch.apply_routed(envelope(PAGE, 1), 1),
             batch.apply_routed(envelope({"action": "acknowledge", "dedup_key": "nope"}, 2), 2)]  # a dead letter
    for step in steps:
        rows = orjson.loads(orjson.dumps(recorded(step.outputs)))   # as stored, then read back
        assert [(m.key, m.value, m.headers) for m in step.records] == former_send_outputs(rows, WALL)


def test_an_entry_written_before_the_stage_redelivers_unchanged(cfg):
    """Hand-written rows in the form the former agent stored: re-sent byte for byte."""
    t = Tables()
    first = t.batch(cfg).apply_routed(envelope(PAGE), 5)
    event = first.events[0]
    old_rows = [["domain-events", event["case_id"], event],
                ["relay", "all", {"format": "json", "ref": 0}],
                ["notify", "d-1", {"kind": "request", "delivery_id": "d-1", "endpoint": "ops", "ref": 0}],
                ["dlq", None, {"reason": "no_open_case", "detail": "x", "dead_lettered_at": None}]]
    entry = dict(new_entry("old"), seen=["old-id"], recent=[["old-id", old_rows, 3]])
    t.keys["old"] = orjson.dumps(entry)
    msg = {"action": "trigger", "dedup_key": "old", "summary": "s", "event_id": "old-id"}
    step = t.batch(cfg).apply_routed(envelope(msg, 3), 3)
    assert step.redelivered and step.duplicate
    assert [(m.key, m.value, m.headers) for m in step.records] == former_send_outputs(old_rows, WALL)
    assert step.outputs[1].copies is step.outputs[0] and step.outputs[2].copies is step.outputs[0]


def test_redelivery_of_the_same_record_resends_identical_outputs(cfg):
    t = Tables()
    batch = t.batch(cfg)
    first = batch.apply_routed(envelope(PAGE), 11, "ev-11")
    t.write(batch.writes())
    stored = dict(t.keys), dict(t.case_keys), dict(t.timers)
    # a crash before the commit: Kafka hands the same record (same offset) again
    batch = t.batch(cfg)
    again = batch.apply_routed(envelope(PAGE), 11, "ev-11b")
    assert again.redelivered and again.duplicate and again.decision.events == []
    assert wire(again) == wire(first)
    assert [o.kind for o in again.outputs] == [o.kind for o in first.outputs]
    for o in again.outputs:
        if o.copies is not None:
            assert again.outputs.index(o.copies) < again.outputs.index(o)
    # ... and its entry, timers index and case index are written again, in that record's context
    writes = batch.writes()
    assert {w.table for w in writes} == {Table.KEYS, Table.TIMERS, Table.CASE_KEYS}
    assert all(w.context == "ev-11b" for w in writes)
    t.write(writes)
    assert (t.keys, t.case_keys, t.timers) == stored


def test_a_second_send_has_no_effect(cfg):
    t = Tables()
    batch = t.batch(cfg)
    batch.apply_routed(envelope(dict(PAGE, event_id="same")), 1)
    t.write(batch.writes())
    before = dict(t.keys)
    batch = t.batch(cfg)
    step = batch.apply_routed(envelope(dict(PAGE, event_id="same"), 2), 2)   # another record, same id
    assert step.duplicate and not step.redelivered and step.outputs == [] and step.records == []
    assert batch.writes() == [] and batch.unflushed() == ({}, {})
    assert t.keys == before


def test_a_batch_reads_each_entry_once_and_writes_it_once(cfg):
    t = Tables()
    reads = []
    batch = t.batch(cfg)
    get = batch.get_entry
    batch.get_entry = lambda k: reads.append(k) or get(k)
    created = batch.apply_routed(envelope(PAGE, 1), 1, "e1")
    cid = created.decision.created[0]
    # a command naming the new case finds it within the batch (the case index is written at its end)
    comment = {"command": "comment", "case_id": cid, "text": "t", "actor": {"id": "u-ann"}}
    assert [e["type"] for e in batch.apply_routed(envelope(comment, 2), 2, "e2").events] == ["CommentAdded"]
    batch.apply_routed(envelope(dict(PAGE, summary="again"), 3), 3, "e3")
    assert reads == ["k"]
    writes = batch.writes()
    keys = [w for w in writes if w.table is Table.KEYS]
    assert [(w.key, w.context) for w in keys] == [("k", "e3")]
    assert keys[0].value.startswith(b'{"applied":3,')
    assert [(w.key, w.data, w.context) for w in writes if w.table is Table.CASE_KEYS] == [(cid, "k", "e1")]
    assert batch.unflushed() == ({"k": 3}, {"k": 3})


def test_an_input_that_raises_leaves_the_batch_as_it_was(cfg, monkeypatch):
    t = Tables()
    batch = t.batch(cfg)

    def broken(record):
        raise ValueError("cannot encode")

    monkeypatch.setattr(schemas, "encode", broken)
    with pytest.raises(ValueError):
        batch.apply_routed(envelope(PAGE), 1)
    assert batch.writes() == [] and batch.dirty == {} and batch.new_index == {}
    monkeypatch.undo()
    assert batch.apply_routed(envelope(PAGE), 1).events  # a replay after the fix applies it


def test_a_timer_fires_only_while_the_entry_holds_it(cfg):
    t = Tables()
    batch = t.batch(cfg)
    batch.apply_routed(envelope(PAGE), 1)
    t.write(batch.writes())
    (timer_id, raw), = t.timers.items()
    timer = orjson.loads(raw)
    assert timer["kind"] == "escalation"
    batch = t.batch(cfg)
    fired = batch.fire(timer, 20, "t20")
    assert [e["type"] for e in fired.events][:1] == ["EscalationStepStarted"]
    t.write(batch.writes())
    assert timer_id not in t.timers                      # fired: out of the index; the next step's is in
    assert t.timers and all(orjson.loads(v)["timer_id"] != timer_id for v in t.timers.values())
    entry = orjson.loads(t.keys["k"])
    assert is_redelivery(entry, paging.timer_intake(OC, timer).event_id, "timers:20")
    # sent again by the scheduler (another record): no effect
    batch = t.batch(cfg)
    again = batch.fire(timer, 21, "t21")
    assert again.duplicate and again.outputs == [] and batch.writes() == []
    # the same record again (a crash before the commit): its outputs again
    batch = t.batch(cfg)
    assert wire(batch.fire(timer, 20, "t20b")) == wire(fired)
    # a timer the entry no longer holds (replaced, cancelled) does nothing, and leaves the index
    stale = dict(timer, timer_id="gone", due_at=timer["due_at"] + 1)
    t.timers["gone"] = orjson.dumps(stale)
    batch = t.batch(cfg)
    step = batch.fire(stale, 22, "t22")
    assert step.decision.noop and step.outputs == []
    assert [(w.table, w.key, w.value, w.context) for w in batch.writes()] == [(Table.TIMERS, "gone", None, "t22")]


def test_a_delivery_outcome_records_once_on_its_case(cfg):
    t = Tables()
    batch = t.batch(cfg)
    page = batch.apply_routed(envelope(PAGE), 1)
    t.write(batch.writes())
    req = next(o.value for o in page.outputs if o.kind is OutputKind.NOTIFY)
    outcome = {"kind": "delivery", "outcome": "delivered", "delivery_id": req["delivery_id"],
               "case_id": req["case_id"], "dedup_key": "k", "endpoint": req["endpoint"], "channel": req["channel"],
               "attempts": 1, "status_code": 200, "at": T0 + 1000}
    batch = t.batch(cfg)
    step = batch.fire(outcome, 30)
    assert [e["type"] for e in step.events] == ["NotificationDelivered"]
    assert not [o for o in step.outputs if o.kind is OutputKind.NOTIFY]   # outcomes are never notified
    t.write(batch.writes())
    assert t.batch(cfg).fire(outcome, 31).outputs == []
    unknown = dict(outcome, case_id="PG-nope-1", delivery_id="d-x")
    batch = t.batch(cfg)
    assert batch.fire(unknown, 32).outputs == [] and batch.writes() == []


def test_the_flush_before_write_rule(cfg):
    """A batch whose writes would make a key forget outputs not known to be sent: flush first."""
    t = Tables()
    u = UnflushedOutputs(RECENT_LIMIT)
    batch = t.batch(cfg)
    for i in range(RECENT_LIMIT):
        batch.apply_routed(envelope(dict(PAGE, summary=f"s{i}"), i), i)
    applied, kept = batch.unflushed()
    assert applied == {"k": RECENT_LIMIT} and kept == {"k": RECENT_LIMIT}
    assert not u.add(applied, kept)       # every output still re-sendable from the state
    t.write(batch.writes())
    batch = t.batch(cfg)
    batch.apply_routed(envelope(dict(PAGE, summary="one more"), 100), 100)
    assert u.add(*batch.unflushed())     # the oldest unsent outputs would leave the state
    u.clear()
    assert not u.add(*batch.unflushed())


def test_memory_stage_keeps_the_timers_index_in_step(cfg):
    mem = MemoryStage(OC, cfg)
    mem.handle(intake(OC, dict(PAGE, event_id="1")), 1)
    mem.handle(intake(OC, dict(PAGE, dedup_key="k2", event_id="2")), 2)
    assert sorted(mem.timers) == sorted(t["timer_id"] for t in mem.pending())
    assert mem.last.records and {o.kind for o in mem.last.outputs} >= {OutputKind.DOMAIN, OutputKind.NOTIFY}
    mem.advance(T0 + 3_600_000)
    assert sorted(mem.timers) == sorted(t["timer_id"] for t in mem.pending())
    mem.handle(intake(OC, {"action": "resolve", "dedup_key": "k", "event_id": "3"}), 3)
    assert sorted(mem.timers) == sorted(t["timer_id"] for t in mem.pending())
    # a redelivery through the memory stage re-sends what the record produced
    first = mem.apply(intake(OC, dict(PAGE, dedup_key="k3", event_id="4")), 4)
    again = mem.apply(intake(OC, dict(PAGE, dedup_key="k3", event_id="4")), 4)
    assert again.redelivered and wire(again) == wire(first)


def test_recorded_outputs_round_trip_through_remember(cfg):
    step = Tables().batch(cfg).apply_routed(envelope(PAGE), 1)
    entry = remember(new_entry("k"), "x", recorded(step.outputs), 1)
    rows = recorded_outputs(orjson.loads(orjson.dumps(entry)), "x")
    assert [(m.key, m.value, m.headers) for m in messages(from_recorded(rows), WALL)] == \
        [(m.key, m.value, m.headers) for m in step.records]
    assert domain.recorded_outputs(entry, "y") is None


def test_the_stage_imports_no_client_library():
    """streams/stage is pure: no Faust, Kafka, database, search or HTTP client, no metrics, no agents."""
    import subprocess
    import sys

    code = ("import sys, streams.stage.apply, streams.stage.memory, streams.stage.deliver, streams.stage.route; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faust', 'aiokafka', 'asyncpg', "
            "'elasticsearch', 'aiohttp', 'prometheus_client', 'agents') or m in ('streams.metrics', 'streams.app', "
            "'streams.outbound')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "[]"
