"""The DLQ record shape: agents.intake.dead_letter against schemas/json/DeadLetter.avsc."""

from __future__ import annotations

import base64

import orjson
import pytest
from fastavro import parse_schema
from fastavro.validation import validate

from agents.intake import dead_letter, route_message
from streams.config import MAX_RECORD_BYTES, PROJECT_ROOT, get_tenant, load_topics
from streams.domain.intake import MAX_MESSAGE_BYTES, REASONS, Rejection

SCHEMA = parse_schema(orjson.loads((PROJECT_ROOT / "schemas/json/DeadLetter.avsc").read_bytes()))


@pytest.mark.parametrize("reason", REASONS)
def test_every_reason_makes_a_valid_dead_letter(reason):
    rec = dict(dead_letter(Rejection(reason, "why"), "on-call.intake", 3, 42, b'{"a": 1}'), dead_lettered_at=1)
    assert validate(rec, SCHEMA, raise_errors=True)
    assert rec["source"] == {"topic": "on-call.intake", "partition": 3, "offset": 42}
    assert rec["original"] == '{"a": 1}' and rec["original_encoding"] == "utf-8"


def test_bytes_that_are_not_utf8_are_kept_as_base64():
    rec = dead_letter(Rejection("invalid_json", "x"), "t", 0, 0, b"\xff\xfe")
    assert rec["original"] == "//4=" and rec["original_encoding"] == "base64"


def test_an_unknown_reason_is_not_a_valid_dead_letter():
    rec = dict(dead_letter(Rejection("oops", "x"), "t", 0, 0, b"{}"), dead_lettered_at=1)
    assert not validate(rec, SCHEMA, raise_errors=False)


def test_text_that_json_escapes_beyond_base64_is_kept_as_base64():
    """An original is kept in the shorter of its two forms: JSON text (a control character escapes to six
    bytes, a quote or backslash to two) or base64 (four bytes for three)."""
    for raw in (b'{"a": "' + b"\x01" * 1000 + b'"}', b'{"a": "' + b'\\"' * 1000 + b'"}'):
        rec = dead_letter(Rejection("invalid_json", "x"), "t", 0, 0, raw)
        assert rec["original_encoding"] == "base64" and base64.b64decode(rec["original"]) == raw
    raw = orjson.dumps({"action": "trigger", "dedup_key": "k", "summary": "a \"quoted\" word"})
    assert dead_letter(Rejection("invalid_event", "x"), "t", 0, 0, raw)["original"] == raw.decode()


def test_the_largest_records_the_worker_writes_fit_its_limit():
    """The worst intake-routed envelope (a message at the limit, all escapes) and the worst dead letter
    (a record as large as T.intake takes, all control characters) fit MAX_RECORD_BYTES, which the
    worker's producer and the topics it writes them to allow (topics.yaml)."""
    tenant = get_tenant("on-call")
    family = load_topics("on-call")
    limit = int(family.topics["intake"].config["max.message.bytes"])
    head = b'{"action": "trigger", "dedup_key": "k", "summary": "s", "custom_details": {"x": "'
    msg = head + b'\\"' * ((MAX_MESSAGE_BYTES - len(head) - 3) // 2) + b'"}}'
    assert len(msg) <= MAX_MESSAGE_BYTES
    kind, _key, envelope = route_message(tenant, "on-call.intake", 0, 1, 0, None, msg)
    assert kind == "intake-routed" and len(orjson.dumps(envelope)) <= MAX_RECORD_BYTES
    for raw in (b"\x01" * limit, b'"' * limit, b"\xff" * limit):
        kind, _key, record = route_message(tenant, "on-call.intake", 0, 1, 0, None, raw)
        assert kind == "dlq" and record["original"] is not None
        assert len(orjson.dumps(dict(record, dead_lettered_at=1))) <= MAX_RECORD_BYTES
    for role in ("intake-routed", "dlq"):
        assert int(family.topics[role].config["max.message.bytes"]) == MAX_RECORD_BYTES
    assert all(int(family.changelog(t).config["max.message.bytes"]) == MAX_RECORD_BYTES for t in family.tables)


def test_an_original_too_large_for_any_record_is_not_kept():
    raw = b"x" * MAX_RECORD_BYTES
    rec = dict(dead_letter(Rejection("too_large", "message is big"), "t", 0, 0, raw), dead_lettered_at=1)
    assert rec["original"] is None and f"the original, {len(raw)} bytes, is too large to keep" in rec["detail"]
    assert validate(rec, SCHEMA, raise_errors=True)
