"""A property test of ``decide``/``apply`` (the apply stage over dicts, ``streams.stage.memory``) against a
deliberately simple model of PagerDuty's rules, over random histories of triggers, acknowledges,
resolves, commands, re-sends and redeliveries (hypothesis, stateful).

The model, per dedup key: at most one open incident, its status and its occurrence count; the
incidents a key had. A trigger opens an incident when none is open, else counts an occurrence; an
acknowledge acknowledges a triggered incident (nothing on an acknowledged one) and is refused
without an open one; a resolve resolves the open one (refused without); a comment by case id lands
on that incident. Every record is an event, however identical its bytes (a re-send), except a
redelivery of the very same record (a crash before the commit), which changes nothing; a message
with an explicit ``event_id`` is one event however often it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from streams.domain import cases as domain
from streams.domain.intake import Intake, parse, record_event_id
from streams.stage.memory import MemoryStage

from helpers import ALICE, OC, T0

KEYS = ["db/lag", "api/5xx", "disk/full"]
TOPIC = "on-call.intake"


@dataclass
class Incident:
    case_id: str
    status: str = "TRIGGERED"
    occurrences: int = 1
    comments: int = 0


@dataclass
class KeyModel:
    incidents: list[Incident] = field(default_factory=list)

    @property
    def open(self) -> Incident | None:
        return self.incidents[-1] if self.incidents and self.incidents[-1].status != "RESOLVED" else None


class PagerDutyRules(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.sut = MemoryStage(OC)
        self.model = {k: KeyModel() for k in KEYS}
        self.offset = 0
        self.records: list[tuple[bytes, str, int]] = []   # (bytes, record id, offset): what was sent
        self.seen_explicit: set[str] = set()
        self.versions: dict[str, int] = {}                 # case id -> last version emitted
        self.states: dict[str, dict] = {}                  # case id -> state folded from its events

    # -- the system under test --------------------------------------------------------------------

    def _send(self, msg: dict) -> domain.Decision:
        raw = orjson.dumps(msg)
        self.offset += 1
        rid = record_event_id(TOPIC, 0, self.offset)
        self.records.append((raw, rid, self.offset))
        return self._apply(raw, rid, self.offset)

    def _apply(self, raw: bytes, rid: str, offset: int) -> domain.Decision:
        it = parse(raw, OC, T0 + offset, rid)
        assert isinstance(it, Intake), it
        d = self.sut.handle(it, offset)
        for e in d.events:
            assert e["version"] == self.versions.get(e["case_id"], 0) + 1, ("versions gapless from 1", e)
            self.versions[e["case_id"]] = e["version"]
            self.states[e["case_id"]] = domain.apply(OC, self.states.get(e["case_id"]), e)
        return d

    def _types(self, d: domain.Decision) -> list[str]:
        return [e["type"] for e in d.events]

    # -- rules ------------------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS))
    def trigger(self, key):
        d = self._send({"action": "trigger", "dedup_key": key, "summary": f"{key} is bad"})
        m = self.model[key]
        if m.open is None:
            assert self._types(d) == ["CaseCreated"]
            m.incidents.append(Incident(d.events[0]["case_id"]))
        else:
            assert self._types(d) == ["AlertDeduplicated"] and d.events[0]["case_id"] == m.open.case_id
            m.open.occurrences += 1

    @rule(key=st.sampled_from(KEYS))
    def acknowledge(self, key):
        d = self._send({"action": "acknowledge", "dedup_key": key})
        m = self.model[key]
        if m.open is None:
            assert d.rejection is not None and d.rejection.reason == "no_open_case" and not d.events
        elif m.open.status == "TRIGGERED":
            assert self._types(d) == ["StatusChanged"] and d.events[0]["to_status"] == "ACKNOWLEDGED"
            m.open.status = "ACKNOWLEDGED"
        else:
            assert d.events == [] and d.rejection is None  # already acknowledged: success, nothing changes

    @rule(key=st.sampled_from(KEYS))
    def resolve(self, key):
        d = self._send({"action": "resolve", "dedup_key": key})
        m = self.model[key]
        if m.open is None:
            assert d.rejection is not None and d.rejection.reason == "no_open_case" and not d.events
        else:
            assert self._types(d) == ["StatusChanged"] and d.events[0]["to_status"] == "RESOLVED"
            m.open.status = "RESOLVED"

    @precondition(lambda self: any(m.incidents for m in self.model.values()))
    @rule(data=st.data())
    def comment_by_case_id(self, data):
        incident = data.draw(st.sampled_from([i for m in self.model.values() for i in m.incidents]))
        d = self._send({"command": "comment", "case_id": incident.case_id, "text": "looking", "actor": ALICE})
        assert self._types(d) == ["CommentAdded"] and d.events[0]["case_id"] == incident.case_id
        incident.comments += 1

    @precondition(lambda self: self.records)
    @rule(data=st.data())
    def redeliver(self, data):
        """Kafka redelivers a record already applied (a crash before the commit): no effect."""
        raw, rid, offset = data.draw(st.sampled_from(self.records))
        key = orjson.loads(raw).get("dedup_key")
        had_entry = key is None or key in self.sut.entries
        d = self._apply(raw, rid, offset)
        assert not d.events
        # remembered as seen; a rejection for a key that never had a case is not (no state is kept
        # for keys without cases): it is refused again the same way
        assert d.duplicate if had_entry else (d.rejection is not None and d.rejection.reason == "no_open_case")

    @precondition(lambda self: self.records)
    @rule(data=st.data())
    def resend_same_bytes(self, data):
        """A monitor sends the very same bytes again: a new record, a new event (the rules above)."""
        raw, _rid, _offset = data.draw(st.sampled_from(self.records))
        msg = orjson.loads(raw)
        rule_of = {"trigger": self.trigger, "acknowledge": self.acknowledge, "resolve": self.resolve}
        if "action" in msg:
            rule_of[msg["action"]](msg["dedup_key"])
        else:
            incident = next(i for m in self.model.values() for i in m.incidents if i.case_id == msg["case_id"])
            d = self._send(msg)
            assert self._types(d) == ["CommentAdded"]
            incident.comments += 1

    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 3))
    def explicit_event_id_sent_n_times(self, key, n):
        """A trigger with its own ``event_id`` is one event however often it is sent."""
        event_id = f"mon-{self.offset}"
        before = self.model[key].open
        first = self._send({"action": "trigger", "dedup_key": key, "summary": "s", "event_id": event_id})
        for _ in range(n - 1):
            again = self._send({"action": "trigger", "dedup_key": key, "summary": "s", "event_id": event_id})
            assert again.duplicate and not again.events
        m = self.model[key]
        if before is None:
            assert self._types(first) == ["CaseCreated"]
            m.incidents.append(Incident(first.events[0]["case_id"]))
        else:
            assert self._types(first) == ["AlertDeduplicated"]
            before.occurrences += 1

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def projections_equal_the_model(self):
        for key, m in self.model.items():
            assert [i.case_id for i in m.incidents] == \
                [cid for cid in self.states if self.sut.index.get(cid) == key], key
            for i in m.incidents:
                state = self.states[i.case_id]
                assert state["status"] == i.status, (i, state["status"])
                assert state["occurrence_count"] == i.occurrences, (i, state)
                assert state["comment_count"] == i.comments, (i, state)
            assert sum(1 for i in m.incidents if i.status != "RESOLVED") <= 1


TestPagerDutyRules = PagerDutyRules.TestCase
TestPagerDutyRules.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
