"""Per-tenant on-call configuration: ``<config_dir>/oncall/<tenant>.yaml``.

One file per tenant; every section is optional::

    ack_timeout: 30m          # acknowledged pages return to TRIGGERED after this; 0 or off disables
    users:                    # the directory of people (names/emails are PII)
      u-alice: {name: Alice Example, email: alice@example.com, contact: {slack: "@alice"}}
    teams:
      sre: [u-alice]
    schedules: {...}          # streams.domain.schedules.parse_schedule's format, keyed by id
    escalation_policies: {...}  # streams.domain.escalation.parse_policy's format, keyed by id
    routing_rules: [...]      # first match wins: {id, match, escalation_policy, urgency}
    automation_rules: [...]   # {id, trigger, to_status, count, sla, conditions, actions}
    slas: {...}               # streams.domain.sla.parse_slas's format

Validation happens at load and every error reads ``<file>:<line>: <message>``.
The pure parsers (schedules, policies, SLAs) name a dotted field path such as
``schedules.primary.layers[0].shift_length``; that path is followed through
the YAML node tree to the line it came from.

``ConfigWatcher`` holds the current configuration of one tenant and reloads
it when the file changes (``check()``, cheap: one ``stat``) or on request
(``reload()``, e.g. on SIGHUP). An invalid new file never replaces a valid
running configuration.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any, Callable


from streams.domain.oncall import matches  # the one definition of a rule match
from streams.config import ConfigError, Tenant, Node, compose_yaml
from streams.domain.escalation import Directory, Policy, PolicyError, parse_policy
from streams.domain.intake import PRIORITIES, SEVERITIES, URGENCIES
from streams.domain.schedules import Schedule, ScheduleError, parse_duration, parse_schedule
from streams.domain.sla import KINDS as SLA_KINDS
from streams.domain.sla import Sla, SlaError, parse_slas

log = logging.getLogger("casestream.config")

DEFAULT_ACK_TIMEOUT_SECONDS = 1800
TOP_KEYS = ("ack_timeout", "users", "teams", "schedules", "escalation_policies", "routing_rules",
            "automation_rules", "slas", "subscriptions", "endpoints", "notification_rules", "delivery")
ENDPOINT_KEYS = ("type", "url", "secret", "secret_env", "description")
CHANNELS = ("webhook", "slack")
NOTIFICATION_RULE_KEYS = ("id", "description", "event_types", "match", "endpoints")
DELIVERY_KEYS = ("timeout", "retry_window", "max_backoff", "disable_after", "breaker_failures", "breaker_open",
                 "allow_networks", "allow_http")
SUBSCRIPTION_KEYS = ("id", "description", "format", "event_types", "match")
RELAY_FORMATS = ("avro", "json")
SUBSCRIPTION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # part of a topic name
MATCH_KEYS = ("source", "component", "group", "class", "project", "severity", "priority", "urgency",
              "status", "tags")
USER_KEYS = ("name", "email", "contact")
ROUTING_KEYS = ("id", "description", "match", "escalation_policy", "urgency")
AUTOMATION_KEYS = ("id", "description", "trigger", "to_status", "count", "sla", "conditions", "actions")
TRIGGERS = ("case_created", "status_changed", "occurrence_count", "sla_breached")
ACTIONS = ("set_priority", "assign", "comment", "set_status", "page")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")


# --------------------------------------------------------------------------
# the loaded configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: str
    name: str | None = None
    email: str | None = None
    contact: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RoutingRule:
    id: str
    match: dict[str, tuple[str, ...]]
    escalation_policy_id: str
    urgency: str | None = None


@dataclass(frozen=True)
class AutomationRule:
    id: str
    trigger: str
    to_status: str | None
    count: int | None
    sla: str | None
    conditions: dict[str, tuple[str, ...]]
    actions: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Subscription:
    """A relay subscription: matching domain events are copied to ``<tenant>.relay.<id>``."""

    id: str
    format: str                                    # avro | json
    event_types: tuple[str, ...]                   # empty: every type
    match: dict[str, tuple[str, ...]]              # on the case as it is after the event


@dataclass(frozen=True)
class Endpoint:
    """Where notifications go: a generic webhook (JSON, signed when it has a secret) or Slack."""

    name: str
    channel: str                                   # webhook | slack
    url: str
    secret: str | None = None                      # HMAC-SHA256 signing secret (webhooks)


@dataclass(frozen=True)
class NotificationRule:
    id: str
    event_types: tuple[str, ...]                   # empty: every type
    match: dict[str, tuple[str, ...]]              # on the case after the event
    endpoints: tuple[str, ...]


@dataclass(frozen=True)
class DeliverySettings:
    timeout: float = 5.0                           # a 2xx within this is success
    retry_window: float = 86400.0                  # retry for this long after the first attempt
    max_backoff: float = 3600.0
    disable_after: int = 5                         # permanent failures in a row disable an endpoint
    breaker_failures: int = 5                      # consecutive failures that open an endpoint's breaker
    breaker_open: float = 60.0                     # seconds before a probe
    allow_networks: tuple[str, ...] = ()           # CIDRs / hosts exempt from the private-address block
    allow_http: bool = False                       # plain http (tests, internal receivers)


@dataclass(frozen=True)
class OnCallConfig:
    tenant: str
    users: dict[str, User]
    directory: Directory
    policies: dict[str, Policy]
    routing_rules: tuple[RoutingRule, ...]
    automation_rules: tuple[AutomationRule, ...]
    slas: dict[str, Sla]
    ack_timeout_seconds: int | None
    source: str | None
    digest: str
    subscriptions: tuple[Subscription, ...] = ()
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    notification_rules: tuple[NotificationRule, ...] = ()
    delivery: DeliverySettings = DeliverySettings()

    def user_endpoints(self, user_id: str) -> list[Endpoint]:
        """A person's contact methods (``contact: {webhook: url, slack: url}``) as endpoints."""
        user = self.users.get(user_id)
        contact = user.contact if user else {}
        return [Endpoint(f"user:{user_id}:{ch}", ch, contact[ch]) for ch in CHANNELS
                if isinstance(contact.get(ch), str) and contact[ch]]

    def route(self, record: dict) -> RoutingRule | None:
        """The first routing rule whose ``match`` fits ``record`` (None when none does)."""
        for rule in self.routing_rules:
            if matches(rule.match, record):
                return rule
        return None


def empty_config(tenant: Tenant) -> OnCallConfig:
    """Nothing configured (no file): no routing, no automation, ack timeout 30m."""
    return OnCallConfig(
        tenant=tenant.name, users={}, directory=Directory({}, {}), policies={}, routing_rules=(),
        automation_rules=(), slas={}, ack_timeout_seconds=DEFAULT_ACK_TIMEOUT_SECONDS, source=None, digest="",
    )


def oncall_path(config_dir: Path, tenant_name: str) -> Path:
    return Path(config_dir) / "oncall" / f"{tenant_name}.yaml"


def load_oncall(tenant: Tenant, path: Path) -> OnCallConfig:
    """Load and validate ``path``; a missing file is the empty configuration."""
    data = _read(Path(path))
    if data is None:
        return empty_config(tenant)
    return _parse(tenant, Path(path), data)


# --------------------------------------------------------------------------
# reading and parsing
# --------------------------------------------------------------------------


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the on-call config ({exc.strerror or exc}); "
                          f"make it a readable file") from None


def _compose(path: Path, data: bytes) -> Node | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    return compose_yaml(path, text)


def _plain(node: Node) -> Any:
    """The node tree as plain Python data (what the pure parsers take)."""
    v = node.value
    if isinstance(v, dict):
        return {k: _plain(c) for k, c in v.items()}
    if isinstance(v, list):
        return [_plain(c) for c in v]
    return v


_INDEX = re.compile(r"\[(\d+)\]")


def locate(root: Node, path: str) -> tuple[Node, int]:
    """Follow a dotted path (``a.b[0].c``) from ``root``: the deepest node reached and its line.

    Stepping into a mapping by key gives the key's line (a nested block
    mapping's own line is the line of its first key); stepping into a list
    gives the item's line. Keys may themselves contain dots: the longest key
    that fits is taken.
    """
    node, line, rest = root, root.line, path
    while rest:
        if rest[0] == ".":
            rest = rest[1:]
            continue
        m = _INDEX.match(rest)
        if m:
            i = int(m.group(1))
            if not isinstance(node.value, list) or i >= len(node.value):
                break
            node = node.value[i]
            line, rest = node.line, rest[m.end():]
            continue
        if not isinstance(node.value, dict):
            break
        best = None
        for k in node.value:
            if rest.startswith(k) and (len(rest) == len(k) or rest[len(k)] in ".[") \
                    and (best is None or len(k) > len(best)):
                best = k
        if best is None:
            break
        line = node.key_lines.get(best, node.value[best].line)
        node, rest = node.value[best], rest[len(best):]
    return node, line


class _Parser:
    def __init__(self, tenant: Tenant, path: Path, root: Node) -> None:
        self.tenant = tenant
        self.file = str(path)
        self.root = root

    # -- errors ------------------------------------------------------------

    def err(self, path: str, msg: str) -> ConfigError:
        """``msg`` at the line of ``path`` (a dotted path from the file's top)."""
        _, line = locate(self.root, path)
        return ConfigError(f"{self.file}:{line}: {msg}")

    def from_domain(self, exc: ValueError) -> ConfigError:
        """A pure parser's error (``<dotted path>: <message>``) at the line of that path."""
        msg = str(exc)
        if msg.endswith("known: "):
            msg += "(none defined)"
        path, sep, detail = msg.partition(": ")
        if not sep:
            return ConfigError(f"{self.file}:{self.root.line}: {msg}")
        node, line = locate(self.root, path)
        if detail.startswith("unknown keys ") and isinstance(node.value, dict):
            # point at the first offending key rather than at its mapping
            lines = [node.key_lines[k] for k in detail[len("unknown keys "):].split(", ") if k in node.key_lines]
            line = min(lines, default=line)
        return ConfigError(f"{self.file}:{line}: {msg}")

    # -- small validators (by path) ------------------------------------------

    def mapping(self, node: Node, path: str, hint: str) -> dict[str, Node]:
        if node.value is None:
            return {}
        if not isinstance(node.value, dict):
            raise self.err(path, f"{path}: must be a mapping, e.g. {hint}")
        return node.value

    def seq(self, node: Node, path: str, hint: str) -> list[Node]:
        if node.value is None:
            return []
        if not isinstance(node.value, list):
            raise self.err(path, f"{path}: must be a list, e.g. {hint}")
        return node.value

    def string(self, node: Node, path: str) -> str:
        if not isinstance(node.value, str) or not node.value.strip():
            quote = isinstance(node.value, (int, float, date))  # bool is an int: yes/no/on/off
            raise self.err(path, f"{path}: must be a non-empty string, got {node.value!r}"
                                 + ("; quote it, e.g. \"...\"" if quote else ""))
        return node.value

    def ident(self, key: str, parent_path: str, what: str) -> str:
        if not ID_RE.match(key):
            raise self.err(f"{parent_path}.{key}", f"{parent_path}.{key}: invalid {what} id {key!r}; use letters, "
                                                   f"digits and . _ @ + - (starting with a letter or digit)")
        return key

    def no_unknown(self, node: Node, path: str, allowed: tuple[str, ...]) -> None:
        for k in node.value:
            if k not in allowed:
                raise ConfigError(f"{self.file}:{node.key_lines.get(k, node.line)}: {path}: unknown key '{k}'; "
                                  f"allowed keys are {', '.join(allowed)}")

    def known(self, value: str, known, path: str, what: str, section: str) -> str:
        if value not in known:
            names = ", ".join(sorted(known)) or "none are defined"
            raise self.err(path, f"{path}: unknown {what} '{value}'; define it under '{section}:' "
                                 f"or use one of: {names}")
        return value

    # -- the file ---------------------------------------------------------------

    def parse(self, digest: str) -> OnCallConfig:
        root = self.root
        if not isinstance(root.value, dict):
            raise ConfigError(f"{self.file}:{root.line}: the on-call config must be a mapping with some of "
                              f"the keys {', '.join(TOP_KEYS)}")
        self.no_unknown(root, "on-call config", TOP_KEYS)
        top = root.value
        users = self.users(top.get("users"))
        teams = self.teams(top.get("teams"), users)
        schedules = self.schedules(top.get("schedules"), users)
        directory = Directory(schedules, teams)
        policies = self.policies(top.get("escalation_policies"), directory, users)
        routing = self.routing_rules(top.get("routing_rules"), policies)
        automation = self.automation_rules(top.get("automation_rules"), users, policies)
        slas = self.slas(top.get("slas"))
        ack = self.ack_timeout(top["ack_timeout"]) if "ack_timeout" in top else DEFAULT_ACK_TIMEOUT_SECONDS
        subscriptions = self.subscriptions(top.get("subscriptions"))
        endpoints = self.endpoints(top.get("endpoints"))
        rules = self.notification_rules(top.get("notification_rules"), endpoints)
        delivery = self.delivery(top.get("delivery"))
        return OnCallConfig(
            tenant=self.tenant.name, users=users, directory=directory, policies=policies,
            routing_rules=routing, automation_rules=automation, slas=slas, ack_timeout_seconds=ack,
            source=self.file, digest=digest, subscriptions=subscriptions, endpoints=endpoints,
            notification_rules=rules, delivery=delivery,
        )

    def endpoints(self, node: Node | None) -> dict[str, Endpoint]:
        if node is None:
            return {}
        out = {}
        for name, en in self.mapping(node, "endpoints", "{ops-webhook: {type: webhook, url: https://...}}").items():
            p = f"endpoints.{name}"
            if not ID_RE.match(name) or name.startswith("user:"):
                raise self.err(p, f"{p}: invalid endpoint name {name!r}; use letters, digits and . _ @ + -")
            m = self.mapping(en, p, "{type: webhook, url: https://..., secret_env: NAME}")
            self.no_unknown(en, p, ENDPOINT_KEYS)
            if "type" not in m or "url" not in m:
                raise self.err(p, f"{p}: needs type ({' or '.join(CHANNELS)}) and url")
            channel = self.string(m["type"], f"{p}.type")
            if channel not in CHANNELS:
                raise self.err(f"{p}.type", f"{p}.type: unknown type '{channel}'; use {' or '.join(CHANNELS)}")
            url = self.string(m["url"], f"{p}.url")
            if not re.match(r"^https?://[^/\s]+", url):
                raise self.err(f"{p}.url", f"{p}.url: an http(s) URL, e.g. https://hooks.example.com/casestream")
            secret = None
            if "secret" in m and "secret_env" in m:
                raise self.err(f"{p}.secret", f"{p}: give secret or secret_env, not both")
            if "secret" in m:
                secret = self.string(m["secret"], f"{p}.secret")
            elif "secret_env" in m:
                var = self.string(m["secret_env"], f"{p}.secret_env")
                secret = os.environ.get(var)
                if not secret:
                    raise self.err(f"{p}.secret_env", f"{p}.secret_env: environment variable {var} is not set; "
                                                      f"set it for the worker or remove the key")
            out[name] = Endpoint(name, channel, url, secret)
        return out

    def notification_rules(self, node: Node | None, endpoints: dict[str, Endpoint]
                           ) -> tuple[NotificationRule, ...]:
        if node is None:
            return ()
        items = self.seq(node, "notification_rules", "[{id: pages, endpoints: [ops-webhook]}]")
        out = []
        for i, (rid, rn) in enumerate(zip(self.rule_ids(items, "notification_rules"), items)):
            p = f"notification_rules[{i}]"
            self.no_unknown(rn, p, NOTIFICATION_RULE_KEYS)
            m = rn.value
            types = self.event_types(m, p)
            if "endpoints" not in m or not isinstance(m["endpoints"].value, list) or not m["endpoints"].value:
                raise self.err(p, f"{p}: rule '{rid}' needs endpoints: a list of names from the endpoints section")
            names = tuple(self.known(self.string(v, f"{p}.endpoints[{j}]"), endpoints, f"{p}.endpoints[{j}]",
                                     "endpoint", "endpoints") for j, v in enumerate(m["endpoints"].value))
            out.append(NotificationRule(rid, tuple(types), self.criteria(m.get("match"), f"{p}.match"), names))
        return tuple(out)

    def delivery(self, node: Node | None) -> DeliverySettings:
        if node is None:
            return DeliverySettings()
        m = self.mapping(node, "delivery", "{timeout: 5s, retry_window: 24h}")
        self.no_unknown(node, "delivery", DELIVERY_KEYS)
        kw: dict = {}
        for key in ("timeout", "retry_window", "max_backoff", "breaker_open"):
            if key in m:
                try:
                    kw[key] = float(parse_duration(m[key].value, f"delivery.{key}"))
                except ScheduleError as exc:
                    raise self.from_domain(exc) from None
        for key in ("disable_after", "breaker_failures"):
            if key in m:
                v = m[key].value
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
                    raise self.err(f"delivery.{key}", f"delivery.{key}: an integer from 1 to 1000, got {v!r}")
                kw[key] = v
        if "allow_networks" in m:
            vals = m["allow_networks"].value
            if not isinstance(vals, list):
                raise self.err("delivery.allow_networks", "delivery.allow_networks: a list of CIDRs or host names")
            kw["allow_networks"] = tuple(self.string(v, f"delivery.allow_networks[{j}]") for j, v in enumerate(vals))
        if "allow_http" in m:
            if not isinstance(m["allow_http"].value, bool):
                raise self.err("delivery.allow_http", "delivery.allow_http: true or false")
            kw["allow_http"] = m["allow_http"].value
        return DeliverySettings(**kw)

    def event_types(self, m: dict[str, Node], p: str) -> tuple[str, ...]:
        """``<p>.event_types``: a non-empty list of known domain event types (absent: every type)."""
        from streams.domain.cases import EVENT_TYPES

        if "event_types" not in m:
            return ()
        tn = m["event_types"]
        if not isinstance(tn.value, list) or not tn.value:
            raise self.err(f"{p}.event_types", f"{p}.event_types: a non-empty list of event types, or "
                                               f"remove the key for every type")
        types = []
        for j, v in enumerate(tn.value):
            t = self.string(v, f"{p}.event_types[{j}]")
            if t not in EVENT_TYPES:
                raise self.err(f"{p}.event_types[{j}]", f"{p}.event_types[{j}]: unknown event type '{t}'; "
                                                        f"use one of {', '.join(EVENT_TYPES)}")
            types.append(t)
        return tuple(dict.fromkeys(types))

    def subscriptions(self, node: Node | None) -> tuple[Subscription, ...]:
        if node is None:
            return ()
        items = self.seq(node, "subscriptions", "[{id: sre-pages, format: avro, match: {severity: critical}}]")
        out = []
        for i, (sid, sn) in enumerate(zip(self.rule_ids(items, "subscriptions"), items)):
            p = f"subscriptions[{i}]"
            self.no_unknown(sn, p, SUBSCRIPTION_KEYS)
            if not SUBSCRIPTION_ID_RE.match(sid):
                raise self.err(f"{p}.id", f"{p}.id: {sid!r} becomes part of a topic name; use lower-case letters, "
                                          f"digits and - (at most 63)")
            m = sn.value
            fmt = self.string(m["format"], f"{p}.format") if "format" in m else "avro"
            if fmt not in RELAY_FORMATS:
                raise self.err(f"{p}.format", f"{p}.format: unknown format '{fmt}'; use avro (Confluent framing, "
                                              f"decodable with schemas/) or json")
            out.append(Subscription(sid, fmt, self.event_types(m, p), self.criteria(m.get("match"), f"{p}.match")))
        return tuple(out)

    def users(self, node: Node | None) -> dict[str, User]:
        out: dict[str, User] = {}
        if node is None:
            return out
        for uid, un in self.mapping(node, "users", "{u-alice: {name: Alice, email: alice@example.com}}").items():
            self.ident(uid, "users", "user")
            p = f"users.{uid}"
            if un.value is None:
                out[uid] = User(uid)
                continue
            m = self.mapping(un, p, "{name: Alice, email: alice@example.com}")
            self.no_unknown(un, p, USER_KEYS)
            name = self.string(m["name"], f"{p}.name") if "name" in m else None
            email = self.string(m["email"], f"{p}.email") if "email" in m else None
            if email is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
                raise self.err(f"{p}.email", f"{p}.email: not an e-mail address: {email!r}; "
                                             f"write it like alice@example.com")
            contact = {}
            if "contact" in m:
                contact = _plain(m["contact"]) if m["contact"].value is not None else {}
                if not isinstance(contact, dict):
                    raise self.err(f"{p}.contact", f"{p}.contact: must be a mapping, e.g. "
                                                   f"{{slack: \"@alice\", webhook: \"https://...\"}}")
            out[uid] = User(uid, name, email, contact)
        return out

    def teams(self, node: Node | None, users: dict[str, User]) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        if node is None:
            return out
        for tid, tn in self.mapping(node, "teams", "{sre: [u-alice, u-bob]}").items():
            self.ident(tid, "teams", "team")
            p = f"teams.{tid}"
            members = self.seq(tn, p, "[u-alice, u-bob]")
            if not members:
                raise self.err(p, f"{p}: a team needs at least one member; list user ids, e.g. [u-alice]")
            ids: list[str] = []
            for j, mn in enumerate(members):
                uid = self.known(self.string(mn, f"{p}[{j}]"), users, f"{p}[{j}]", "user", "users")
                if uid in ids:
                    raise self.err(f"{p}[{j}]", f"{p}[{j}]: user '{uid}' is listed twice; keep only one")
                ids.append(uid)
            out[tid] = tuple(ids)
        return out

    def schedules(self, node: Node | None, users: dict[str, User]) -> dict[str, Schedule]:
        out: dict[str, Schedule] = {}
        if node is None:
            return out
        for sid, sn in self.mapping(node, "schedules", "{primary: {time_zone: UTC, layers: [...]}}").items():
            self.ident(sid, "schedules", "schedule")
            try:
                schedule = parse_schedule(sid, _plain(sn))
            except ScheduleError as exc:
                raise self.from_domain(exc) from None
            p = f"schedules.{sid}"
            for i, layer in enumerate(schedule.layers):
                for j, uid in enumerate(layer.users):
                    self.known(uid, users, f"{p}.layers[{i}].users[{j}]", "user", "users")
            for i, o in enumerate(schedule.overrides):
                self.known(o.user, users, f"{p}.overrides[{i}].user", "user", "users")
            out[sid] = schedule
        return out

    def policies(self, node: Node | None, directory: Directory, users: dict[str, User]) -> dict[str, Policy]:
        out: dict[str, Policy] = {}
        if node is None:
            return out
        hint = "{default: {steps: [{escalate_after_seconds: 300, targets: [{schedule: primary}]}]}}"
        for pid, pn in self.mapping(node, "escalation_policies", hint).items():
            self.ident(pid, "escalation_policies", "escalation policy")
            try:
                policy = parse_policy(pid, _plain(pn), directory)
            except PolicyError as exc:
                raise self.from_domain(exc) from None
            for i, step in enumerate(policy.steps):
                for j, t in enumerate(step.targets):
                    if t.kind == "user":
                        self.known(t.id, users, f"escalation_policies.{pid}.steps[{i}].targets[{j}].user",
                                   "user", "users")
            out[pid] = policy
        return out

    def criteria(self, node: Node | None, path: str) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        if node is None:
            return out
        m = self.mapping(node, path, "{severity: critical, tags: [db]}")
        self.no_unknown(node, path, MATCH_KEYS)
        enums = {"severity": (SEVERITIES, ""), "priority": (PRIORITIES, ""), "urgency": (URGENCIES, ""),
                 "status": (self.tenant.statuses, f" (the statuses of tenant '{self.tenant.name}')")}
        for key, vn in m.items():
            kp = f"{path}.{key}"
            if isinstance(vn.value, list):
                if not vn.value:
                    raise self.err(kp, f"{kp}: an empty list matches nothing; list values or remove the key")
                items = [(self.string(v, f"{kp}[{j}]"), f"{kp}[{j}]") for j, v in enumerate(vn.value)]
            else:
                items = [(self.string(vn, kp), kp)]
            if key in enums:
                allowed, note = enums[key]
                for value, vp in items:
                    if value not in allowed:
                        raise self.err(vp, f"{vp}: unknown {key} '{value}'; use one of {', '.join(allowed)}{note}")
            out[key] = tuple(dict.fromkeys(v for v, _ in items))
        return out

    def rule_ids(self, items: list[Node], section: str) -> list[str]:
        """Each rule's id (required, unique within the section)."""
        seen: dict[str, int] = {}
        ids = []
        for i, rn in enumerate(items):
            p = f"{section}[{i}]"
            if not isinstance(rn.value, dict):
                raise self.err(p, f"{p}: a rule must be a mapping starting with 'id:'")
            if "id" not in rn.value:
                raise self.err(p, f"{p}: missing required key 'id'; give the rule a unique name")
            rid = self.string(rn.value["id"], f"{p}.id")
            if not ID_RE.match(rid):
                raise self.err(f"{p}.id", f"{p}.id: invalid rule id {rid!r}; use letters, digits and . _ @ + -")
            if rid in seen:
                raise self.err(f"{p}.id", f"{p}.id: duplicate rule id '{rid}' (first used on line {seen[rid]}); "
                                          f"rule ids must be unique within {section}")
            seen[rid] = locate(self.root, f"{p}.id")[1]
            ids.append(rid)
        return ids

    def routing_rules(self, node: Node | None, policies: dict[str, Policy]) -> tuple[RoutingRule, ...]:
        if node is None:
            return ()
        items = self.seq(node, "routing_rules", "[{id: all, match: {}, escalation_policy: default}]")
        out = []
        for i, (rid, rn) in enumerate(zip(self.rule_ids(items, "routing_rules"), items)):
            p = f"routing_rules[{i}]"
            self.no_unknown(rn, p, ROUTING_KEYS)
            m = rn.value
            if "escalation_policy" not in m:
                raise self.err(p, f"{p}: rule '{rid}' is missing required key 'escalation_policy'; name one of: "
                                  f"{', '.join(sorted(policies)) or '(none defined)'}")
            pid = self.known(self.string(m["escalation_policy"], f"{p}.escalation_policy"), policies,
                             f"{p}.escalation_policy", "escalation policy", "escalation_policies")
            urgency = None
            if "urgency" in m:
                urgency = self.string(m["urgency"], f"{p}.urgency")
                if urgency not in URGENCIES:
                    raise self.err(f"{p}.urgency", f"{p}.urgency: unknown urgency '{urgency}'; use one of "
                                                   f"{', '.join(URGENCIES)} (or remove it to keep the event's)")
            out.append(RoutingRule(rid, self.criteria(m.get("match"), f"{p}.match"), pid, urgency))
        return tuple(out)

    def automation_rules(self, node: Node | None, users: dict[str, User],
                         policies: dict[str, Policy]) -> tuple[AutomationRule, ...]:
        if node is None:
            return ()
        items = self.seq(node, "automation_rules", "[{id: p1, trigger: case_created, actions: [...]}]")
        statuses = self.tenant.statuses
        out = []
        for i, (rid, rn) in enumerate(zip(self.rule_ids(items, "automation_rules"), items)):
            p = f"automation_rules[{i}]"
            self.no_unknown(rn, p, AUTOMATION_KEYS)
            m = rn.value
            if "trigger" not in m:
                raise self.err(p, f"{p}: rule '{rid}' is missing required key 'trigger'; use one of "
                                  f"{', '.join(TRIGGERS)}")
            trigger = self.string(m["trigger"], f"{p}.trigger")
            if trigger not in TRIGGERS:
                raise self.err(f"{p}.trigger", f"{p}.trigger: unknown trigger '{trigger}'; use one of "
                                               f"{', '.join(TRIGGERS)}")
            only = {"to_status": "status_changed", "count": "occurrence_count", "sla": "sla_breached"}
            for key, needs in only.items():
                if key in m and trigger != needs:
                    raise self.err(f"{p}.{key}", f"{p}.{key}: only applies to trigger {needs} "
                                                 f"(this rule's trigger is {trigger}); remove it")
            to_status = count = sla = None
            if "to_status" in m:
                to_status = self.string(m["to_status"], f"{p}.to_status")
                if to_status not in statuses:
                    raise self.err(f"{p}.to_status", f"{p}.to_status: unknown status '{to_status}' of tenant "
                                                     f"'{self.tenant.name}'; use one of {', '.join(statuses)}")
            if trigger == "occurrence_count":
                if "count" not in m:
                    raise self.err(p, f"{p}: rule '{rid}' (trigger occurrence_count) is missing required key "
                                      f"'count'; give the occurrence count that fires it, e.g. count: 10")
                count = m["count"].value
                if isinstance(count, bool) or not isinstance(count, int) or count < 2:
                    raise self.err(f"{p}.count", f"{p}.count: must be an integer of at least 2, got {count!r}")
            if "sla" in m:
                sla = self.string(m["sla"], f"{p}.sla")
                if sla not in SLA_KINDS:
                    raise self.err(f"{p}.sla", f"{p}.sla: unknown SLA '{sla}'; use one of {', '.join(SLA_KINDS)} "
                                               f"(or remove it to fire on either)")
            conditions = self.criteria(m.get("conditions"), f"{p}.conditions")
            actions = self.actions(m.get("actions"), f"{p}.actions", rid, users, policies)
            out.append(AutomationRule(rid, trigger, to_status, count, sla, conditions, actions))
        return tuple(out)

    def actions(self, node: Node | None, path: str, rid: str, users: dict[str, User],
                policies: dict[str, Policy]) -> tuple[tuple[str, str], ...]:
        hint = "[{set_priority: P1}, {comment: \"...\"}]"
        items = self.seq(node, path, hint) if node is not None else []
        if not items:
            rule_path = path.rsplit(".", 1)[0]
            raise self.err(path if node is not None else rule_path,
                           f"{path}: rule '{rid}' needs at least one action, e.g. {hint}; "
                           f"actions are {', '.join(ACTIONS)}")
        statuses = self.tenant.statuses
        out = []
        for j, an in enumerate(items):
            ap = f"{path}[{j}]"
            if not isinstance(an.value, dict) or len(an.value) != 1:
                raise self.err(ap, f"{ap}: each action is a one-key mapping like {{set_priority: P1}}; "
                                   f"actions are {', '.join(ACTIONS)}")
            (kind, vn), = an.value.items()
            if kind not in ACTIONS:
                raise self.err(ap, f"{ap}: unknown action '{kind}'; use one of {', '.join(ACTIONS)}")
            vp = f"{ap}.{kind}"
            value = self.string(vn, vp)
            if kind == "set_priority" and value not in PRIORITIES:
                raise self.err(vp, f"{vp}: unknown priority '{value}'; use one of {', '.join(PRIORITIES)}")
            if kind == "set_status" and value not in statuses:
                raise self.err(vp, f"{vp}: unknown status '{value}' of tenant '{self.tenant.name}'; "
                                   f"use one of {', '.join(statuses)}")
            if kind == "assign":
                self.known(value, users, vp, "user", "users")
            if kind == "page":
                self.known(value, policies, vp, "escalation policy", "escalation_policies")
            out.append((kind, value))
        return tuple(out)

    def slas(self, node: Node | None) -> dict[str, Sla]:
        if node is None or node.value is None:
            return {}
        try:
            return parse_slas(_plain(node))
        except (SlaError, ValueError) as exc:
            raise self.from_domain(exc) from None

    def ack_timeout(self, node: Node) -> int | None:
        v = node.value
        if v is False or v == 0 or (isinstance(v, str) and v.strip().lower() in ("off", "0")):
            return None
        if v is True or v is None:
            raise self.err("ack_timeout", f"ack_timeout: give a duration like 30m or 1h, or off to disable, "
                                          f"got {v!r}")
        try:
            return parse_duration(v, "ack_timeout")
        except ScheduleError as exc:
            raise self.from_domain(ScheduleError(f"{exc}; or off to disable")) from None


def _parse(tenant: Tenant, path: Path, data: bytes) -> OnCallConfig:
    digest = hashlib.sha256(data).hexdigest()
    root = _compose(path, data)
    if root is None:  # empty, or only comments: nothing configured
        return replace(empty_config(tenant), source=str(path), digest=digest)
    return _Parser(tenant, path, root).parse(digest)


# --------------------------------------------------------------------------
# hot reload
# --------------------------------------------------------------------------


class ConfigWatcher:
    """Holds the tenant's current OnCallConfig; reloads it when the file changes or on request (SIGHUP).

    No threads and no I/O besides ``stat`` and reading the file: the worker
    calls ``check()`` from a periodic timer and ``reload()`` from a signal
    handler. An invalid file at construction raises ConfigError (do not
    start on bad configuration); an invalid file later is logged, recorded in
    ``last_error`` and reported to ``on_reload("error", message)`` while the
    previous configuration stays in effect.
    """

    def __init__(self, tenant: Tenant, path: Path,
                 on_reload: Callable[[str, str], None] | None = None) -> None:
        self.tenant = tenant
        self.path = Path(path)
        self.on_reload = on_reload
        self.last_error: str | None = None
        self._stat = self._stat_key()
        data = _read(self.path)
        self._current = empty_config(tenant) if data is None else _parse(tenant, self.path, data)
        if data is None:
            log.info("tenant %s: no on-call config at %s; nothing configured", tenant.name, self.path)
        else:
            log.info("tenant %s: on-call config loaded from %s (sha256 %s)", tenant.name, self.path,
                     self._current.digest)

    @property
    def current(self) -> OnCallConfig:
        return self._current

    def _stat_key(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return (-1, -1, -1)  # unreadable: let the read report it
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> bool:
        """Reload if the file changed since last seen. True when a new config took effect."""
        key = self._stat_key()
        if key == self._stat:
            return False
        return self._load(key, forced=False)

    def reload(self) -> bool:
        """Re-read the file now (SIGHUP). True when a new config took effect."""
        return self._load(self._stat_key(), forced=True)

    def _load(self, key, *, forced: bool) -> bool:
        self._stat = key  # stat before reading: a write after it shows up as a new change
        name = self.tenant.name
        try:
            data = _read(self.path)
            digest = "" if data is None else hashlib.sha256(data).hexdigest()
            if data is not None and digest == self._current.digest and self._current.source is not None:
                self._unchanged(forced)
                return False
            if data is None:
                if self._current.source is None:
                    self._unchanged(forced)
                    return False
                log.warning("tenant %s: on-call config %s was removed; running with an empty on-call "
                            "config (no routing, no automation)", name, self.path)
                new = empty_config(self.tenant)
            else:
                new = _parse(self.tenant, self.path, data)
        except ConfigError as exc:
            msg = str(exc)
            log.error("tenant %s: on-call config not reloaded, keeping the running version (sha256 %s): %s",
                      name, self._current.digest or "none", msg)
            self.last_error = msg
            self._notify("error", msg)
            return False
        self._current = new
        self.last_error = None
        if data is not None:
            log.info("tenant %s: on-call config reloaded from %s (sha256 %s)", name, self.path, new.digest)
        self._notify("ok", new.digest)
        return True

    def _unchanged(self, forced: bool) -> None:
        """The file is (again) what is running: clear an earlier error."""
        what = f"sha256 {self._current.digest}" if self._current.source else "no file"
        if self.last_error is not None:
            log.info("tenant %s: on-call config %s is back to the running version (%s)", self.tenant.name,
                     self.path, what)
            self.last_error = None
            self._notify("ok", self._current.digest)
        elif forced:
            log.info("tenant %s: on-call config %s unchanged (%s)", self.tenant.name, self.path, what)

    def _notify(self, outcome: str, detail: str) -> None:
        if self.on_reload is None:
            return
        try:
            self.on_reload(outcome, detail)
        except Exception:  # a broken callback must not break the reload timer
            log.exception("tenant %s: on_reload callback failed", self.tenant.name)
