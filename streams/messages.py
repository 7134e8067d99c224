"""Messages on a tenant's topics as the tools handle them.

* :func:`message_key`: the Kafka key of an intake line -- the routing token
  the worker routes it by -- as ``casestream send``, the demo, a dlq replay
  and the tests key intake messages;
* :func:`send_lines`: publish intake lines so keyed (``casestream send``,
  the demo);
* :func:`decode_record`: a record of ``T.domain-events`` or ``T.dlq`` as
  JSON for people (``casestream tail``, the demo).

Imports: the domain's intake parsing, ``schemas`` and ``streams.kafka``.
"""

from __future__ import annotations

import orjson

import schemas
from streams import kafka
from streams.domain.intake import RECORD_ID_PENDING, Rejection, intake_partition_key, parse, record_event_id

MAX_REQUEST_BYTES = 1048576 + 1024  # a 1 MiB line and headroom


def message_key(raw: bytes, tenant) -> tuple[bytes | None, str]:
    """Kafka key and printable dedup key (or case id) of an intake line: the routing
    token the worker routes it by, so a command naming a case id and an alert naming
    its dedup key share a partition (``intake_partition_key``)."""
    result = parse(raw, tenant, 0, RECORD_ID_PENDING)
    if isinstance(result, Rejection):
        return None, f"- ({result.reason}: {result.detail})"
    return intake_partition_key(result, tenant), result.dedup_key or result.case_id


async def send_lines(bootstrap: str, topic: str, lines: list[bytes], tenant) -> list[str]:
    """Publish intake lines to ``topic`` (acks=all), each keyed by :func:`message_key`; each line's
    dedup key, in order (a trigger without one: its record's id; an invalid line: why)."""
    keyed = [message_key(raw, tenant) for raw in lines]
    placed = await kafka.publish(bootstrap, [(topic, key, raw) for raw, (key, _) in zip(lines, keyed)],
                                 linger_ms=5, max_request_size=MAX_REQUEST_BYTES)
    # a trigger without dedup_key is its own alert: its key is its record's id
    return [record_event_id(topic, md.partition, md.offset) if shown == RECORD_ID_PENDING else shown
            for (_, shown), md in zip(keyed, placed)]


def decode_record(rec, kind: str) -> dict:
    """A record of the ``kind`` topic (``domain-events``: Avro; else JSON) decoded; a marker dict
    saying where it is when it does not decode."""
    if kind == "domain-events":
        try:
            return schemas.decode(rec.value)
        except Exception as exc:
            return {"undecodable": str(exc), "partition": rec.partition, "offset": rec.offset}
    try:
        return orjson.loads(rec.value)
    except orjson.JSONDecodeError:
        return {"undecodable": "not JSON", "partition": rec.partition, "offset": rec.offset}
