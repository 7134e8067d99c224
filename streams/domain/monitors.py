"""Monitor webhooks -> canonical intake messages. Pure: no I/O, no clock.

``translate(kind, body, options)`` turns one webhook body (already
JSON-decoded) from a monitoring system into the canonical intake messages of
:mod:`streams.domain.intake` (dicts, to be JSON-encoded and published); every
message it returns passes ``intake.parse``. Time comes only from the payloads:
a message without a usable time carries no ``timestamp`` and the intake uses
the record's receive time. A malformed body raises :class:`PayloadError` with
*all* the field-level errors found (``[{"field": ..., "message": ...}]``).

Kinds
-----

``pagerduty``
    A PagerDuty Events API v2 body, validated as PagerDuty does (the errors
    are shaped for its 400 ``invalid event`` answer). ``routing_key`` is
    ignored and copied nowhere (it is a secret; the gateway handles it). A
    trigger without ``dedup_key`` gets none here: the message is its own
    alert, and its Kafka record defines its id and key (a fresh key per
    accepted request, returned in the 202, as PagerDuty does). A
    ``payload.timestamp`` without an offset is taken as UTC. ``images`` go to
    ``custom_details["images"]`` (replacing a key of that name);
    ``client_url`` becomes a link whose text is ``client``. No ``event_id``:
    every accepted event is an event (PagerDuty counts each trigger).

``alertmanager`` (webhook payload version 4) and ``grafana`` (Grafana Alerting)
    One message per alert: ``firing`` -> trigger, ``resolved`` -> resolve.

    * ``dedup_key``: the alert's ``fingerprint`` (an alert without one gets
      ``labels-<sha256 of its sorted labels, 16 hex>``). With
      ``options={"dedup_by": "group"}``: the notification's ``groupKey``, one
      message per notification (see :func:`_group_message`).
    * ``event_id``: ``derive_id(kind, fingerprint, status, startsAt[, endsAt
      when resolved])``: a repeated notification of the same alert state is
      idempotent; a new firing period (new ``startsAt``) is a new occurrence.
    * ``summary``: ``annotations.summary``, else ``annotations.description``,
      else ``labels.alertname`` (truncated to 1024).
    * ``severity``: the ``severity`` label through :data:`SEVERITY_ALIASES`
      (case-insensitive); missing or unknown -> :data:`DEFAULT_SEVERITY`
      (``error``), which is what Alertmanager's own ``pagerduty_config``
      sends when no severity is configured: an unclassified alert that was
      routed to paging still pages, but is not claimed to be critical.
    * ``source``: label ``instance``, else ``job``, else the kind's name;
      ``component``: ``job``, else ``service``; ``group``: ``cluster``, else
      ``namespace`` (the cluster is the broadest stable grouping, present on
      every alert of a Prometheus via external labels; the namespace is in
      the tags anyway), for Grafana then ``grafana_folder``; ``class``:
      ``alertname``. Label values are truncated to 255 characters.
    * ``timestamp``: ``startsAt`` when firing, ``endsAt`` when resolved
      (Go's zero time ``0001-01-01T00:00:00Z`` is ignored).
    * ``custom_details``: ``labels``, ``annotations``, ``receiver``,
      ``group_key`` (+ ``truncated_alerts`` when non-zero; Grafana adds
      ``values``, ``value_string``, ``org_id``).
    * ``links``: ``generatorURL`` ("Source"), ``externalURL``
      ("Alertmanager" / "Grafana"), the ``runbook_url`` annotation
      ("Runbook"); Grafana adds ``dashboardURL`` ("Dashboard"), ``panelURL``
      ("Panel"), ``silenceURL`` ("Silence"), ``imageURL`` ("Image").
    * ``tags``: ``<label>:<value>`` for the labels in :data:`TAG_LABELS`
      that are present; Grafana's ``DatasourceNoData`` / ``DatasourceError``
      alerts also get ``no_data`` / ``datasource_error``.

``datadog``
    The body of :data:`DATADOG_TEMPLATE` after Datadog substituted its
    variables. A value that is still a literal ``$VARIABLE`` counts as empty.

    * ``$ALERT_TRANSITION``: ``Triggered``/``Re-Triggered`` and ``Renotify``
      -> trigger with the severity of ``$ALERT_TYPE`` (``error`` -> error,
      raised to ``critical`` when ``$ALERT_PRIORITY`` is P1; ``warning`` ->
      warning; ``info``/``success`` -> info; empty or unknown -> error);
      ``Warn``/``Re-Warn`` -> trigger, warning; ``No Data``/``Re-No Data``
      -> trigger, warning, tag ``no_data``; ``Recovered`` -> resolve;
      ``Null`` -> no message. Anything else is a :class:`PayloadError`.
    * ``dedup_key``: ``$ALERT_CYCLE_KEY``, else ``$AGGREG_KEY``, else
      ``datadog-<$ALERT_ID>``.
    * ``event_id``: ``derive_id("datadog", $ID)``, else (no ``$ID``)
      ``derive_id("datadog", $ALERT_ID, $ALERT_TRANSITION, $DATE)``. Every
      Datadog notification is a new event with its own ``$ID``, so a
      *Renotify* counts an occurrence of the open case, while Datadog's own
      retry of the same notification is idempotent.
    * ``summary``: ``$EVENT_TITLE`` (else ``$ALERT_TITLE``, else
      ``Datadog monitor <id>``); ``source``: ``$HOSTNAME`` else
      ``datadog``; ``priority``: ``$ALERT_PRIORITY`` when P1..P5; ``tags``:
      ``$TAGS`` split on commas, trimmed, de-duplicated, at most 64;
      ``links``: ``$LINK`` ("Datadog"); ``timestamp``: ``$DATE`` (epoch
      milliseconds; a number below 1e11 is taken as seconds; an ISO 8601
      string is accepted too); ``custom_details``: the message, ids,
      transition, hostname, ... (the non-empty template fields).

``events``
    The canonical intake JSON itself: one object or a list of at most
    :data:`MAX_EVENTS` objects, passed through unchanged (the gateway
    validates each with ``intake.parse``).

Keys longer than 255 characters (a long ``groupKey``, ...) are replaced by
``sha256:<hex>`` of themselves, deterministically.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from streams.domain.intake import (
    MAX_DEDUP_KEY, MAX_SHORT, MAX_SUMMARY, MAX_TAGS, PRIORITIES, SEVERITIES, derive_id,
)

MONITOR_KINDS = ("pagerduty", "alertmanager", "grafana", "datadog", "events")

MAX_EVENTS = 1000          # canonical events per ``events`` request
MAX_GROUP_ALERTS = 100     # alerts listed in a group-mode message's custom_details
MAX_GROUP_LINKS = 20       # links of a group-mode message
DEFAULT_SEVERITY = "error"

# severity label value (lower-cased, trimmed) -> canonical severity
SEVERITY_ALIASES: dict[str, str] = {
    "critical": "critical", "crit": "critical", "page": "critical", "p1": "critical",
    "fatal": "critical", "emergency": "critical",
    "error": "error", "err": "error", "high": "error", "major": "error", "p2": "error",
    "warning": "warning", "warn": "warning", "medium": "warning", "minor": "warning", "p3": "warning",
    "info": "info", "informational": "info", "low": "info", "none": "info", "p4": "info", "p5": "info",
}

# labels that become "<label>:<value>" tags, in this order
TAG_LABELS = ("alertname", "severity", "cluster", "namespace", "job", "service", "team", "env", "environment",
              "grafana_folder")

_SEVERITY_RANK = {s: i for i, s in enumerate(reversed(SEVERITIES))}  # info 0 .. critical 3
_PD_ACTIONS = ("trigger", "acknowledge", "resolve")
_AM_STATUSES = ("firing", "resolved")
_UNSUBSTITUTED = re.compile(r"\$[A-Z][A-Z0-9_]*")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class PayloadError(ValueError):
    """The payload is malformed; ``errors`` are field-level:
    [{"field": "payload.summary", "message": "is required"}]."""

    def __init__(self, errors: list[dict]):
        self.errors = [{"field": e["field"], "message": e["message"]} for e in errors]
        super().__init__("; ".join(f"'{e['field']}' {e['message']}" for e in self.errors) or "invalid payload")


# The JSON payload users paste into Datadog's webhook integration ("Payload"
# field). Datadog substitutes the $VARIABLES; see the module docstring for how
# each field is used. Fields left out of a user's copy count as empty.
DATADOG_TEMPLATE: dict = {
    "id": "$ID",
    "alert_id": "$ALERT_ID",
    "transition": "$ALERT_TRANSITION",
    "aggreg_key": "$AGGREG_KEY",
    "alert_cycle_key": "$ALERT_CYCLE_KEY",
    "priority": "$ALERT_PRIORITY",
    "alert_type": "$ALERT_TYPE",
    "title": "$EVENT_TITLE",
    "message": "$EVENT_MSG",
    "tags": "$TAGS",
    "hostname": "$HOSTNAME",
    "link": "$LINK",
    "date": "$DATE",
    "alert_title": "$ALERT_TITLE",
    "alert_status": "$ALERT_STATUS",
    "alert_scope": "$ALERT_SCOPE",
    "alert_metric": "$ALERT_METRIC",
    "alert_query": "$ALERT_QUERY",
    "event_type": "$EVENT_TYPE",
    "org_id": "$ORG_ID",
    "org_name": "$ORG_NAME",
}


def translate(kind: str, body: object, options: dict | None = None) -> list[dict]:
    """Canonical intake messages (dicts, to be JSON-encoded and published) for one webhook body (already JSON-decoded).

    ``options``: ``{"dedup_by": "alert" | "group"}`` (Alertmanager and
    Grafana; default ``alert``). Raises :class:`PayloadError` for a malformed
    body, ``ValueError`` for an unknown kind or invalid options.
    """
    if kind not in MONITOR_KINDS:
        raise ValueError(f"unknown monitor kind {kind!r}; use one of {', '.join(MONITOR_KINDS)}")
    opts = dict(options or {})
    unknown = sorted(set(opts) - {"dedup_by"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; the only option is 'dedup_by'")
    dedup_by = opts.get("dedup_by") or "alert"
    if dedup_by not in ("alert", "group"):
        raise ValueError(f"option 'dedup_by' must be 'alert' or 'group', got {dedup_by!r}")
    if kind == "pagerduty":
        return _pagerduty(body)
    if kind in ("alertmanager", "grafana"):
        return _alertmanager(kind, body, dedup_by)
    if kind == "datadog":
        return _datadog(body)
    return _events(body)


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------


class _Errors:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, field: str, message: str) -> None:
        self.items.append({"field": field, "message": message})

    def raise_any(self) -> None:
        if self.items:
            raise PayloadError(self.items)


def _bounded_key(key: str) -> str:
    """``key`` itself, or ``sha256:<hex>`` of it when longer than a dedup key may be."""
    if len(key) <= MAX_DEDUP_KEY:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _parse_time(value: str) -> datetime | None:
    """An ISO 8601 / RFC 3339 string as an aware datetime (UTC when it has no
    offset); None when it is not one."""
    try:
        dt = datetime.fromisoformat(value.strip())
    except (ValueError, AttributeError):
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _rfc3339(dt: datetime) -> str:
    us = dt.microsecond
    spec = "seconds" if us == 0 else "milliseconds" if us % 1000 == 0 else "microseconds"
    s = dt.isoformat(timespec=spec)
    return s[:-6] + "Z" if s.endswith("+00:00") else s


def _is_zero_time(dt: datetime) -> bool:
    return dt.year <= 1  # Go's zero time.Time: "0001-01-01T00:00:00Z"


def _cut(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[:limit]


def _compact(msg: dict) -> dict:
    """The message without None fields."""
    return {k: v for k, v in msg.items() if v is not None}


def _canonical_json(value: Any) -> bytes:
    """``value`` as JSON with sorted keys (the same bytes for the same value)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits from a lenient decoder
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _add_link(links: list[dict], href: Any, text: str | None) -> None:
    if isinstance(href, str) and href.strip() and all(link["href"] != href for link in links):
        links.append({"href": href, "text": text})


# --------------------------------------------------------------------------
# PagerDuty Events API v2
# --------------------------------------------------------------------------


def _pd_str(obj: dict, key: str, path: str, errs: _Errors, *, required: bool = False,
            limit: int = MAX_SHORT) -> str | None:
    v = obj.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            errs.add(path, "is missing or blank")
        return None
    if not isinstance(v, str):
        errs.add(path, "must be a string")
        return None
    if len(v) > limit:
        errs.add(path, f"is too long (maximum is {limit} characters, got {len(v)})")
        return None
    return v


def _pd_objects(body: dict, name: str, fields: tuple[tuple[str, bool, int], ...], errs: _Errors) -> list[dict]:
    """The valid objects of the optional array ``body[name]`` (each {field: str}); errors per element."""
    raw = body.get(name)
    if raw is None:
        return []
    shape = "{" + ", ".join(f for f, _, _ in fields) + "}"
    if not isinstance(raw, list):
        errs.add(name, f"must be an array of {shape}")
        return []
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            errs.add(f"{name}[{i}]", f"must be an object {shape}")
            continue
        values = {f: _pd_str(item, f, f"{name}[{i}].{f}", errs, required=req, limit=limit) for f, req, limit in fields}
        if values[fields[0][0]] is not None:
            out.append(values)
    return out


def _pagerduty(body: object) -> list[dict]:
    errs = _Errors()
    if not isinstance(body, dict):
        errs.add("body", "must be a JSON object (an Events API v2 event)")
        errs.raise_any()
    assert isinstance(body, dict)
    action = body.get("event_action")
    if action is None or (isinstance(action, str) and not action.strip()):
        errs.add("event_action", "is missing or blank")
        action = None
    elif action not in _PD_ACTIONS:
        errs.add("event_action", "is invalid (must be one of the following: 'trigger', 'acknowledge' or 'resolve')")
        action = None
    dedup_key = _pd_str(body, "dedup_key", "dedup_key", errs, required=action in ("acknowledge", "resolve"),
                        limit=MAX_DEDUP_KEY)
    if action != "trigger":
        errs.raise_any()  # a missing or invalid event_action is among the errors
        return [{"action": action, "dedup_key": dedup_key}]

    payload = body.get("payload")
    msg: dict[str, Any] = {"action": "trigger"}
    details: Any = None
    if payload is None:
        errs.add("payload", "is missing or blank")
    elif not isinstance(payload, dict):
        errs.add("payload", "must be an object")
    else:
        msg["summary"] = _pd_str(payload, "summary", "payload.summary", errs, required=True, limit=MAX_SUMMARY)
        msg["source"] = _pd_str(payload, "source", "payload.source", errs, required=True)
        sev = payload.get("severity")
        if sev is None or (isinstance(sev, str) and not sev.strip()):
            errs.add("payload.severity", "is missing or blank")
        elif sev not in SEVERITIES:
            errs.add("payload.severity",
                     "is invalid (must be one of the following: 'critical', 'warning', 'error' or 'info')")
        else:
            msg["severity"] = sev
        ts = payload.get("timestamp")
        if ts is not None:
            dt = _parse_time(ts) if isinstance(ts, str) else None
            if dt is None:
                errs.add("payload.timestamp", "is invalid (must be an ISO 8601 date-time, e.g. "
                                              "2026-11-24T10:00:00.000+0000)")
            else:
                msg["timestamp"] = _rfc3339(dt)
        for f in ("component", "group", "class"):
            msg[f] = _pd_str(payload, f, f"payload.{f}", errs)
        raw_details = payload.get("custom_details")
        if raw_details is not None:
            details = dict(raw_details) if isinstance(raw_details, dict) else {"details": raw_details}

    links = [{"href": o["href"], "text": o.get("text")}
             for o in _pd_objects(body, "links", (("href", True, 2048), ("text", False, 1024)), errs)]
    images = [_compact(o) for o in _pd_objects(body, "images", (("src", True, 2048), ("href", False, 2048),
                                                                ("alt", False, 1024)), errs)]
    client = _pd_str(body, "client", "client", errs)
    client_url = _pd_str(body, "client_url", "client_url", errs, limit=2048)
    errs.raise_any()

    if client_url is not None:
        _add_link(links, client_url, client)
    if images:
        details = {**(details or {}), "images": images}
    msg["dedup_key"] = dedup_key  # None: the record's id (streams.domain.intake.record_event_id)
    msg["custom_details"] = details
    msg["links"] = links or None
    return [_compact(msg)]


# --------------------------------------------------------------------------
# Alertmanager (webhook v4) and Grafana Alerting
# --------------------------------------------------------------------------


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _opt_text(obj: dict, key: str, path: str, errs: _Errors) -> str | None:
    """An optional string field (None when absent or null); a wrong type is an error."""
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        errs.add(path, "must be a string")
        return None
    return v


def _map_severity(value: Any) -> str:
    if isinstance(value, str):
        return SEVERITY_ALIASES.get(value.strip().lower(), DEFAULT_SEVERITY)
    return DEFAULT_SEVERITY


def _labels_key(labels: dict) -> str:
    return "labels-" + hashlib.sha256(_canonical_json(labels)).hexdigest()[:16]


def _label_fields(kind: str, labels: dict) -> dict:
    def first(*names: str) -> str | None:
        for n in names:
            v = labels.get(n)
            if isinstance(v, str) and v.strip():
                return _cut(v, MAX_SHORT)
        return None

    return {
        "source": first("instance", "job") or kind,
        "component": first("job", "service"),
        "group": first("cluster", "namespace", *(("grafana_folder",) if kind == "grafana" else ())),
        "class": first("alertname"),
    }


def _label_tags(kind: str, labels: dict) -> list[str]:
    tags = []
    for name in TAG_LABELS:
        v = labels.get(name)
        if isinstance(v, str) and v.strip():
            tags.append(_cut(f"{name}:{v}", MAX_SHORT))
    if kind == "grafana":
        if labels.get("alertname") == "DatasourceNoData":
            tags.append("no_data")
        elif labels.get("alertname") == "DatasourceError":
            tags.append("datasource_error")
    return list(dict.fromkeys(tags))[:MAX_TAGS]


def _summary(annotations: dict, labels: dict) -> str | None:
    for v in (annotations.get("summary"), annotations.get("description"), labels.get("alertname")):
        if isinstance(v, str) and v.strip():
            return _cut(v, MAX_SUMMARY)
    return None


class _Alert:
    """One validated alert of a notification."""

    def __init__(self, index: int, a: dict, errs: _Errors, kind: str) -> None:
        p = f"alerts[{index}]"
        labels = a.get("labels")
        if labels is None:
            errs.add(f"{p}.labels", "is missing")
        elif not _str_map(labels):
            errs.add(f"{p}.labels", "must be an object of strings")
        self.labels: dict = labels if _str_map(labels) else {}
        annotations = a.get("annotations")
        if annotations is not None and not _str_map(annotations):
            errs.add(f"{p}.annotations", "must be an object of strings")
        self.annotations: dict = annotations if _str_map(annotations) else {}
        status = a.get("status")
        if status is None or (isinstance(status, str) and not status.strip()):
            errs.add(f"{p}.status", "is missing or blank")
        elif status not in _AM_STATUSES:
            errs.add(f"{p}.status", "is invalid (must be one of the following: 'firing' or 'resolved')")
        self.status: str = status if status in _AM_STATUSES else ""
        self.starts_raw = _opt_text(a, "startsAt", f"{p}.startsAt", errs) or ""
        self.ends_raw = _opt_text(a, "endsAt", f"{p}.endsAt", errs) or ""
        self.starts = self._time(self.starts_raw, f"{p}.startsAt", errs)
        self.ends = self._time(self.ends_raw, f"{p}.endsAt", errs)
        fp = _opt_text(a, "fingerprint", f"{p}.fingerprint", errs)
        self.fingerprint = fp if fp and fp.strip() else None
        self.urls = {k: _opt_text(a, k, f"{p}.{k}", errs)
                     for k in ("generatorURL", "dashboardURL", "panelURL", "silenceURL", "imageURL")}
        self.values = None
        self.value_string = None
        if kind == "grafana":
            values = a.get("values")
            if values is not None and not isinstance(values, dict):
                errs.add(f"{p}.values", "must be an object")
            elif values:
                self.values = values
            self.value_string = _opt_text(a, "valueString", f"{p}.valueString", errs) or None

    @staticmethod
    def _time(raw: str, path: str, errs: _Errors) -> datetime | None:
        if not raw:
            return None
        dt = _parse_time(raw)
        if dt is None:
            errs.add(path, "is not an RFC 3339 timestamp")
            return None
        return None if _is_zero_time(dt) else dt

    @property
    def key(self) -> str:
        return self.fingerprint or _labels_key(self.labels)

    @property
    def action(self) -> str:
        return "trigger" if self.status == "firing" else "resolve"

    @property
    def time(self) -> datetime | None:
        return self.starts if self.status == "firing" else self.ends

    def id_parts(self) -> list[str]:
        parts = [self.key, self.status, self.starts_raw]
        if self.status == "resolved":
            parts.append(self.ends_raw)
        return parts


def _alertmanager(kind: str, body: object, dedup_by: str) -> list[dict]:
    errs = _Errors()
    if not isinstance(body, dict):
        errs.add("body", "must be a JSON object (a webhook notification)")
        errs.raise_any()
    assert isinstance(body, dict)
    raw_alerts = body.get("alerts")
    alerts: list[_Alert] = []
    if raw_alerts is None:
        errs.add("alerts", "is missing")
    elif not isinstance(raw_alerts, list):
        errs.add("alerts", "must be an array of alerts")
    else:
        for i, a in enumerate(raw_alerts):
            if not isinstance(a, dict):
                errs.add(f"alerts[{i}]", "must be an object")
            else:
                alerts.append(_Alert(i, a, errs, kind))
    receiver = _opt_text(body, "receiver", "receiver", errs)
    group_key = _opt_text(body, "groupKey", "groupKey", errs)
    external_url = _opt_text(body, "externalURL", "externalURL", errs)
    truncated = body.get("truncatedAlerts")
    if truncated is not None and (isinstance(truncated, bool) or not isinstance(truncated, int)):
        errs.add("truncatedAlerts", "must be an integer")
        truncated = None
    for name in ("groupLabels", "commonLabels", "commonAnnotations"):
        v = body.get(name)
        if v is not None and not _str_map(v):
            errs.add(name, "must be an object of strings")
    org_id = body.get("orgId") if kind == "grafana" else None
    if dedup_by == "group" and not (group_key and group_key.strip()):
        errs.add("groupKey", "is missing or blank (required when dedup_by is 'group')")
    errs.raise_any()

    common = {
        "receiver": receiver, "group_key": group_key, "external_url": external_url,
        "truncated": truncated or 0, "org_id": org_id if isinstance(org_id, (int, str)) else None,
    }
    if dedup_by == "group":
        return [] if not alerts else [_group_message(kind, body, alerts, common)]
    return [_alert_message(kind, a, common) for a in alerts]


def _details(kind: str, common: dict, labels: dict, annotations: dict) -> dict:
    d: dict[str, Any] = {"labels": labels, "annotations": annotations, "receiver": common["receiver"],
                         "group_key": common["group_key"]}
    if common["truncated"]:
        d["truncated_alerts"] = common["truncated"]
    if kind == "grafana" and common["org_id"] is not None:
        d["org_id"] = common["org_id"]
    return d


def _alert_links(kind: str, a: _Alert, links: list[dict]) -> None:
    _add_link(links, a.urls["generatorURL"], "Source")
    if kind == "grafana":
        _add_link(links, a.urls["dashboardURL"], "Dashboard")
        _add_link(links, a.urls["panelURL"], "Panel")
        _add_link(links, a.urls["silenceURL"], "Silence")
        _add_link(links, a.urls["imageURL"], "Image")


def _alert_message(kind: str, a: _Alert, common: dict) -> dict:
    details = _details(kind, common, a.labels, a.annotations)
    if a.values is not None:
        details["values"] = a.values
    if a.value_string is not None:
        details["value_string"] = a.value_string
    links: list[dict] = []
    _alert_links(kind, a, links)
    _add_link(links, common["external_url"], "Grafana" if kind == "grafana" else "Alertmanager")
    _add_link(links, a.annotations.get("runbook_url"), "Runbook")
    t = a.time
    msg = {
        "action": a.action,
        "event_id": derive_id(kind, *a.id_parts()),
        "dedup_key": _bounded_key(a.key),
        "summary": _summary(a.annotations, a.labels) or f"{kind} alert {a.key}",
        "severity": _map_severity(a.labels.get("severity")),
        "timestamp": _rfc3339(t) if t is not None else None,
        **_label_fields(kind, a.labels),
        "custom_details": details,
        "links": links,
        "tags": _label_tags(kind, a.labels),
    }
    return _compact(msg)


def _group_message(kind: str, body: dict, alerts: list[_Alert], common: dict) -> dict:
    """One message for the whole notification (``dedup_by: group``).

    trigger when any alert is firing, else resolve; ``dedup_key`` the
    ``groupKey``; ``event_id`` from the group key and every alert's state (a
    repeated notification of the same states is idempotent, a changed alert
    set is a new occurrence); ``severity`` the worst of the firing alerts
    (of all alerts when resolving); ``timestamp`` the earliest ``startsAt``
    of the firing alerts, or the latest ``endsAt`` when resolving; fields and
    tags from ``commonLabels``; summary Grafana's ``title``, else
    ``commonAnnotations.summary``/``description``, else
    ``[FIRING:n] <group label values>``; the alerts (at most 100) are listed
    in ``custom_details.alerts``.
    """
    firing = [a for a in alerts if a.status == "firing"]
    action = "trigger" if firing else "resolve"
    relevant = firing or alerts
    common_labels = body.get("commonLabels") or {}
    common_annotations = body.get("commonAnnotations") or {}
    group_labels = body.get("groupLabels") or {}
    group_key = common["group_key"]

    states = sorted("\x1f".join(a.id_parts()) for a in alerts)
    event_id = derive_id(kind, "group", group_key, action, *states)
    severity = max((_map_severity(a.labels.get("severity")) for a in relevant), key=_SEVERITY_RANK.__getitem__)
    if action == "trigger":
        times = [a.starts for a in firing if a.starts is not None]
        t = min(times) if times else None
    else:
        times = [a.ends for a in alerts if a.ends is not None]
        t = max(times) if times else None

    summary = None
    title = body.get("title") if kind == "grafana" else None
    for v in (title, common_annotations.get("summary"), common_annotations.get("description")):
        if isinstance(v, str) and v.strip():
            summary = _cut(v, MAX_SUMMARY)
            break
    if summary is None:
        label_text = " ".join(v for v in group_labels.values() if v) or common_labels.get("alertname") or group_key
        summary = _cut(f"[{'FIRING' if firing else 'RESOLVED'}:{len(relevant)}] {label_text}", MAX_SUMMARY)

    details = _details(kind, common, common_labels, common_annotations)
    details["group_labels"] = group_labels
    listed = []
    for a in alerts[:MAX_GROUP_ALERTS]:
        item = {"fingerprint": a.key, "status": a.status, "labels": a.labels, "annotations": a.annotations,
                "starts_at": a.starts_raw or None, "ends_at": a.ends_raw or None,
                "generator_url": a.urls["generatorURL"]}
        if a.values is not None:
            item["values"] = a.values
        if a.value_string is not None:
            item["value_string"] = a.value_string
        listed.append(_compact(item))
    details["alerts"] = listed
    if len(alerts) > MAX_GROUP_ALERTS:
        details["alerts_omitted"] = len(alerts) - MAX_GROUP_ALERTS
    if kind == "grafana" and isinstance(body.get("message"), str):
        details["message"] = body["message"]

    links: list[dict] = []
    _add_link(links, common["external_url"], "Grafana" if kind == "grafana" else "Alertmanager")
    _add_link(links, common_annotations.get("runbook_url"), "Runbook")
    for a in relevant:
        if len(links) >= MAX_GROUP_LINKS:
            break
        _alert_links(kind, a, links)
    links = links[:MAX_GROUP_LINKS]

    msg = {
        "action": action,
        "event_id": event_id,
        "dedup_key": _bounded_key(group_key),
        "summary": summary,
        "severity": severity,
        "timestamp": _rfc3339(t) if t is not None else None,
        **_label_fields(kind, common_labels),
        "custom_details": details,
        "links": links,
        "tags": _label_tags(kind, common_labels),
    }
    return _compact(msg)


# --------------------------------------------------------------------------
# Datadog
# --------------------------------------------------------------------------

# normalized $ALERT_TRANSITION -> (action, fixed severity or None, extra tag)
_DD_TRANSITIONS: dict[str, tuple[str | None, str | None, str | None]] = {
    "triggered": ("trigger", None, None),
    "re-triggered": ("trigger", None, None),
    "renotify": ("trigger", None, None),
    "warn": ("trigger", "warning", None),
    "re-warn": ("trigger", "warning", None),
    "no data": ("trigger", "warning", "no_data"),
    "re-no data": ("trigger", "warning", "no_data"),
    "recovered": ("resolve", None, None),
    "null": (None, None, None),
}
_DD_ALERT_TYPES = {"error": "error", "warning": "warning", "info": "info", "success": "info"}
_DD_DETAIL_FIELDS = ("message", "alert_id", "transition", "hostname", "alert_type", "priority", "aggreg_key",
                     "alert_cycle_key", "id", "date", "alert_title", "alert_status", "alert_scope", "alert_metric",
                     "alert_query", "event_type", "org_id", "org_name")


def _dd_value(body: dict, key: str, errs: _Errors) -> str:
    """A template field as a trimmed string; "" when absent, null or an unsubstituted ``$VARIABLE``."""
    v = body.get(key)
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        errs.add(key, "must be a string")
        return ""
    s = str(v).strip()
    return "" if _UNSUBSTITUTED.fullmatch(s) else s


def _dd_date(raw: str) -> datetime | None:
    """``$DATE``: epoch milliseconds (as Datadog documents it); a number below
    1e11 is taken as epoch seconds (1e11 ms is 1973, 1e11 s is year 5138); an
    ISO 8601 string is accepted too."""
    if re.fullmatch(r"\d{1,15}(\.\d+)?", raw):
        n = int(raw) if raw.isdigit() else float(raw)
        ms = round(n) if n >= 1e11 else round(n * 1000)
        try:
            return _EPOCH + timedelta(milliseconds=ms)
        except OverflowError:
            return None
    return _parse_time(raw) if re.match(r"\d{4}-", raw) else None


def _dd_tags(body: dict, errs: _Errors) -> list[str]:
    v = body.get("tags")
    if v is None:
        return []
    if isinstance(v, str):
        parts = [] if _UNSUBSTITUTED.fullmatch(v.strip()) else v.split(",")
    elif isinstance(v, list) and all(isinstance(t, str) for t in v):
        parts = v
    else:
        errs.add("tags", "must be a comma-separated string (or an array of strings)")
        return []
    tags = [_cut(t.strip(), MAX_SHORT) for t in parts]
    return list(dict.fromkeys(t for t in tags if t and not _UNSUBSTITUTED.fullmatch(t)))


def _datadog(body: object) -> list[dict]:
    errs = _Errors()
    if not isinstance(body, dict):
        errs.add("body", "must be a JSON object (the casestream Datadog webhook payload)")
        errs.raise_any()
    assert isinstance(body, dict)
    f = {k: _dd_value(body, k, errs) for k in DATADOG_TEMPLATE if k != "tags"}
    tags = _dd_tags(body, errs)
    transition = f["transition"]
    mapping = _DD_TRANSITIONS.get(transition.lower())
    if not transition:
        errs.add("transition", "is missing or blank ($ALERT_TRANSITION)")
    elif mapping is None:
        errs.add("transition", "is invalid (must be one of the following: 'Triggered', 'Re-Triggered', 'Warn', "
                               "'Re-Warn', 'No Data', 'Re-No Data', 'Renotify', 'Recovered' or 'Null')")
    dedup = f["alert_cycle_key"] or f["aggreg_key"] or (f"datadog-{f['alert_id']}" if f["alert_id"] else "")
    if not dedup:
        errs.add("alert_id", "is missing or blank (needed when alert_cycle_key and aggreg_key are empty)")
    when = None
    if f["date"]:
        when = _dd_date(f["date"])
        if when is None:
            errs.add("date", "is invalid (must be epoch milliseconds, as $DATE, or an ISO 8601 date-time)")
    errs.raise_any()
    assert mapping is not None
    action, fixed_severity, extra_tag = mapping
    if action is None:
        return []  # "Null": no alert state change to report

    if f["id"]:
        event_id = derive_id("datadog", f["id"])
    else:
        event_id = derive_id("datadog", f["alert_id"], transition, f["date"])
    priority = f["priority"].upper() if f["priority"].upper() in PRIORITIES else None
    severity = None
    if action == "trigger":
        severity = fixed_severity or _DD_ALERT_TYPES.get(f["alert_type"].lower(), DEFAULT_SEVERITY)
        if severity == "error" and priority == "P1":
            severity = "critical"
    if extra_tag:
        tags = [extra_tag] + [t for t in tags if t != extra_tag]
    tags = tags[:MAX_TAGS]
    summary = f["title"] or f["alert_title"] or f"Datadog monitor {f['alert_id'] or dedup}"
    details = {k: f[k] for k in _DD_DETAIL_FIELDS if f[k]}
    links: list[dict] = []
    _add_link(links, f["link"], "Datadog")
    msg = {
        "action": action,
        "event_id": event_id,
        "dedup_key": _bounded_key(dedup),
        "summary": _cut(summary, MAX_SUMMARY),
        "severity": severity,
        "timestamp": _rfc3339(when) if when is not None else None,
        "source": _cut(f["hostname"], MAX_SHORT) or "datadog",
        "priority": priority,
        "custom_details": details,
        "links": links,
        "tags": tags,
    }
    return [_compact(msg)]


# --------------------------------------------------------------------------
# canonical events
# --------------------------------------------------------------------------


def _events(body: object) -> list[dict]:
    if isinstance(body, dict):
        return [body]
    if not isinstance(body, list):
        raise PayloadError([{"field": "body", "message": "must be an event object or an array of event objects"}])
    if len(body) > MAX_EVENTS:
        raise PayloadError([{"field": "body",
                             "message": f"has {len(body)} events; the limit is {MAX_EVENTS} per request"}])
    errors = [{"field": f"[{i}]", "message": "must be an object"} for i, e in enumerate(body)
              if not isinstance(e, dict)]
    if errors:
        raise PayloadError(errors)
    return list(body)
