"""Avro codec for domain events, in Confluent wire format.

Wire format: magic byte 0, 4-byte big-endian schema id, Avro binary body.
Schema ids come from the checked-in ``schemas/index.json``; the ``.avsc``
files next to it are all a consumer needs to decode (no registry).

* ``encode(record) -> bytes``: picks the latest schema of ``record["type"]``.
* ``decode(raw) -> dict``: reads with the writer's schema (from the id) and
  resolves to the latest schema of that type, so old data reads as new.

Dict conventions: timestamps are epoch milliseconds (``int``); fields marked
``"casestream.json": true`` in the schema (e.g. ``custom_details``) are JSON
text on the wire and objects in the dict.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

import orjson
from fastavro import parse_schema, schemaless_reader, schemaless_writer

SCHEMA_DIR = Path(__file__).resolve().parent
MAGIC = 0
_HEADER = struct.Struct(">bI")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

__all__ = ["encode", "decode", "SchemaError", "registry", "SchemaInfo"]


class SchemaError(ValueError):
    """Unknown type, unknown schema id, or bytes that are not our wire format."""


@dataclass(frozen=True)
class SchemaInfo:
    id: int
    type: str
    version: int
    file: str
    raw: dict          # the .avsc as JSON
    parsed: dict       # fastavro-parsed
    json_fields: tuple[str, ...]
    ts_fields: tuple[str, ...]


@dataclass(frozen=True)
class Registry:
    by_id: dict[int, SchemaInfo]
    latest: dict[str, SchemaInfo]

    def versions(self, etype: str) -> list[SchemaInfo]:
        return sorted((s for s in self.by_id.values() if s.type == etype), key=lambda s: s.version)


def _is_timestamp(avro_type) -> bool:
    """timestamp-millis, or a union holding it (a nullable timestamp)."""
    if isinstance(avro_type, list):
        return any(_is_timestamp(t) for t in avro_type)
    return isinstance(avro_type, dict) and avro_type.get("logicalType") == "timestamp-millis"


def load_registry(directory: Path = SCHEMA_DIR) -> Registry:
    index = json.loads((directory / "index.json").read_text())
    by_id: dict[int, SchemaInfo] = {}
    latest: dict[str, SchemaInfo] = {}
    for entry in index["schemas"]:
        raw = json.loads((directory / entry["file"]).read_text())
        if raw.get("name") != entry["type"]:
            raise SchemaError(f"{entry['file']}: record name {raw.get('name')!r} != index type {entry['type']!r}")
        json_fields = tuple(f["name"] for f in raw["fields"] if f.get("casestream.json"))
        ts_fields = tuple(f["name"] for f in raw["fields"] if _is_timestamp(f["type"]))
        info = SchemaInfo(entry["id"], entry["type"], entry["version"], entry["file"], raw,
                          parse_schema(raw), json_fields, ts_fields)
        if info.id in by_id:
            raise SchemaError(f"schemas/index.json: schema id {info.id} used twice")
        by_id[info.id] = info
        if info.type not in latest or latest[info.type].version < info.version:
            latest[info.type] = info
    return Registry(by_id, latest)


@lru_cache(maxsize=1)
def registry() -> Registry:
    return load_registry()


def encode(record: dict) -> bytes:
    reg = registry()
    etype = record.get("type")
    info = reg.latest.get(etype)  # type: ignore[arg-type]
    if info is None:
        raise SchemaError(f"no schema for event type {etype!r}; known: {', '.join(sorted(reg.latest))}")
    if info.json_fields:
        record = dict(record)
        for f in info.json_fields:
            v = record.get(f)
            record[f] = orjson.dumps(v if v is not None else {}, option=orjson.OPT_SORT_KEYS).decode()
    buf = io.BytesIO()
    buf.write(_HEADER.pack(MAGIC, info.id))
    schemaless_writer(buf, info.parsed, record)
    return buf.getvalue()


def schema_id(raw: bytes) -> int:
    if len(raw) < 5:
        raise SchemaError(f"{len(raw)} bytes is too short for the Confluent wire format")
    magic, sid = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise SchemaError(f"magic byte is {magic}, expected {MAGIC}")
    return sid


def decode(raw: bytes) -> dict:
    reg = registry()
    sid = schema_id(raw)
    writer = reg.by_id.get(sid)
    if writer is None:
        raise SchemaError(f"unknown schema id {sid}; is schemas/index.json up to date?")
    reader = reg.latest[writer.type]
    try:
        rec = schemaless_reader(io.BytesIO(raw[5:]), writer.parsed,
                                reader.parsed if reader is not writer else None)
    except Exception as exc:  # truncated or corrupt body: fastavro raises EOFError, ValueError, ...
        raise SchemaError(f"cannot decode {writer.type} (schema id {sid}): {exc.__class__.__name__} {exc}") from None
    for f in reader.ts_fields:
        v = rec.get(f)
        if isinstance(v, datetime):
            rec[f] = (v - _EPOCH) // timedelta(milliseconds=1)
    for f in reader.json_fields:
        v = rec.get(f)
        if isinstance(v, str):
            rec[f] = orjson.loads(v)
    return rec
