"""Slack: Block Kit messages, response_url updates, request verification and
interactivity parsing. Pure: no I/O, no clock.

Messages (``slack_message``) are payloads for an incoming webhook or
``chat.postMessage`` (add ``channel`` for the latter): a ``text`` fallback
(notifications, screen readers) and Block Kit ``blocks``::

    header   the case summary (plain text, <= 150 characters)
    section  fields: Severity, Status, Priority, Responders, Case (link when a URL is given)
    section  links of the case (http/https only), when there are any
    context  event type, case id, dedup key
    actions  block_id "casestream_actions": Acknowledge (casestream_acknowledge)
             and Resolve (casestream_resolve, with a confirmation dialog),
             each carrying ``action_value``; no Acknowledge once the case is
             acknowledged, no buttons at all once it is resolved/closed

Everything that comes from an alert (summary, names, link texts) is
escaped for mrkdwn (``&``, ``<``, ``>``), so an alert cannot mention
``<!channel>`` or forge links.

Verification (``verify_slack_signature``): Slack signs each request with
``X-Slack-Signature: v0=<hex HMAC-SHA256(signing_secret,
f"v0:{X-Slack-Request-Timestamp}:".encode() + raw_body)>``; requests whose
timestamp is more than ``tolerance`` (300 s) away from now are refused
(replays), and so is a second use of a signature within that window (with
``seen``). Always verify the raw body, before parsing it.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import orjson

from streams.domain.webhook import responder_ids

ACK_ACTION_ID = "casestream_acknowledge"
RESOLVE_ACTION_ID = "casestream_resolve"
ACTION_IDS = (ACK_ACTION_ID, RESOLVE_ACTION_ID)
ACTIONS_BLOCK_ID = "casestream_actions"
UPDATE_BLOCK_ID = "casestream_update"

# statuses (case-insensitive) after which buttons are dropped; tenants name
# theirs differently (tenants.yaml): on-call ACKNOWLEDGED/RESOLVED,
# case-management IN_PROGRESS/CLOSED
FINAL_STATUSES = ("RESOLVED", "CLOSED")
ACKNOWLEDGED_STATUSES = ("ACKNOWLEDGED", "IN_PROGRESS")

MAX_HEADER = 150        # header block plain_text
MAX_FIELD = 2000        # section field text
MAX_TEXT = 3000         # section text / fallback text we send
MAX_BUTTON_VALUE = 2000
MAX_RESPONDERS = 10
MAX_LINKS = 5
MAX_FORM_BODY = 1024 * 1024
RESPONSE_URL_HOSTS = ("hooks.slack.com",)

SIGNATURE_VERSION = "v0"
DEFAULT_TOLERANCE = 300
REPLAYED = "already used (a replay)"

_SLACK_USER_RE = re.compile(r"[UW][A-Z0-9]{2,20}", re.ASCII)
_TS_RE = re.compile(r"[0-9]{1,15}", re.ASCII)


# --------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------


def escape(text) -> str:
    """Escape mrkdwn control characters (Slack: ``&`` ``<`` ``>``)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _link(url: str, text: str | None = None) -> str | None:
    """``<url|text>`` for an http(s) URL, else None. Characters that would
    break Slack's link syntax are percent-encoded; the text is escaped."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")) or len(url) > 2048:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    safe = (url.replace("&", "&amp;").replace("|", "%7C").replace("<", "%3C").replace(">", "%3E")
            .replace(" ", "%20"))
    if not text:
        return f"<{safe}>"
    return f"<{safe}|{escape(_truncate(text, 100)).replace('|', '¦')}>"


def _is_status(status, statuses) -> bool:
    return isinstance(status, str) and status.upper() in {s.upper() for s in statuses}


def _responder(person, user_map: dict | None) -> str:
    rid = person.get("id") if isinstance(person, dict) else person
    if user_map and rid in user_map and _SLACK_USER_RE.fullmatch(str(user_map[rid])):
        return f"<@{user_map[rid]}>"
    return escape(rid)


def _field(label: str, value: str) -> dict:
    return {"type": "mrkdwn", "text": _truncate(f"*{label}*\n{value}", MAX_FIELD)}


def _plain(text: str, limit: int = 75) -> dict:
    return {"type": "plain_text", "text": _truncate(text, limit), "emoji": False}


def _fallback(case: dict, status) -> str:
    sev = str(case.get("severity") or "").upper()
    head = f"[{sev}] " if sev else ""
    return _truncate(escape(f"{head}{case.get('summary') or case.get('case_id') or 'case'} ({status})"), MAX_TEXT)


def _buttons(status, action_value: str, final_statuses, acknowledged_statuses) -> list[dict]:
    if _is_status(status, final_statuses):
        return []
    elements = []
    if not _is_status(status, acknowledged_statuses):
        elements.append({"type": "button", "action_id": ACK_ACTION_ID, "text": _plain("Acknowledge"),
                         "value": action_value, "style": "primary"})
    elements.append({"type": "button", "action_id": RESOLVE_ACTION_ID, "text": _plain("Resolve"),
                     "value": action_value,
                     "confirm": {"title": _plain("Resolve this case?", 100),
                                 "text": {"type": "mrkdwn", "text": "Resolving closes the case for everyone."},
                                 "confirm": _plain("Resolve", 30), "deny": _plain("Cancel", 30)}})
    return [{"type": "actions", "block_id": ACTIONS_BLOCK_ID, "elements": elements}]


def _blocks(event: dict, case: dict, action_value: str | None, user_map: dict | None, case_url: str | None,
            final_statuses, acknowledged_statuses) -> list[dict]:
    case_id = case.get("case_id", case.get("id"))
    status = case.get("status")
    blocks: list[dict] = [{"type": "header",
                           "text": _plain(str(case.get("summary") or case_id or "case"), MAX_HEADER)}]

    people = case.get("responders") or responder_ids(case)
    shown = [_responder(p, user_map) for p in people[:MAX_RESPONDERS]]
    if len(people) > MAX_RESPONDERS:
        shown.append(f"+{len(people) - MAX_RESPONDERS} more")
    case_ref = (_link(case_url, str(case_id)) if case_url else None) or escape(case_id or "-")
    blocks.append({"type": "section", "fields": [
        _field("Severity", escape(str(case.get("severity") or "-").upper())),
        _field("Status", escape(status or "-")),
        _field("Priority", escape(case.get("priority") or "-")),
        _field("Responders", ", ".join(shown) if shown else "-"),
        _field("Case", case_ref),
    ]})

    links = [lk for lk in (_link(x.get("href"), x.get("text")) for x in (case.get("links") or [])[:MAX_LINKS]
                           if isinstance(x, dict)) if lk]
    if links:
        blocks.append({"type": "section", "text": {"type": "mrkdwn",
                                                    "text": _truncate("*Links*\n" + "\n".join(links), MAX_TEXT)}})

    context = [x for x in (event.get("type"), case_id and f"case {case_id}",
                           case.get("dedup_key") and f"dedup key {case.get('dedup_key')}") if x]
    if context:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": _truncate(escape(" · ".join(map(str, context))), MAX_TEXT)}]})

    if action_value is not None:
        blocks.extend(_buttons(status, action_value, final_statuses, acknowledged_statuses))
    return blocks


# --------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------


def slack_message(event: dict, case: dict, action_value: str, *, user_map: dict[str, str] | None = None,
                  case_url: str | None = None, final_statuses=FINAL_STATUSES,
                  acknowledged_statuses=ACKNOWLEDGED_STATUSES) -> dict:
    """A Block Kit message about ``case`` (after ``event``), see the module
    docstring. ``action_value``: the opaque string both buttons carry (at
    most 2000 characters, Slack's limit); ``user_map``: casestream user id ->
    Slack user id, for ``<@U…>`` mentions of responders."""
    if not isinstance(action_value, str) or not action_value or len(action_value) > MAX_BUTTON_VALUE:
        raise ValueError(f"action_value must be a non-empty string of at most {MAX_BUTTON_VALUE} characters")
    return {"text": _fallback(case, case.get("status") or "-"),
            "blocks": _blocks(event, case, action_value, user_map, case_url, final_statuses,
                              acknowledged_statuses)}


def _actor(actor, user_map: dict | None) -> str:
    if actor is None:
        return "someone"
    uid = getattr(actor, "user_id", None)
    if isinstance(uid, str) and _SLACK_USER_RE.fullmatch(uid):
        return f"<@{uid}>"
    if isinstance(actor, dict):
        sid = actor.get("slack_id") or (user_map or {}).get(actor.get("id"))
        if isinstance(sid, str) and _SLACK_USER_RE.fullmatch(sid):
            return f"<@{sid}>"
        return escape(actor.get("name") or actor.get("id") or "someone")
    if isinstance(actor, str) and _SLACK_USER_RE.fullmatch(actor):
        return f"<@{actor}>"
    return escape(actor)


def _verb(status: str) -> str:
    s = str(status).upper()
    return {"ACKNOWLEDGED": "Acknowledged", "IN_PROGRESS": "Acknowledged", "RESOLVED": "Resolved",
            "CLOSED": "Closed"}.get(s, f"Set to {status}")


def updated_message(source: list | dict, new_status: str, actor, *, user_map: dict[str, str] | None = None,
                    event: dict | None = None, action_value: str | None = None, case_url: str | None = None,
                    final_statuses=FINAL_STATUSES, acknowledged_statuses=ACKNOWLEDGED_STATUSES) -> dict:
    """A ``response_url`` payload replacing the original message after a
    status change: ``{"replace_original": true, "text", "blocks"}``.

    ``source`` is either the original message's blocks (``SlackAction.
    message_blocks``; copied, never modified: the Status field is rewritten,
    the Acknowledge button dropped once acknowledged and the buttons once
    resolved) or the case (the message is rebuilt; buttons only when
    ``action_value`` is given). A context line "<Verb> by <actor>" is added
    (replacing an earlier one). ``actor``: a Slack user id (``U…``, becomes a
    mention), a ``SlackAction``, an actor dict (``slack_id`` or ``id`` via
    ``user_map``, else its name) or any text."""
    if isinstance(source, dict):
        case = dict(source, status=new_status)
        blocks = _blocks(event or {}, case, action_value, user_map, case_url, final_statuses,
                         acknowledged_statuses)
        text = _fallback(case, new_status)
    elif isinstance(source, list):
        blocks = []
        title = None
        for block in copy.deepcopy(source):
            if not isinstance(block, dict):
                continue
            if block.get("block_id") == UPDATE_BLOCK_ID:
                continue
            if block.get("type") == "header":
                title = (block.get("text") or {}).get("text")
            if block.get("type") == "section" and isinstance(block.get("fields"), list):
                for f in block["fields"]:
                    if isinstance(f, dict) and str(f.get("text", "")).startswith("*Status*"):
                        f["text"] = f"*Status*\n{escape(new_status)}"
            if block.get("type") == "actions" and block.get("block_id") == ACTIONS_BLOCK_ID:
                if _is_status(new_status, final_statuses):
                    continue
                if _is_status(new_status, acknowledged_statuses):
                    block["elements"] = [e for e in block.get("elements") or []
                                         if not (isinstance(e, dict) and e.get("action_id") == ACK_ACTION_ID)]
                    if not block["elements"]:
                        continue
            blocks.append(block)
        text = _truncate(escape(f"{title or 'case'} ({new_status})"), MAX_TEXT)
    else:
        raise TypeError("updated_message needs the original blocks (list) or the case (dict)")
    line = f"{_verb(new_status)} by {_actor(actor, user_map)}"
    blocks.append({"type": "context", "block_id": UPDATE_BLOCK_ID,
                   "elements": [{"type": "mrkdwn", "text": _truncate(line, MAX_TEXT)}]})
    return {"replace_original": True, "text": text, "blocks": blocks}


# --------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------


def slack_signature(signing_secret: str, timestamp: str, body: bytes) -> str:
    """``v0=<hex HMAC-SHA256(secret, "v0:<timestamp>:" + body)>`` (what Slack sends)."""
    base = f"{SIGNATURE_VERSION}:{timestamp}:".encode() + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()


def verify_slack_signature(signing_secret: str, timestamp: str | None, signature: str | None, body: bytes,
                           now: int, tolerance: int = DEFAULT_TOLERANCE, seen=None) -> str | None:
    """None when the request is Slack's; else the reason: "missing
    timestamp", "missing signature", "malformed timestamp", "stale timestamp
    (outside the <tolerance> s tolerance)", "signature mismatch" or (with
    ``seen``, a ``streams.domain.auth.SeenSignatures``) "already used (a
    replay)". ``timestamp``/``signature``: the X-Slack-Request-Timestamp and
    X-Slack-Signature headers; ``body``: the raw request body; ``now``: unix
    seconds. The timestamp is checked first (as Slack recommends), then the
    signature, in constant time; then, with ``seen``, whether this signature
    was already accepted within its window (only good ones are recorded)."""
    if not signing_secret:
        raise ValueError("no Slack signing secret configured")
    if timestamp is None or not timestamp.strip():
        return "missing timestamp"
    if signature is None or not signature.strip():
        return "missing signature"
    ts = timestamp.strip()
    if not _TS_RE.fullmatch(ts):
        return "malformed timestamp"
    if abs(int(now) - int(ts)) > tolerance:
        return f"stale timestamp (outside the {tolerance:g} s tolerance)"
    expected = slack_signature(signing_secret, ts, body).encode()
    if not hmac.compare_digest(expected, signature.strip().encode("utf-8", "replace")):
        return "signature mismatch"
    if seen is not None and not seen.claim(expected.decode(), int(ts) + tolerance + 1, now):
        return REPLAYED
    return None


# --------------------------------------------------------------------------
# interactivity
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SlackAction:
    """One button click (a ``block_actions`` interaction)."""

    user_id: str
    user_name: str | None
    action_id: str
    value: str | None
    response_url: str | None
    team_id: str | None
    channel_id: str | None = None
    message_ts: str | None = None
    # the clicked message's blocks (for updated_message), when Slack sent them
    message_blocks: list | None = field(default=None, compare=False)


def valid_response_url(url: str | None) -> bool:
    """True for an ``https://hooks.slack.com/...`` URL: post updates only
    there, whatever a payload says (defence in depth behind the signature)."""
    if not isinstance(url, str) or len(url) > 2048:
        return False
    m = re.fullmatch(r"https://([^/?#@:]+)(/[^\s]*)?", url)
    return bool(m) and m.group(1).lower() in RESPONSE_URL_HOSTS


def _str(d, key) -> str | None:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, str) and v else None


def parse_action(form_body: bytes) -> SlackAction:
    """Parse Slack's interactivity request (``application/x-www-form-urlencoded``
    with one ``payload`` field holding JSON). Only ``block_actions`` is
    supported; the first action is taken. Raises ValueError with the reason
    when the body is malformed. Verify the signature first."""
    if not isinstance(form_body, (bytes, bytearray)):
        raise ValueError("the interactivity body must be bytes")
    if len(form_body) > MAX_FORM_BODY:
        raise ValueError(f"interactivity body larger than {MAX_FORM_BODY} bytes")
    try:
        text = bytes(form_body).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("interactivity body is not UTF-8") from None
    try:
        form = parse_qs(text, keep_blank_values=True, max_num_fields=20)
    except ValueError as e:
        raise ValueError(f"interactivity body is not a valid form: {e}") from None
    values = form.get("payload")
    if not values:
        raise ValueError("interactivity body has no 'payload' field")
    if len(values) > 1:
        raise ValueError("interactivity body has more than one 'payload' field")
    try:
        payload = orjson.loads(values[0])
    except orjson.JSONDecodeError as e:
        raise ValueError(f"'payload' is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise ValueError("'payload' must be a JSON object")
    if payload.get("type") != "block_actions":
        raise ValueError(f"unsupported interaction type {payload.get('type')!r} (expected 'block_actions')")
    user = payload.get("user")
    user_id = _str(user, "id")
    if user_id is None:
        raise ValueError("'payload.user.id' is missing")
    actions = payload.get("actions")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        raise ValueError("'payload.actions' must be a non-empty list of objects")
    action = actions[0]
    action_id = _str(action, "action_id")
    if action_id is None:
        raise ValueError("'payload.actions[0].action_id' is missing")
    value = action.get("value")
    if value is not None and not isinstance(value, str):
        raise ValueError("'payload.actions[0].value' must be a string")
    response_url = payload.get("response_url")
    if response_url is not None and not isinstance(response_url, str):
        raise ValueError("'payload.response_url' must be a string")
    message = payload.get("message") if isinstance(payload.get("message"), dict) else {}
    container = payload.get("container") if isinstance(payload.get("container"), dict) else {}
    blocks = message.get("blocks")
    return SlackAction(
        user_id=user_id,
        user_name=_str(user, "username") or _str(user, "name"),
        action_id=action_id,
        value=value,
        response_url=response_url or None,
        team_id=_str(payload.get("team"), "id") or _str(user, "team_id"),
        channel_id=_str(payload.get("channel"), "id") or _str(container, "channel_id"),
        message_ts=_str(message, "ts") or _str(container, "message_ts"),
        message_blocks=blocks if isinstance(blocks, list) else None,
    )
