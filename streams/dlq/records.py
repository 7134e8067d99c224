"""Dead letters as records: where one sits and its decoded JSON, its original, how it is shown, filters.

Pure (no I/O). Imports: ``streams.domain.intake`` (the reasons) only.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson

from streams.domain.intake import REASONS

GATEWAY_PREFIX = "gateway:"


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One record of ``T.dlq``: where it sits and its decoded JSON."""

    partition: int
    offset: int
    record: dict

    @property
    def ref(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def reason(self) -> str | None:
        return self.record.get("reason")

    @property
    def dead_lettered_at(self) -> int:
        at = self.record.get("dead_lettered_at")
        return at if isinstance(at, int) else 0

    @property
    def source(self) -> dict:
        src = self.record.get("source")
        return src if isinstance(src, dict) else {}

    def as_json(self) -> dict:
        """The decoded record plus where it sits in the DLQ."""
        return dict(self.record, dlq_partition=self.partition, dlq_offset=self.offset)


def decode_value(value: bytes | None) -> dict:
    """A DLQ record's value as a dict (a marker dict when it is not a JSON object)."""
    try:
        rec = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return {"undecodable": "not JSON"}
    return rec if isinstance(rec, dict) else {"undecodable": "not a JSON object"}


def original_bytes(record: dict) -> bytes | None:
    """The original message bytes (base64-decoded when needed); None when not kept.

    Raises ValueError for an original that is not valid base64 or an unknown encoding.
    """
    original = record.get("original")
    if original is None:
        return None
    if not isinstance(original, str):
        raise ValueError("'original' is not a string")
    encoding = record.get("original_encoding") or "utf-8"
    if encoding == "utf-8":
        return original.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(original, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("'original' is not valid base64") from None
    raise ValueError(f"unknown original_encoding {encoding!r}")


def original_text(record: dict) -> str | None:
    """The original as text for people: UTF-8 as is, other bytes as \\xNN escapes."""
    try:
        raw = original_bytes(record)
    except ValueError:
        original = record.get("original")
        return original if isinstance(original, str) else None
    return None if raw is None else raw.decode("utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------
# display and arguments
# --------------------------------------------------------------------------


def utc(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def describe_source(source: dict) -> str:
    topic = source.get("topic") or "-"
    if str(topic).startswith(GATEWAY_PREFIX) or source.get("partition", -1) < 0:
        return str(topic)
    return f"{topic}:{source.get('partition')}@{source.get('offset')}"


def parse_ref(text: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` -> (partition, offset); ValueError when malformed."""
    p, sep, o = (text or "").strip().partition(":")
    if not sep or not p.isdigit() or not o.isdigit():
        raise ValueError(f"a dead letter is named PARTITION:OFFSET (as 'dlq list' shows it), e.g. 3:42; got {text!r}")
    return int(p), int(o)


def parse_time(text: str) -> int:
    """RFC 3339 (with an offset) -> epoch milliseconds; ValueError otherwise."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"an RFC 3339 time, e.g. 2026-11-24T10:00:00Z, got {text!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"a time zone offset is needed (Z or +hh:mm), got {text!r}")
    return int(dt.timestamp() * 1000)


# --------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Which dead letters a command is about (every given condition must hold)."""

    reasons: frozenset[str] | None = None  # None: any reason
    since_ms: int | None = None            # dead_lettered_at >= since
    match: str | None = None               # substring of the original text

    def __post_init__(self) -> None:
        unknown = sorted(set(self.reasons or ()) - set(REASONS))
        if unknown:
            raise ValueError(f"unknown reason(s) {', '.join(unknown)}; use {', '.join(REASONS)}")

    def __call__(self, dl: DeadLetter) -> bool:
        if self.reasons is not None and dl.reason not in self.reasons:
            return False
        if self.since_ms is not None and dl.dead_lettered_at < self.since_ms:
            return False
        if self.match is not None and self.match not in (original_text(dl.record) or ""):
            return False
        return True


def newest_last(items: list[DeadLetter], limit: int | None = None) -> list[DeadLetter]:
    """In dead-lettering order (time, then DLQ position); the last ``limit`` (None or 0: all)."""
    items = sorted(items, key=lambda d: (d.dead_lettered_at, d.partition, d.offset))
    return items[-limit:] if limit else items
