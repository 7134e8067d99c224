"""The route stage, pure: where one raw intake record goes, and the dead-letter record.

``route_message`` parses and validates a ``T.intake`` record
(``streams.domain.intake``) and answers ("intake-routed", routing key,
envelope) or ("dlq", key, dead letter). The envelope (``intake``,
``source``, ``original``) is what the apply stage reads
(``streams.stage.apply``). ``dead_letter`` builds the ``T.dlq`` record of
every stage (``schemas/json/DeadLetter.avsc``); the sender stamps
``dead_lettered_at``.

Imports: see ``streams/stage/__init__.py`` (no Faust, no clients).
"""

from __future__ import annotations

import base64
import dataclasses

import orjson

from streams.config import MAX_RECORD_BYTES
from streams.domain.intake import (
    EVENT_ID_HEADER, UNKNOWN_CASE, Intake, Rejection, parse, record_event_id, routing_key,
)

DLQ = "dlq"
ROUTED = "intake-routed"

MAX_ORIGINAL = MAX_RECORD_BYTES - 64 * 1024   # a dead letter's original, encoded; the rest is its other fields


def dead_letter(rejection: Rejection, topic: str, partition: int, offset: int, raw: bytes | None,
                event_id: str | None = None) -> dict:
    """The DLQ record: reason, detail, where it came from, the original, and the
    intake message's identity (``event_id``: explicit or its record's; a replay keeps it)."""
    record = {
        "reason": rejection.reason,
        "detail": rejection.detail,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "original": None,
        "original_encoding": "utf-8",
        "dead_lettered_at": None,
    }
    if event_id is not None:
        record["event_id"] = event_id
    if raw is not None:
        record["original"], record["original_encoding"] = kept_original(raw)
        if record["original"] is None:
            record["detail"] += f" (the original, {len(raw)} bytes, is too large to keep)"
    return record


def kept_original(raw: bytes) -> tuple[str | None, str]:
    """``(original, original_encoding)`` of a dead letter: the text when it is UTF-8 and JSON does not
    escape it to more than base64 takes (a control character escapes to six bytes), else base64; no
    original when even the shorter would not fit in a record the worker can write (MAX_RECORD_BYTES)."""
    b64_size = 4 * ((len(raw) + 2) // 3)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    text_size = len(orjson.dumps(text)) - 2 if text is not None else b64_size + 1
    if min(text_size, b64_size) > MAX_ORIGINAL:
        return None, "utf-8"
    if text_size <= b64_size:
        return text, "utf-8"
    return base64.b64encode(raw).decode(), "base64"


def header_value(headers, name: str) -> bytes | None:
    """A Kafka header's value (Faust gives headers as a list of pairs or a mapping)."""
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if k == name:
            return v
    return None


def header_identity(headers) -> str | None:
    """The identity an ``EVENT_ID_HEADER`` gives a record (a dlq replay), if any."""
    given = header_value(headers, EVENT_ID_HEADER)
    if given:
        try:
            return given.decode("utf-8") or None
        except UnicodeDecodeError:
            pass
    return None


def record_identity(topic: str, partition: int, offset: int, headers=None) -> str:
    """The identity of an intake record: the one its ``EVENT_ID_HEADER`` names
    (a replay; it wins over the message's own ``event_id``), else, for a message
    without ``event_id``, its own coordinates."""
    return header_identity(headers) or record_event_id(topic, partition, offset)


def route_message(tenant, topic: str, partition: int, offset: int, timestamp_ms: int,
                  key: bytes | None, raw: bytes | None, headers=None) -> tuple[str, bytes | None, dict]:
    """Where one intake record goes: ("routed", routing key, envelope) or ("dlq", key, dead letter)."""
    record_id = record_identity(topic, partition, offset, headers)
    result = parse(raw, tenant, timestamp_ms, record_id)
    if isinstance(result, Intake) and header_identity(headers) and result.event_id != record_id:
        result = dataclasses.replace(result, event_id=record_id)  # a replay: a new attempt of its own
    if isinstance(result, Rejection):
        return DLQ, key, dead_letter(result, topic, partition, offset, raw, record_id)
    rkey = routing_key(result, tenant)
    if rkey is None:
        rej = Rejection(UNKNOWN_CASE, f"case id {result.case_id!r} is not a {tenant.name} case id")
        return DLQ, key, dead_letter(rej, topic, partition, offset, raw, result.event_id)
    envelope = {
        "intake": result.to_dict(),
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "original": raw.decode("utf-8"),  # parsed as JSON, so valid UTF-8
    }
    return ROUTED, rkey.encode(), envelope
