"""The DLQ record shape: agents.intake.dead_letter against schemas/json/DeadLetter.avsc."""

from __future__ import annotations

import orjson
import pytest
from fastavro import parse_schema
from fastavro.validation import validate

from agents.intake import dead_letter
from streams.config import PROJECT_ROOT
from streams.domain.intake import REASONS, Rejection

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
