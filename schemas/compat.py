"""Backward-compatibility check between consecutive schema versions.

Backward compatible (Confluent's BACKWARD): a consumer using the new schema
reads everything written with the previous one. Checked two ways:

1. rules: every field the new version adds has a default; no field changes to
   a type the old values cannot be promoted to;
2. proof by data: sample records of the old schema (every optional field
   null, and every optional field filled) are written with the old schema and
   read with the new one by fastavro's schema resolution.

``python -m schemas.compat`` checks every type in ``schemas/index.json``.
"""

from __future__ import annotations

import io
import sys

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from schemas import Registry, registry

_PROMOTIONS = {("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"),
               ("long", "double"), ("float", "double"), ("string", "bytes"), ("bytes", "string")}


def _type_names(t) -> set[str]:
    if isinstance(t, list):
        return set().union(*(_type_names(x) for x in t))
    if isinstance(t, dict):
        return {t.get("name") or t["type"]}
    return {t}


def _readable(old_t, new_t) -> bool:
    old, new = _type_names(old_t), _type_names(new_t)
    return all(o in new or any((o, n) in _PROMOTIONS for n in new) for o in old)


def sample(t, filled: bool, named: dict):
    """A value of Avro type ``t``; ``filled`` picks non-null union branches."""
    if isinstance(t, list):
        branches = [b for b in t if b != "null"] if filled else t
        return sample(branches[0] if branches else "null", filled, named)
    if isinstance(t, str):
        if t in named:
            return sample(named[t], filled, named)
        return {"null": None, "boolean": True, "int": 7, "long": 1_700_000_000_000, "float": 1.5,
                "double": 2.5, "string": "x", "bytes": b"x"}[t]
    kind = t["type"]
    if kind == "record":
        named[t["name"]] = t
        if "namespace" in t:
            named[f"{t['namespace']}.{t['name']}"] = t
        return {f["name"]: sample(f["type"], filled, named) for f in t["fields"]}
    if kind == "array":
        return [sample(t["items"], filled, named)] if filled else []
    if kind == "map":
        return {"k": sample(t["values"], filled, named)} if filled else {}
    if kind == "enum":
        named[t["name"]] = t
        return t["symbols"][0]
    if kind == "fixed":
        return b"\x00" * t["size"]
    return sample(kind, filled, named)


def check_pair(old: dict, new: dict) -> list[str]:
    """Problems reading ``old``-written data with ``new``; empty when compatible."""
    problems = []
    old_fields = {f["name"]: f for f in old["fields"]}
    for f in new["fields"]:
        if f["name"] not in old_fields:
            if "default" not in f:
                problems.append(f"field '{f['name']}' was added without a default")
        elif not _readable(old_fields[f["name"]]["type"], f["type"]):
            problems.append(f"field '{f['name']}' changed type in a way old values cannot be read")
    if problems:
        return problems
    for filled in (False, True):
        rec = sample(old, filled, {})
        buf = io.BytesIO()
        try:
            schemaless_writer(buf, parse_schema(old), rec)
            buf.seek(0)
            schemaless_reader(buf, parse_schema(old), parse_schema(new))
        except Exception as exc:  # fastavro raises several kinds
            problems.append(f"reading old data with the new schema fails: {exc}")
    return problems


def check_registry(reg: Registry | None = None) -> dict[str, list[str]]:
    reg = reg or registry()
    out: dict[str, list[str]] = {}
    for etype in sorted(reg.latest):
        versions = reg.versions(etype)
        for a, b in zip(versions, versions[1:]):
            probs = check_pair(a.raw, b.raw)
            if probs:
                out[f"{etype} v{a.version} -> v{b.version}"] = probs
    return out


def main() -> int:
    bad = check_registry()
    for where, probs in bad.items():
        for p in probs:
            print(f"{where}: {p}", file=sys.stderr)
    if not bad:
        print("all schema versions are backward compatible")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
