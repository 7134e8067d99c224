"""Outbound webhooks: the body, its signature and the headers. Pure.

Body (JSON, keys sorted, so the same inputs always give the same bytes)::

    {"delivery": {"id", "tenant", "event_id", "event_type", "occurred_at"},
     "event": <the domain event as it is>,
     "case": {"id", "status", "severity", "priority", "summary",
              "responders": [<user ids>], "url"?} | null}

The body carries no attempt number or send time, so every retry of a
delivery sends identical bytes; only the signature timestamp changes.

Signature: ``X-Casestream-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret,
f"{t}.".encode() + body)>``, the very scheme casestream verifies on intake
(``streams.domain.auth.sign``/``verify_signature``), so a receiver can use
the same code (or Stripe-style verifiers) to check it.
"""

from __future__ import annotations

import orjson

from streams.domain import auth

USER_AGENT = "casestream/1"
SIGNATURE_HEADER = "X-Casestream-Signature"
DELIVERY_ID_HEADER = "X-Casestream-Delivery-Id"
EVENT_TYPE_HEADER = "X-Casestream-Event-Type"
ATTEMPT_HEADER = "X-Casestream-Attempt"
CONTENT_TYPE = "application/json"


def responder_ids(case: dict) -> list[str]:
    """The responders' ids (``responder_users``, else the ids in ``responders``)."""
    ids = case.get("responder_users")
    if ids:
        return [str(i) for i in ids]
    out = []
    for r in case.get("responders") or []:
        rid = r.get("id") if isinstance(r, dict) else r
        if rid is not None and str(rid) not in out:
            out.append(str(rid))
    return out


def case_summary(case: dict, url: str | None = None) -> dict:
    """What a notification tells of a case: id, status, severity, priority,
    summary, responder ids, and ``url`` when given."""
    out = {
        "id": case.get("case_id", case.get("id")),
        "status": case.get("status"),
        "severity": case.get("severity"),
        "priority": case.get("priority"),
        "summary": case.get("summary"),
        "responders": responder_ids(case),
    }
    if url:
        out["url"] = url
    return out


def webhook_body(event: dict, case: dict | None, tenant: str, *, delivery_id: str | None = None,
                 case_url: str | None = None) -> bytes:
    """The JSON body of a webhook delivery (see the module docstring).
    ``delivery_id``: ``streams.domain.delivery.delivery_id(event_id, endpoint)``."""
    delivery = {
        "id": delivery_id,
        "tenant": tenant,
        "event_id": event.get("event_id"),
        "event_type": event.get("type"),
        "occurred_at": event.get("occurred_at"),
    }
    doc = {"delivery": delivery, "event": event, "case": case_summary(case, case_url) if case is not None else None}
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def signature_header(secret: str, body: bytes, t: int) -> str:
    """``t=<t>,v1=<hex HMAC-SHA256(secret, f"{t}.".encode() + body)>``."""
    return auth.sign(secret, body, t)


def _header_value(name: str, value) -> str:
    s = str(value)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in s) or not s.isascii():
        raise ValueError(f"{name} must be printable ASCII without control characters, got {s!r}")
    return s


def webhook_headers(*, delivery_id: str, event_type: str, body: bytes, t: int, secret: str | None = None,
                    attempt: int | None = None) -> dict[str, str]:
    """Request headers of a delivery: Content-Type, User-Agent, delivery id,
    event type, the signature when the endpoint has a ``secret`` (signed at
    ``t``, unix seconds: sign at each attempt, just before sending), and the
    attempt number (1-based) when given. Raises ValueError for a value that
    cannot be a header (control characters, non-ASCII)."""
    headers = {
        "Content-Type": CONTENT_TYPE,
        "User-Agent": USER_AGENT,
        DELIVERY_ID_HEADER: _header_value(DELIVERY_ID_HEADER, delivery_id),
        EVENT_TYPE_HEADER: _header_value(EVENT_TYPE_HEADER, event_type),
    }
    if secret:
        headers[SIGNATURE_HEADER] = signature_header(secret, body, t)
    if attempt is not None:
        headers[ATTEMPT_HEADER] = str(int(attempt))
    return headers
