"""Intake messages: parse, validate and normalize. Pure: no I/O, no clock.

An intake message is JSON (modelled on PagerDuty Events API v2): an *alert
event* (``action``: trigger | acknowledge | resolve) or a *case command*
(``command``: set_status | assign | comment | set_priority). ``parse`` turns
raw bytes into a normalized :class:`Intake` or a :class:`Rejection` with one
of the DLQ reasons. The result is a deterministic function of the bytes and
the Kafka record timestamp, so a redelivered message normalizes identically
(same derived ``event_id``, same generated ``dedup_key``, same timestamp).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from streams.config import Tenant

MAX_MESSAGE_BYTES = 512 * 1024
MAX_DEPTH = 64
MAX_DEDUP_KEY = 255
MAX_SUMMARY = 1024
MAX_SHORT = 255
MAX_COMMENT = 16 * 1024
MAX_TAGS = 64

ACTIONS = ("trigger", "acknowledge", "resolve")
COMMANDS = ("set_status", "assign", "comment", "set_priority")
SEVERITIES = ("critical", "error", "warning", "info")
PRIORITIES = ("P1", "P2", "P3", "P4", "P5")
URGENCIES = ("high", "low")

# DLQ reasons (the full set; the stateful stage adds the last three)
INVALID_JSON = "invalid_json"
INVALID_EVENT = "invalid_event"
TOO_LARGE = "too_large"
NO_OPEN_CASE = "no_open_case"
INVALID_TRANSITION = "invalid_transition"
UNKNOWN_CASE = "unknown_case"
# a message (or due timer) whose processing raised: a bug, not bad input; the
# partition keeps flowing and the record can be replayed after a fix
PROCESSING_ERROR = "processing_error"
# the gateway refused events over a rate limit (the request was answered 429)
RATE_LIMITED = "rate_limited"
# a notification failed for good (permanent error, or retries exhausted); replay retries it
NOTIFICATION_FAILED = "notification_failed"
# a projection refused a domain event for good (the search index rejected its case's document); the
# event stays in T.domain-events: fix the cause, then rebuild the projection (casestream reindex)
PROJECTION_REJECTED = "projection_rejected"
REASONS = (INVALID_JSON, INVALID_EVENT, TOO_LARGE, NO_OPEN_CASE, INVALID_TRANSITION, UNKNOWN_CASE, PROCESSING_ERROR,
           RATE_LIMITED, NOTIFICATION_FAILED, PROJECTION_REJECTED)


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


@dataclass(frozen=True)
class Intake:
    """A validated, normalized intake message."""

    kind: str              # "alert" or "command"
    event_id: str
    op: str                # the action or the command
    dedup_key: str | None  # always set for alerts
    case_id: str | None    # commands may name a case directly
    timestamp: int         # epoch milliseconds
    actor: dict | None
    fields: dict           # the remaining normalized fields
    # when casestream received it (the intake record's Kafka timestamp, ms):
    # escalation and acknowledgement timers count from here, not from the
    # monitor's own (possibly skewed or old) event time
    received_at: int | None = None

    @property
    def now(self) -> int:
        """Processing time of this message (ms): its receipt, else its event time."""
        return self.received_at if self.received_at is not None else self.timestamp

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "event_id": self.event_id, "op": self.op,
            "dedup_key": self.dedup_key, "case_id": self.case_id,
            "timestamp": self.timestamp, "actor": self.actor, "fields": self.fields,
            "received_at": self.received_at,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Intake":
        return cls(d["kind"], d["event_id"], d["op"], d["dedup_key"], d["case_id"],
                   d["timestamp"], d["actor"], d["fields"], d.get("received_at"))


class _Invalid(Exception):
    pass


def derive_id(*parts: str | bytes) -> str:
    """A deterministic UUID (RFC 4122 layout, version 5 bits) from the parts."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return str(uuid.UUID(bytes=h.digest()[:16], version=5))


def _depth_ok(value: Any, limit: int) -> bool:
    """True when objects/arrays nest at most ``limit`` deep (scalars add no depth)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if d > limit:
            return False
        stack.extend((x, d + 1) for x in children if isinstance(x, (dict, list)))
    return True


# a JSON string (skipped whole: brackets inside it add no depth) or one bracket
_JSON_TOKEN_RE = re.compile(rb'"(?:[^"\\]+|\\.)*"?|[\[\]{}]', re.DOTALL)
_OPENING = frozenset(b"[{")


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when the text ``raw`` opens more than ``limit`` objects/arrays at once.

    Read from the bytes (strings skipped), not from the parser's error: the
    parser's own limit and its wording are not ours (orjson said "recursion
    limit", now says "depth limit exceeded"). Meant for text the parser
    refused; unbalanced text counts what it opens."""
    depth = 0
    for m in _JSON_TOKEN_RE.finditer(raw):
        c = m.group()[0]
        if c in _OPENING:
            depth += 1
            if depth > limit:
                return True
        elif c != 0x22:  # a closing bracket
            depth -= 1
    return False


def decode_json(raw: bytes, limit: int = MAX_DEPTH) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, why)`` for text that is not JSON or nests deeper than ``limit``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if too_deep(raw, limit):
            return None, f"JSON nested deeper than {limit} levels"
        return None, f"not valid JSON: {exc}"
    if not _depth_ok(value, limit):
        return None, f"JSON nested deeper than {limit} levels"
    return value, None


def _opt_str(msg: dict, key: str, limit: int = MAX_SHORT, *, required: bool = False) -> str | None:
    v = msg.get(key)
    if v is None:
        if required:
            raise _Invalid(f"'{key}' is required")
        return None
    if not isinstance(v, str):
        raise _Invalid(f"'{key}' must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise _Invalid(f"'{key}' must not be empty")
    if len(v) > limit:
        raise _Invalid(f"'{key}' is {len(v)} characters; the limit is {limit}")
    return v


def _enum(msg: dict, key: str, allowed: tuple[str, ...], *, required: bool = False) -> str | None:
    v = msg.get(key)
    if v is None:
        if required:
            raise _Invalid(f"'{key}' is required; one of {', '.join(allowed)}")
        return None
    if v not in allowed:
        raise _Invalid(f"'{key}' must be one of {', '.join(allowed)}, got {v!r}")
    return v


def _timestamp(msg: dict, default_ms: int) -> int:
    v = msg.get("timestamp")
    if v is None:
        return default_ms
    if not isinstance(v, str):
        raise _Invalid("'timestamp' must be an RFC 3339 string, e.g. 2026-11-24T10:00:00Z")
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise _Invalid(f"'timestamp' is not RFC 3339: {v!r}") from None
    if dt.tzinfo is None:
        raise _Invalid(f"'timestamp' needs a time zone offset (Z or +hh:mm): {v!r}")
    return epoch_ms(dt)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def epoch_ms(dt: datetime) -> int:
    """Exact epoch milliseconds of an aware datetime (no float rounding)."""
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _person(v: Any, key: str) -> dict:
    if not isinstance(v, dict):
        raise _Invalid(f"'{key}' must be an object {{id, name, email}}")
    pid = v.get("id")
    if not isinstance(pid, str) or not pid.strip() or len(pid) > MAX_SHORT:
        raise _Invalid(f"'{key}.id' must be a non-empty string of at most {MAX_SHORT} characters")
    out = {"id": pid, "name": None, "email": None}
    for f in ("name", "email"):
        x = v.get(f)
        if x is not None and (not isinstance(x, str) or len(x) > MAX_SHORT):
            raise _Invalid(f"'{key}.{f}' must be a string of at most {MAX_SHORT} characters")
        out[f] = x
    return out


def _links(msg: dict) -> list[dict]:
    v = msg.get("links")
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Invalid("'links' must be a list of {href, text}")
    out = []
    for i, link in enumerate(v):
        if not isinstance(link, dict) or not isinstance(link.get("href"), str):
            raise _Invalid(f"'links[{i}]' must be an object with a string 'href'")
        text = link.get("text")
        if text is not None and not isinstance(text, str):
            raise _Invalid(f"'links[{i}].text' must be a string")
        out.append({"href": link["href"][:2048], "text": text})
    return out


def _bool(msg: dict, key: str) -> bool:
    v = msg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _Invalid(f"'{key}' must be true or false, got {type(v).__name__}")
    return v


def _tags(msg: dict) -> list[str]:
    v = msg.get("tags")
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise _Invalid("'tags' must be a list of strings")
    if len(v) > MAX_TAGS:
        raise _Invalid(f"'tags' has {len(v)} entries; the limit is {MAX_TAGS}")
    if any(len(t) > MAX_SHORT for t in v):
        raise _Invalid(f"a tag is longer than {MAX_SHORT} characters")
    return list(dict.fromkeys(v))  # de-duplicated, order kept


EVENT_ID_HEADER = "casestream-event-id"
"""A Kafka header naming the identity of an intake record without ``event_id``
(``casestream dlq replay`` sets it: a replayed record keeps the identity of the
record it replays, so replaying twice has no second effect)."""


RECORD_ID_PENDING = "<the record's>"
"""``parse(..., record_id=RECORD_ID_PENDING)`` before publishing: an id (and, for a
trigger without ``dedup_key``, a dedup key) that the record will define once Kafka
has placed it (``record_event_id``), shown by the gateway and ``casestream send``."""


def record_event_id(topic: str, partition: int, offset: int) -> str:
    """The identity of an intake record that carries no ``event_id``: the record
    itself. A redelivery (a crash before the commit) has the same coordinates and
    dedupes; a second send of the same bytes is a second record, a second event."""
    return derive_id("intake-record", topic, str(partition), str(offset))


def _event_id(msg: dict, raw: bytes, record_id: str | None) -> str:
    given = _opt_str(msg, "event_id")
    if given is not None:
        if not given.strip():
            raise _Invalid("'event_id' must not be empty")
        return given
    if record_id is not None:
        return record_id
    # not a Kafka record (validation before publishing, tools): a provisional id from
    # the bytes; the worker gives the record its own (record_event_id)
    return derive_id("intake", raw)


def _parse_alert(msg: dict, raw: bytes, tenant: Tenant, received_ms: int, record_id: str | None) -> Intake:
    action = _enum(msg, "action", ACTIONS, required=True)
    event_id = _event_id(msg, raw, record_id)
    dedup_key = _opt_str(msg, "dedup_key", MAX_DEDUP_KEY)
    if dedup_key is not None and not dedup_key.strip():
        raise _Invalid("'dedup_key' must not be empty")
    if dedup_key is None:
        if action != "trigger":
            raise _Invalid(f"'dedup_key' is required for {action}")
        dedup_key = event_id  # generated: a trigger without a key is its own alert
    summary = _opt_str(msg, "summary", MAX_SUMMARY, required=(action == "trigger"))
    details = msg.get("custom_details")
    if details is not None and not isinstance(details, dict):
        raise _Invalid("'custom_details' must be an object")
    urgency = _enum(msg, "urgency", URGENCIES)
    if urgency is None and action == "trigger" and tenant.work_type == "PAGE":
        urgency = "high"
    fields = {
        "summary": summary,
        "source": _opt_str(msg, "source"),
        "severity": _enum(msg, "severity", SEVERITIES),
        "component": _opt_str(msg, "component"),
        "group": _opt_str(msg, "group"),
        "class": _opt_str(msg, "class"),
        "custom_details": details or {},
        "links": _links(msg),
        "project": _opt_str(msg, "project"),
        "priority": _enum(msg, "priority", PRIORITIES),
        "tags": _tags(msg),
        "urgency": urgency,
        # on-call: an explicit policy wins over the routing rules; a shadow
        # page runs its policy but every notification is marked shadow
        "escalation_policy_id": _opt_str(msg, "escalation_policy_id"),
        "is_shadow": _bool(msg, "is_shadow"),
    }
    source = fields["source"]
    actor = {"id": "monitor", "name": source, "email": None}
    return Intake("alert", event_id, action, dedup_key, None, _timestamp(msg, received_ms), actor, fields,
                  received_ms)


def _parse_command(msg: dict, raw: bytes, tenant: Tenant, received_ms: int, record_id: str | None) -> Intake:
    command = _enum(msg, "command", COMMANDS, required=True)
    event_id = _event_id(msg, raw, record_id)
    case_id = _opt_str(msg, "case_id")
    dedup_key = _opt_str(msg, "dedup_key", MAX_DEDUP_KEY)
    for name, v in (("case_id", case_id), ("dedup_key", dedup_key)):
        if v is not None and not v.strip():
            raise _Invalid(f"'{name}' must not be empty")
    if case_id is None and dedup_key is None:
        raise _Invalid("a command needs 'case_id' or 'dedup_key'")
    if case_id is not None and dedup_key is not None:
        raise _Invalid("give 'case_id' or 'dedup_key', not both")
    if "actor" not in msg or msg["actor"] is None:
        raise _Invalid("'actor' is required for commands: {id, name, email}")
    actor = _person(msg["actor"], "actor")
    fields: dict[str, Any] = {}
    if command == "set_status":
        status = msg.get("status")
        if status not in tenant.statuses:
            raise _Invalid(f"'status' must be one of {', '.join(tenant.statuses)}, got {status!r}")
        fields["status"] = status
    elif command == "assign":
        if "assignee" not in msg:
            raise _Invalid("'assignee' is required for assign ({id, name, email}, or null to unassign)")
        fields["assignee"] = None if msg["assignee"] is None else _person(msg["assignee"], "assignee")
    elif command == "comment":
        fields["text"] = _opt_str(msg, "text", MAX_COMMENT, required=True)
    elif command == "set_priority":
        fields["priority"] = _enum(msg, "priority", PRIORITIES, required=True)
    return Intake("command", event_id, command, dedup_key, case_id, _timestamp(msg, received_ms), actor, fields,
                  received_ms)


def parse(raw: bytes | None, tenant: Tenant, received_ms: int, record_id: str | None = None) -> Intake | Rejection:
    """Validate and normalize one intake message.

    ``received_ms`` is the Kafka record timestamp; it is the default event time.
    ``record_id``: the identity of the record when the message has no
    ``event_id`` (``record_event_id`` of its coordinates, or its
    ``EVENT_ID_HEADER``); None outside the worker (a provisional id from the bytes).
    """
    if raw is None:
        return Rejection(INVALID_JSON, "empty message (null value)")
    if len(raw) > MAX_MESSAGE_BYTES:
        return Rejection(TOO_LARGE, f"message is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    msg, bad = decode_json(raw)
    if bad is not None:
        return Rejection(INVALID_JSON, bad)
    if not isinstance(msg, dict):
        return Rejection(INVALID_EVENT, f"message must be a JSON object, got {type(msg).__name__}")
    try:
        if "command" in msg and "action" in msg:
            raise _Invalid("a message is either an alert ('action') or a command ('command'), not both")
        if "command" in msg:
            return _parse_command(msg, raw, tenant, received_ms, record_id)
        if "action" in msg:
            return _parse_alert(msg, raw, tenant, received_ms, record_id)
        raise _Invalid("message needs 'action' (trigger | acknowledge | resolve) or 'command'")
    except _Invalid as exc:
        return Rejection(INVALID_EVENT, str(exc))


def routing_token(dedup_key: str) -> str:
    """The partition key of everything about one dedup key (and its cases)."""
    return hashlib.sha256(dedup_key.encode()).hexdigest()[:20]


def intake_partition_key(intake: Intake, tenant: Tenant) -> bytes | None:
    """The Kafka key of an intake message on ``T.intake`` (the gateway, ``casestream send``,
    dlq replay): its routing token, whether it names the dedup key or the case id, so a
    command naming the case id and an alert naming its dedup key share a partition and stay
    in order. None for a case id that cannot be the tenant's (it is dead-lettered anyway)."""
    if intake.dedup_key == RECORD_ID_PENDING:
        return None  # a trigger that is its own alert: any partition
    key = routing_key(intake, tenant)
    return key.encode() if key is not None else None


def assigned_dedup_key(intake: Intake, topic: str, partition: int, offset: int) -> str | None:
    """The dedup key of ``intake`` (parsed with ``RECORD_ID_PENDING``) once published at
    ``topic``/``partition``/``offset``: its own, or its record's id for a trigger without one."""
    if intake.dedup_key == RECORD_ID_PENDING:
        return record_event_id(topic, partition, offset)
    return intake.dedup_key


def routing_key(intake: Intake, tenant: Tenant) -> str | None:
    """Key for the routed topic; None when a case id cannot be ours."""
    if intake.dedup_key is not None:
        return routing_token(intake.dedup_key)
    return token_from_case_id(intake.case_id or "", tenant)


def make_case_id(tenant: Tenant, dedup_key: str, seq: int) -> str:
    return f"{tenant.case_id_prefix}-{routing_token(dedup_key)}-{seq}"


_CASE_ID_RE = re.compile(r"([A-Z]{1,8})-([0-9a-f]{20})-([1-9][0-9]{0,9})", re.ASCII)


def token_from_case_id(case_id: str, tenant: Tenant) -> str | None:
    m = _CASE_ID_RE.fullmatch(case_id)
    if m is None or m.group(1) != tenant.case_id_prefix:
        return None
    return m.group(2)
