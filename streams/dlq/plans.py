"""The replay plan of a dead letter: what replaying it publishes, and where, or why nothing (pure).

How a dead letter is replayed depends on where it came from (``source.topic``):
see the package docstring (``streams/dlq/__init__.py``). Imports: the
domain's intake identity and monitor translators, ``streams.messages`` (how
the tools key an intake line), ``streams.config`` (a tenant's topic family).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from streams.config import Tenant, TopicFamily
from streams.dlq.records import GATEWAY_PREFIX, original_bytes
from streams.domain.intake import EVENT_ID_HEADER, derive_id, routing_token
from streams.domain.monitors import PayloadError, translate
from streams.messages import message_key

INTAKE, TIMERS, NOTIFICATIONS = "intake", "timers", "notifications"


@dataclass(frozen=True)
class Publish:
    role: str          # topic role in the tenant's family: "intake" or "timers"
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Plan:
    """What replaying one dead letter does: messages to publish, or why nothing."""

    publish: tuple[Publish, ...] = ()
    skip: str | None = None


def _skip(why: str) -> Plan:
    return Plan(skip=why)


def intake_key(raw: bytes, tenant: Tenant) -> bytes | None:
    """The Kafka key ``casestream send`` gives an intake line (its routing token; None when invalid)."""
    return message_key(raw, tenant)[0]


def source_kind(record: dict, family: TopicFamily) -> str | None:
    """``intake``, ``intake-routed``, ``timers``, ``notifications``, ``gateway:<kind>``; None when unknown."""
    topic = (record.get("source") or {}).get("topic") if isinstance(record.get("source"), dict) else None
    if not isinstance(topic, str):
        return None
    if topic.startswith(GATEWAY_PREFIX):
        return topic
    for role in ("intake", "intake-routed", "timers", "notifications", "domain-events"):
        if topic == family.name(role):
            return role
    return None


def _unwrap_envelope(raw: bytes) -> bytes:
    """A processing_error whose routed envelope was kept whole: its intake message."""
    try:
        env = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if isinstance(env, dict) and "intake" in env and isinstance(env.get("original"), str):
        return env["original"].encode("utf-8")
    return raw


def _explicit_event_id(raw: bytes) -> str | None:
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    eid = msg.get("event_id") if isinstance(msg, dict) else None
    return eid if isinstance(eid, str) and eid.strip() else None


def _identity(event_id: str) -> tuple[tuple[str, bytes], ...]:
    return ((EVENT_ID_HEADER, event_id.encode("utf-8")),)


def plan(record: dict, tenant: Tenant, family: TopicFamily, gateway_options: dict | None = None,
         ref: str | None = None) -> Plan:
    """What replaying the dead letter ``record`` publishes (pure: no I/O).

    ``gateway_options`` are the translation options of rate-limited gateway
    bodies (``{"dedup_by": "group"}`` for an Alertmanager/Grafana integration
    created with that option; the dead letter does not record them).
    ``ref``: where the dead letter sits (``PARTITION:OFFSET``), the identity of
    the messages a rate-limited gateway body translates to.

    Intake messages keep their identity: an explicit ``event_id`` travels in
    the bytes; otherwise the ``EVENT_ID_HEADER`` carries the id the rejected
    record had (``event_id`` of the dead letter; for a dead letter written
    before it recorded one, the id then derived from the bytes).
    """
    if "undecodable" in record:
        return _skip(f"the dead letter itself is {record['undecodable']}")
    kind = source_kind(record, family)
    if kind == "domain-events":  # projection_rejected: the event is still in the log; re-publishing adds nothing
        return _skip("a projection refused this domain event; fix the cause, then rebuild the projection "
                     f"(casestream reindex --tenant {tenant.name}, or casestream replay --from-beginning)")
    if kind is None:
        topic = (record.get("source") or {}).get("topic") if isinstance(record.get("source"), dict) else None
        return _skip(f"unknown source topic {topic!r}: cannot tell where to replay it")
    try:
        raw = original_bytes(record)
    except ValueError as exc:
        return _skip(f"the original cannot be decoded: {exc}")
    if raw is None:
        return _skip("no original was kept (null)")
    if kind in ("intake", "intake-routed"):
        if kind == "intake-routed":
            raw = _unwrap_envelope(raw)
        original = record.get("event_id")
        if not isinstance(original, str) or not original:  # a dead letter written before it kept the id
            original = _explicit_event_id(raw) or derive_id("intake", raw)
        # a replay is a new attempt, decided again (the rejection was remembered under the original
        # id), with an id of its own derived from the original: replaying twice is one attempt
        return Plan(publish=(Publish(INTAKE, intake_key(raw, tenant), raw,
                                     _identity(derive_id("replay", original))),))
    if kind == "timers":
        try:
            timer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _skip("the original is not a timer (not JSON)")
        if not isinstance(timer, dict) or not isinstance(timer.get("dedup_key"), str) or not timer["dedup_key"]:
            return _skip("the original is not a timer (no 'dedup_key')")
        return Plan(publish=(Publish(TIMERS, routing_token(timer["dedup_key"]).encode(), raw),))
    if kind == "notifications":
        # a failed delivery: ask the delivery agent to try it again (same delivery id, so receivers
        # still deduplicate; a delivery that is pending or delivered ignores it)
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _skip("the original is not a delivery request (not JSON)")
        if not isinstance(request, dict) or not isinstance(request.get("delivery_id"), str):
            return _skip("the original is not a delivery request (no 'delivery_id')")
        if record.get("reason") != "notification_failed":  # a record the delivery agent could not handle
            return Plan(publish=(Publish(NOTIFICATIONS, request["delivery_id"].encode(), raw),))
        retry = orjson.dumps(dict(request, kind="retry"))
        return Plan(publish=(Publish(NOTIFICATIONS, request["delivery_id"].encode(), retry),))
    # gateway:<kind>: what the gateway would have published had it not been rate limited
    monitor = kind[len(GATEWAY_PREFIX):]
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _skip(f"the {monitor} body is not JSON: {exc}")
    try:
        messages = translate(monitor, body, gateway_options)
    except PayloadError as exc:
        return _skip(f"the {monitor} body does not translate: {exc}")
    except ValueError as exc:  # unknown kind, bad options
        return _skip(f"cannot translate: {exc}")
    if not messages:
        return _skip(f"the {monitor} body translates to no intake message")
    out = []
    for i, msg in enumerate(messages):
        value = orjson.dumps(msg)  # the gateway's own encoding: derived ids match
        # a message without its own id (a canonical event, a PagerDuty trigger): one per dead
        # letter and position, so replaying the dead letter twice has no second effect
        headers = _identity(derive_id("dlq-replay", family.name("dlq"), ref, str(i))) \
            if ref and "event_id" not in msg else ()  # the translators' own ids stay (never applied)
        out.append(Publish(INTAKE, intake_key(value, tenant), value, headers))
    return Plan(publish=tuple(out))
