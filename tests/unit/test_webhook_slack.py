"""streams.domain.webhook and streams.domain.slack: bodies, signatures, Block Kit, interactivity."""

import hashlib
import hmac
from urllib.parse import urlencode

import orjson
import pytest

from streams.domain import auth, slack, webhook
from streams.domain.delivery import delivery_id
from streams.domain.slack import (ACK_ACTION_ID, ACTIONS_BLOCK_ID, RESOLVE_ACTION_ID, SlackAction, parse_action,
                                  slack_message, slack_signature, updated_message, verify_slack_signature)

T = 1_795_514_400

EVENT = {"event_id": "ev-1", "type": "CaseCreated", "tenant": "on-call", "case_id": "PG-1", "dedup_key": "disk-db-1",
         "version": 1, "occurred_at": T * 1000, "status": "TRIGGERED", "summary": "disk full on db-1"}
CASE = {"case_id": "PG-1", "tenant": "on-call", "dedup_key": "disk-db-1", "status": "TRIGGERED",
        "severity": "critical", "priority": "P1", "summary": "disk full on db-1",
        "responder_users": ["u-alice", "u-bob"],
        "responders": [{"id": "u-alice", "name": "Alice Doe"}, {"id": "u-bob", "name": "Bob Roe"}],
        "links": [{"href": "https://grafana.example/d/1?a=1&b=2", "text": "Dashboard"},
                  {"href": "javascript:alert(1)", "text": "evil"}],
        "custom_details": {"big": "x" * 100}}
VALUE = "on-call|PG-1|disk-db-1"


# --------------------------------------------------------------------------
# webhook
# --------------------------------------------------------------------------


def test_webhook_body_shape_and_determinism():
    did = delivery_id("ev-1", "https://hooks.example/x")
    body = webhook.webhook_body(EVENT, CASE, "on-call", delivery_id=did, case_url="https://cs.example/c/PG-1")
    assert body == webhook.webhook_body(EVENT, dict(reversed(list(CASE.items()))), "on-call", delivery_id=did,
                                        case_url="https://cs.example/c/PG-1")
    doc = orjson.loads(body)
    assert doc["delivery"] == {"id": did, "tenant": "on-call", "event_id": "ev-1", "event_type": "CaseCreated",
                               "occurred_at": T * 1000}
    assert doc["event"] == EVENT
    assert doc["case"] == {"id": "PG-1", "status": "TRIGGERED", "severity": "critical", "priority": "P1",
                           "summary": "disk full on db-1", "responders": ["u-alice", "u-bob"],
                           "url": "https://cs.example/c/PG-1"}
    assert list(doc) == sorted(doc)


def test_webhook_body_without_case_or_url():
    doc = orjson.loads(webhook.webhook_body(EVENT, None, "on-call"))
    assert doc["case"] is None and doc["delivery"]["id"] is None
    case = {"case_id": "PG-2", "status": "OPEN", "responders": [{"id": "u-1"}, {"id": "u-1"}, {"id": "u-2"}]}
    doc = orjson.loads(webhook.webhook_body(EVENT, case, "cm"))
    assert doc["case"]["responders"] == ["u-1", "u-2"] and "url" not in doc["case"]
    assert doc["case"]["severity"] is None


def test_signature_header_matches_intake_scheme():
    body = webhook.webhook_body(EVENT, CASE, "on-call")
    h = webhook.signature_header("whsec_abc", body, T)
    mac = hmac.new(b"whsec_abc", f"{T}.".encode() + body, hashlib.sha256).hexdigest()
    assert h == f"t={T},v1={mac}"
    assert auth.verify_signature("whsec_abc", h, body, T) is None
    assert auth.verify_signature("whsec_other", h, body, T) == auth.MISMATCH


def test_webhook_headers():
    body = b"{}"
    h = webhook.webhook_headers(delivery_id="d-1", event_type="StatusChanged", body=body, t=T, secret="s",
                                attempt=3)
    assert h["Content-Type"] == "application/json"
    assert h["User-Agent"] == "casestream/1"
    assert h["X-Casestream-Delivery-Id"] == "d-1"
    assert h["X-Casestream-Event-Type"] == "StatusChanged"
    assert h["X-Casestream-Attempt"] == "3"
    assert auth.verify_signature("s", h["X-Casestream-Signature"], body, T) is None
    unsigned = webhook.webhook_headers(delivery_id="d-1", event_type="X", body=body, t=T)
    assert "X-Casestream-Signature" not in unsigned and "X-Casestream-Attempt" not in unsigned
    with pytest.raises(ValueError):
        webhook.webhook_headers(delivery_id="d-1\r\nX-Evil: 1", event_type="X", body=body, t=T)
    with pytest.raises(ValueError):
        webhook.webhook_headers(delivery_id="d-1", event_type="Ünïcode", body=body, t=T)


# --------------------------------------------------------------------------
# slack messages
# --------------------------------------------------------------------------


def _block(msg, btype, block_id=None):
    found = [b for b in msg["blocks"] if b["type"] == btype and (block_id is None or b.get("block_id") == block_id)]
    return found[0] if found else None


def _fields(msg):
    return {f["text"].split("\n", 1)[0].strip("*"): f["text"].split("\n", 1)[1]
            for f in _block(msg, "section")["fields"]}


def test_slack_message_layout():
    msg = slack_message(EVENT, CASE, VALUE, user_map={"u-alice": "U0ALICE"}, case_url="https://cs.example/c/PG-1")
    assert msg["text"] == "[CRITICAL] disk full on db-1 (TRIGGERED)"
    assert msg["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": "disk full on db-1",
                                                           "emoji": False}}
    f = _fields(msg)
    assert f["Severity"] == "CRITICAL" and f["Status"] == "TRIGGERED" and f["Priority"] == "P1"
    assert f["Responders"] == "<@U0ALICE>, u-bob"        # mapped -> mention, else the id
    assert f["Case"] == "<https://cs.example/c/PG-1|PG-1>"
    links = [b for b in msg["blocks"] if b["type"] == "section" and "text" in b][0]["text"]["text"]
    assert "<https://grafana.example/d/1?a=1&amp;b=2|Dashboard>" in links
    assert "javascript" not in links
    ctx = _block(msg, "context")["elements"][0]["text"]
    assert "CaseCreated" in ctx and "PG-1" in ctx and "disk-db-1" in ctx
    actions = _block(msg, "actions", ACTIONS_BLOCK_ID)
    ack, res = actions["elements"]
    assert ack["action_id"] == ACK_ACTION_ID and ack["value"] == VALUE and ack["text"]["text"] == "Acknowledge"
    assert res["action_id"] == RESOLVE_ACTION_ID and res["value"] == VALUE and res["text"]["text"] == "Resolve"
    assert res["confirm"]["confirm"]["text"] == "Resolve"
    orjson.dumps(msg)  # JSON-able


def test_slack_message_without_map_uses_ids():
    msg = slack_message(EVENT, dict(CASE, responders=[]), VALUE)
    assert _fields(msg)["Responders"] == "u-alice, u-bob"
    assert _fields(msg)["Case"] == "PG-1"
    msg = slack_message(EVENT, {"case_id": "PG-9", "status": "TRIGGERED"}, VALUE)
    f = _fields(msg)
    assert f["Responders"] == "-" and f["Severity"] == "-" and f["Priority"] == "-"
    assert msg["blocks"][0]["text"]["text"] == "PG-9"


def test_slack_message_ignores_bad_slack_ids():
    msg = slack_message(EVENT, CASE, VALUE, user_map={"u-alice": "<!channel>"})
    assert _fields(msg)["Responders"] == "u-alice, u-bob"


@pytest.mark.parametrize("status,buttons", [
    ("TRIGGERED", [ACK_ACTION_ID, RESOLVE_ACTION_ID]),
    ("OPEN", [ACK_ACTION_ID, RESOLVE_ACTION_ID]),
    ("ACKNOWLEDGED", [RESOLVE_ACTION_ID]),
    ("IN_PROGRESS", [RESOLVE_ACTION_ID]),
    ("RESOLVED", []),
    ("CLOSED", []),
    ("resolved", []),
])
def test_buttons_follow_status(status, buttons):
    actions = _block(slack_message(EVENT, dict(CASE, status=status), VALUE), "actions")
    shown = [e["action_id"] for e in actions["elements"]] if actions else []
    assert shown == buttons
    assert actions is None or actions["elements"]      # never an empty actions block


def test_custom_final_statuses():
    msg = slack_message(EVENT, dict(CASE, status="DONE"), VALUE, final_statuses=("DONE",))
    assert _block(msg, "actions") is None


def test_alert_text_is_escaped():
    case = dict(CASE, summary="<!channel> pwn & <https://evil|click>", severity="<b>",
                responders=[{"id": "<@U999>"}])
    msg = slack_message(EVENT, case, VALUE)
    assert "<!channel>" not in msg["text"] and "&lt;!channel&gt; pwn &amp;" in msg["text"]
    f = _fields(msg)
    assert f["Severity"] == "&lt;B&gt;"
    assert f["Responders"] == "&lt;@U999&gt;"
    # header is plain_text: shown literally, never parsed
    assert msg["blocks"][0]["text"]["type"] == "plain_text"


def test_limits():
    case = dict(CASE, summary="s" * 500, responders=[{"id": f"u{i}"} for i in range(25)])
    msg = slack_message(EVENT, case, VALUE)
    assert len(msg["blocks"][0]["text"]["text"]) == 150
    assert _fields(msg)["Responders"].endswith("+15 more")
    for bad in ("", "x" * 2001, None):
        with pytest.raises(ValueError):
            slack_message(EVENT, CASE, bad)
    assert _block(slack_message(EVENT, CASE, "x" * 2000), "actions")


def test_updated_message_from_original_blocks():
    original = slack_message(EVENT, CASE, VALUE)["blocks"]
    snapshot = orjson.dumps(original)
    upd = updated_message(original, "ACKNOWLEDGED", "U0ALICE")
    assert orjson.dumps(original) == snapshot                      # the input is not modified
    assert upd["replace_original"] is True
    assert upd["text"] == "disk full on db-1 (ACKNOWLEDGED)"
    assert _fields(upd)["Status"] == "ACKNOWLEDGED"
    assert [e["action_id"] for e in _block(upd, "actions")["elements"]] == [RESOLVE_ACTION_ID]
    assert upd["blocks"][-1] == {"type": "context", "block_id": slack.UPDATE_BLOCK_ID,
                                 "elements": [{"type": "mrkdwn", "text": "Acknowledged by <@U0ALICE>"}]}
    # then resolved: buttons gone, the update line replaced
    done = updated_message(upd["blocks"], "RESOLVED", {"id": "u-bob", "name": "Bob <Roe>"})
    assert _block(done, "actions") is None
    assert _fields(done)["Status"] == "RESOLVED"
    updates = [b for b in done["blocks"] if b.get("block_id") == slack.UPDATE_BLOCK_ID]
    assert len(updates) == 1 and updates[0]["elements"][0]["text"] == "Resolved by Bob &lt;Roe&gt;"


def test_updated_message_from_case():
    upd = updated_message(CASE, "ACKNOWLEDGED", {"id": "u-alice"}, user_map={"u-alice": "U0ALICE"},
                          action_value=VALUE)
    assert _fields(upd)["Status"] == "ACKNOWLEDGED"
    assert [e["action_id"] for e in _block(upd, "actions")["elements"]] == [RESOLVE_ACTION_ID]
    assert upd["blocks"][-1]["elements"][0]["text"] == "Acknowledged by <@U0ALICE>"
    assert _block(updated_message(CASE, "ACKNOWLEDGED", "someone"), "actions") is None   # no value, no buttons
    act = SlackAction("U0BOB", "bob", RESOLVE_ACTION_ID, VALUE, None, "T1")
    closed = updated_message(CASE, "CLOSED", act, action_value=VALUE)
    assert _block(closed, "actions") is None
    assert closed["blocks"][-1]["elements"][0]["text"] == "Closed by <@U0BOB>"
    assert updated_message(CASE, "TRIGGERED", None)["blocks"][-1]["elements"][0]["text"] == \
        "Set to TRIGGERED by someone"
    with pytest.raises(TypeError):
        updated_message("blocks", "RESOLVED", "x")


# --------------------------------------------------------------------------
# slack signature
# --------------------------------------------------------------------------

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BODY = b"payload=%7B%22type%22%3A%22block_actions%22%7D"


def _sig(ts, body=BODY, secret=SECRET):
    return "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()


def test_slack_signature_ok():
    assert slack_signature(SECRET, str(T), BODY) == _sig(T)
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T) is None
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T + 300) is None
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T - 300) is None


@pytest.mark.parametrize("ts,sig,body,now,reason", [
    (None, "v0=00", BODY, T, "missing timestamp"),
    (str(T), None, BODY, T, "missing signature"),
    (str(T), "", BODY, T, "missing signature"),
    ("12a", "v0=00", BODY, T, "malformed timestamp"),
    ("-5", "v0=00", BODY, T, "malformed timestamp"),
    (str(T), "v0=deadbeef", BODY, T, "signature mismatch"),
    (str(T), "v1=" + _sig(T)[3:], BODY, T, "signature mismatch"),
    (str(T), _sig(T), BODY + b"x", T, "signature mismatch"),
    (str(T), _sig(T, secret="other"), BODY, T, "signature mismatch"),
    (str(T), _sig(T) + "é", BODY, T, "signature mismatch"),
])
def test_slack_signature_refused(ts, sig, body, now, reason):
    assert verify_slack_signature(SECRET, ts, sig, body, now) == reason


def test_slack_signature_stale_both_ways():
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T + 301).startswith("stale timestamp")
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T - 301).startswith("stale timestamp")
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T + 1000, tolerance=1000) is None
    with pytest.raises(ValueError):
        verify_slack_signature("", str(T), _sig(T), BODY, T)


# --------------------------------------------------------------------------
# interactivity
# --------------------------------------------------------------------------


def _payload(**over):
    p = {"type": "block_actions",
         "user": {"id": "U0ALICE", "username": "alice", "name": "alice", "team_id": "T0TEAM"},
         "team": {"id": "T0TEAM", "domain": "acme"},
         "channel": {"id": "C0CHAN", "name": "incidents"},
         "container": {"type": "message", "message_ts": "1700000000.000100", "channel_id": "C0CHAN"},
         "message": {"ts": "1700000000.000100", "blocks": [{"type": "header"}]},
         "response_url": "https://hooks.slack.com/actions/T0TEAM/1/abc",
         "actions": [{"type": "button", "action_id": ACK_ACTION_ID, "block_id": ACTIONS_BLOCK_ID, "value": VALUE,
                      "action_ts": "1700000001.1"}]}
    p.update(over)
    return p


def _form(payload) -> bytes:
    raw = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return urlencode({"payload": raw}).encode()


def test_parse_action():
    a = parse_action(_form(_payload()))
    assert a == SlackAction(user_id="U0ALICE", user_name="alice", action_id=ACK_ACTION_ID, value=VALUE,
                            response_url="https://hooks.slack.com/actions/T0TEAM/1/abc", team_id="T0TEAM",
                            channel_id="C0CHAN", message_ts="1700000000.000100")
    assert a.message_blocks == [{"type": "header"}]


def test_parse_action_fallbacks():
    p = _payload(team=None, channel=None, message=None, response_url=None)
    p["user"] = {"id": "U1", "name": "bob", "team_id": "T2"}
    a = parse_action(_form(p))
    assert a.user_name == "bob" and a.team_id == "T2" and a.channel_id == "C0CHAN"
    assert a.message_ts == "1700000000.000100" and a.response_url is None and a.message_blocks is None


def test_parse_action_plus_and_percent_encoding():
    # Slack form-encodes: spaces may arrive as '+'
    p = _payload()
    p["actions"][0]["value"] = "on-call|PG 1|a+b&c"
    assert parse_action(_form(p)).value == "on-call|PG 1|a+b&c"


@pytest.mark.parametrize("body,message", [
    (b"", "no 'payload'"),
    (b"foo=bar", "no 'payload'"),
    (b"payload=1&payload=2", "more than one"),
    (b"payload=%7Bnot-json", "not valid JSON"),
    (b"payload=%5B%5D", "JSON object"),
    (b"\xff\xfe", "not UTF-8"),
    (_form(_payload(type="view_submission")), "unsupported interaction type"),
    (_form(_payload(user={})), "user.id"),
    (_form(_payload(user="U1")), "user.id"),
    (_form(_payload(actions=[])), "non-empty list"),
    (_form(_payload(actions=["x"])), "non-empty list"),
    (_form(_payload(actions=[{"value": "v"}])), "action_id"),
    (_form(_payload(actions=[{"action_id": "a", "value": 5}])), "value"),
    (_form(_payload(response_url=5)), "response_url"),
    (b"payload=" + b"a" * (1024 * 1024 + 1), "larger than"),
])
def test_parse_action_malformed(body, message):
    with pytest.raises(ValueError, match=message):
        parse_action(body)


def test_parse_action_not_bytes():
    with pytest.raises(ValueError):
        parse_action("payload={}")


def test_valid_response_url():
    assert slack.valid_response_url("https://hooks.slack.com/actions/T/1/abc")
    assert slack.valid_response_url("https://HOOKS.SLACK.COM/actions/T/1/abc")
    for bad in (None, "http://hooks.slack.com/x", "https://hooks.slack.com.evil.com/x",
                "https://evil.com/hooks.slack.com", "https://user@hooks.slack.com/x",
                "https://hooks.slack.com:8443/x", "https://hooks.slack.com/a b"):
        assert not slack.valid_response_url(bad), bad


def test_slack_signature_is_accepted_once():
    from streams.domain.auth import SeenSignatures

    seen = SeenSignatures()
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T, seen=seen) is None
    why = verify_slack_signature(SECRET, str(T), _sig(T), BODY, T + 10, seen=seen)
    assert why == "already used (a replay)"
    assert verify_slack_signature(SECRET, f" {T} ", _sig(T) + " ", BODY, T + 10, seen=seen) == why
    # another press (another timestamp or body) is another signature; a refused one is not recorded
    assert verify_slack_signature(SECRET, str(T + 1), _sig(T + 1), BODY, T + 10, seen=seen) is None
    assert verify_slack_signature(SECRET, str(T), _sig(T, secret="x"), BODY + b"&x=1", T, seen=seen) \
        == "signature mismatch"
    assert verify_slack_signature(SECRET, str(T), _sig(T, BODY + b"&x=1"), BODY + b"&x=1", T, seen=seen) is None
    # after its window the entry is gone (and the request is stale anyway)
    assert verify_slack_signature(SECRET, str(T), _sig(T), BODY, T + 301, seen=seen).startswith("stale")
    assert seen.claim("x", T + 1000, T + 302) and len(seen) == 1
