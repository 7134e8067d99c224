"""What the apply stage produces for one input: typed outputs, their stored form, their Kafka records.

An input (a routed intake message, a due timer, a delivery outcome)
produces, in this order:

* ``DOMAIN`` outputs -- its domain events (Avro on ``T.domain-events``,
  keyed by case id);
* ``RELAY`` outputs -- a copy of one of those events for one relay
  subscription (``<tenant>.relay.<id>``, Avro or JSON);
* ``NOTIFY`` outputs -- a delivery request for one of those events (webhook,
  Slack) on ``T.notifications``, keyed by delivery id;
* at most one ``DEAD_LETTER`` output -- its rejection, on ``T.dlq``.

A relay copy and a delivery request name the event they copy with
``Output.copies`` (the ``DOMAIN`` output itself).

**Stored form.** The key entry keeps the outputs of its recent inputs so
that a redelivery re-sends them verbatim (``streams.domain.cases.remember``).
They are stored as they always have been: ``[kind, key, value]`` rows, where
a relay or notification row's value names its event by the event's
position among the input's rows (``"ref"``). :func:`recorded` writes that
form and :func:`from_recorded` reads it, so entries written before these
types existed redeliver unchanged, and entries written now are byte for
byte what the earlier code wrote. Positions exist only in that form.

**Kafka records.** :func:`messages` encodes outputs into the bytes sent
(keys, values, headers), identical to what the apply agent has always sent
-- including the ``"ref"`` position a delivery request carries.

Imports: see ``streams/stage/__init__.py`` (no Faust, no clients).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

import schemas


class OutputKind(enum.Enum):
    """What an output is; the value is the kind's name in the stored form."""

    DOMAIN = "domain-events"   # key: case id; value: the domain event
    RELAY = "relay"            # key: subscription id; value: {"format": "avro" | "json"}
    NOTIFY = "notify"          # key: delivery id; value: the delivery request, without its event
    DEAD_LETTER = "dlq"        # key: dedup key or case id (or None); value: the dead-letter record


@dataclass(eq=False)
class Output:
    """One thing an input produces. ``copies``: for ``RELAY`` and ``NOTIFY``, the
    ``DOMAIN`` output (of the same input) whose event this output carries."""

    kind: OutputKind
    key: str | None
    value: dict
    copies: Output | None = None

    @property
    def event(self) -> dict | None:
        """The domain event this output is or carries (None for a dead letter)."""
        if self.kind is OutputKind.DOMAIN:
            return self.value
        return self.copies.value if self.copies is not None else None

    def __repr__(self) -> str:
        about = self.event["event_id"] if self.event else self.value.get("reason")
        return f"Output({self.kind.name}, {self.key!r}, {about!r})"


def domain_event(event: dict) -> Output:
    return Output(OutputKind.DOMAIN, event["case_id"], event)


def relay_copy(subscription_id: str, fmt: str, of: Output) -> Output:
    return Output(OutputKind.RELAY, subscription_id, {"format": fmt}, of)


def delivery_request(request: dict, of: Output) -> Output:
    """``request``: a delivery of ``streams.domain.notify.deliveries`` without its ``event_index``."""
    return Output(OutputKind.NOTIFY, request["delivery_id"], request, of)


def rejected(key: str | None, record: dict) -> Output:
    return Output(OutputKind.DEAD_LETTER, key, record)


# --------------------------------------------------------------------------
# the stored form (key entry "recent", for redelivery)
# --------------------------------------------------------------------------


def recorded(outputs: list[Output]) -> list[list]:
    """The stored rows of ``outputs``: ``[kind, key, value]``; a copy's value gets ``"ref"``,
    the position of the row of the event it copies (the form entries have always held)."""
    position = {id(o): i for i, o in enumerate(outputs)}
    rows: list[list] = []
    for o in outputs:
        if o.copies is None:
            rows.append([o.kind.value, o.key, o.value])
        else:
            rows.append([o.kind.value, o.key, {**o.value, "ref": position[id(o.copies)]}])
    return rows


def from_recorded(rows: list) -> list[Output]:
    """The outputs of stored rows (as written by :func:`recorded`, or by the apply agent before it;
    the same form). A row of a kind other than domain event, relay or notification is a dead
    letter, as the agent has always treated it."""
    kinds = {k.value: k for k in OutputKind}
    outputs = [Output(kinds.get(kind, OutputKind.DEAD_LETTER), key, value) for kind, key, value in rows]
    for o in outputs:
        if o.kind in (OutputKind.RELAY, OutputKind.NOTIFY):
            o.copies = outputs[o.value["ref"]]
            o.value = {k: v for k, v in o.value.items() if k != "ref"}
    return outputs


# --------------------------------------------------------------------------
# Kafka records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One Kafka record to send for ``output``: where is the output's kind (and, for a relay
    copy, its subscription ``output.key``). ``headers`` None: the record has none."""

    output: Output
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None


def event_headers(event: dict) -> list[tuple[str, bytes]]:
    """The headers of a domain event's record (and of its relay copies)."""
    return [("event_type", event["type"].encode()), ("tenant", event["tenant"].encode()),
            ("case_id", event["case_id"].encode()), ("event_id", event["event_id"].encode())]


def messages(outputs: list[Output], wall_ms: int) -> list[Message]:
    """The records of one input's ``outputs``, in order. ``wall_ms``: a dead letter's
    ``dead_lettered_at`` (the time it is sent)."""
    position = {id(o): i for i, o in enumerate(outputs)}
    encoded: dict[int, bytes] = {}   # id of a DOMAIN output -> its Avro bytes (a relay copy reuses them)
    out: list[Message] = []
    for o in outputs:
        if o.kind is OutputKind.DOMAIN:
            body = encoded[id(o)] = schemas.encode(o.value)
            out.append(Message(o, o.key.encode(), body, event_headers(o.value)))
        elif o.kind is OutputKind.NOTIFY:
            # a delivery request; the event travels with it (it is not kept twice in the state), and
            # so does "ref", the event's position among the input's outputs, as it always has
            request = {**o.value, "ref": position[id(o.copies)], "event": o.copies.value}
            out.append(Message(o, o.key.encode(), orjson.dumps(request)))
        elif o.kind is OutputKind.RELAY:
            event = o.copies.value
            if o.value["format"] == "avro":
                body = encoded.get(id(o.copies)) or schemas.encode(event)
                headers = event_headers(event) + [("schema_id", str(schemas.schema_id(body)).encode())]
            else:
                body, headers = orjson.dumps(event), event_headers(event)
            out.append(Message(o, event["case_id"].encode(), body, headers))
        else:
            record = dict(o.value, dead_lettered_at=wall_ms)
            out.append(Message(o, o.key.encode() if o.key else None, orjson.dumps(record)))
    return out
