"""Configuration as data: `tenants.yaml` and `topics.yaml`, validated at load.

Every error names the file, the line and what to do, e.g.::

    tenants.yaml:21: tenant 'on-call': transition ACKNOWLEDGED -> CLOSED names
    an unknown status 'CLOSED'; use one of TRIGGERED, ACKNOWLEDGED, RESOLVED

The loaded objects are plain frozen dataclasses used by the pure domain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ALERT_ACTIONS = ("trigger", "acknowledge", "resolve")
TENANT_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class ConfigError(ValueError):
    """A configuration file is invalid. The message says where and what to do."""


# --------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------


class Node:
    """A YAML value together with the file and line it came from."""

    __slots__ = ("value", "path", "line", "key_lines")

    def __init__(self, value: Any, path: str, line: int, key_lines: dict[str, int] | None = None) -> None:
        self.value = value
        self.path = path
        self.line = line
        self.key_lines = key_lines or {}

    def key_error(self, key: str, msg: str) -> ConfigError:
        """An error about ``key`` of this mapping, at the key's own line."""
        return ConfigError(f"{self.path}:{self.key_lines.get(key, self.line)}: {msg}")

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.where()}: {msg}")


def _wrap(node: yaml.Node, path: str) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        key_lines: dict[str, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else yaml.safe_load(yaml.serialize(k))
            if key in out:
                raise ConfigError(f"{path}:{k.start_mark.line + 1}: duplicate key {key!r}; keep only one")
            out[str(key)] = _wrap(v, path)
            key_lines[str(key)] = k.start_mark.line + 1
        return Node(out, path, line, key_lines)
    if isinstance(node, yaml.SequenceNode):
        return Node([_wrap(v, path) for v in node.value], path, line)
    # scalar: let the safe constructor type it (int, bool, str, null)
    loader = yaml.SafeLoader("")
    value = loader.construct_object(node, deep=True)
    loader.dispose()
    return Node(value, path, line)


def compose_yaml(path: Path | str, text: str) -> Node | None:
    """YAML text as a line-numbered node tree (None for an empty document);
    a syntax error names the file and line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        ctx = getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        started = f"; it starts at line {ctx.line + 1}" if ctx and mark and ctx.line != mark.line else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)}{started}); "
                          f"fix the syntax") from None
    return None if root is None else _wrap(root, str(path))


def _load_yaml(path: Path) -> Node:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; create it or set the path (see README 'Configuration')") from None
    root = compose_yaml(path, text)
    if root is None:
        raise ConfigError(f"{path}:1: file is empty; see README 'Configuration' for its shape")
    return root


def _mapping(node: Node, what: str) -> dict[str, Node]:
    if not isinstance(node.value, dict):
        raise node.error(f"{what} must be a mapping (key: value lines)")
    return node.value


def _req(m: dict[str, Node], parent: Node, key: str, what: str) -> Node:
    if key not in m:
        raise parent.error(f"{what}: missing required key '{key}'")
    return m[key]


def _str(node: Node, what: str) -> str:
    if not isinstance(node.value, str) or not node.value.strip():
        raise node.error(f"{what} must be a non-empty string, got {node.value!r}")
    return node.value


def _str_list(node: Node, what: str) -> list[str]:
    if not isinstance(node.value, list):
        raise node.error(f"{what} must be a list, e.g. [A, B]")
    return [_str(v, f"{what} item") for v in node.value]


def _int(node: Node, what: str, lo: int, hi: int) -> int:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise node.error(f"{what} must be an integer between {lo} and {hi}, got {v!r}")
    return v


def _no_unknown(parent: Node, allowed: set[str], what: str) -> None:
    for k in parent.value:
        if k not in allowed:
            raise parent.key_error(k, f"{what}: unknown key '{k}'; allowed keys are {', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------
# tenants.yaml
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    name: str
    display_name: str
    case_type: str
    work_type: str
    case_id_prefix: str
    statuses: tuple[str, ...]
    default_status: str
    final_status: str
    transitions: dict[str, frozenset[str]]
    actions: dict[str, str]  # acknowledge/resolve -> status
    index: str | None = None  # Elasticsearch index (alias) name; default cases-<tenant>

    def is_open(self, status: str) -> bool:
        return status != self.final_status

    def allows(self, from_status: str, to_status: str) -> bool:
        return to_status in self.transitions.get(from_status, frozenset())


_TENANT_KEYS = {
    "index", "display_name", "case_type", "work_type", "case_id_prefix", "statuses",
    "default_status", "final_status", "transitions", "actions",
}


def _parse_tenant(name: str, node: Node) -> Tenant:
    what = f"tenant '{name}'"
    if not TENANT_NAME_RE.match(name):
        raise node.error(f"{what}: name must be lower-case letters, digits and '-' (it names topics and databases)")
    m = _mapping(node, what)
    _no_unknown(node, _TENANT_KEYS, what)
    statuses = _str_list(_req(m, node, "statuses", what), f"{what}: statuses")
    if len(statuses) < 2 or len(set(statuses)) != len(statuses):
        raise m["statuses"].error(f"{what}: statuses must list at least two distinct statuses")
    known = ", ".join(statuses)

    def status(n: Node, label: str) -> str:
        s = _str(n, f"{what}: {label}")
        if s not in statuses:
            raise n.error(f"{what}: {label} names an unknown status '{s}'; use one of {known}")
        return s

    default = status(_req(m, node, "default_status", what), "default_status")
    final = status(_req(m, node, "final_status", what), "final_status")
    if default == final:
        raise m["final_status"].error(f"{what}: final_status must differ from default_status")
    tnode = _req(m, node, "transitions", what)
    transitions: dict[str, frozenset[str]] = {}
    for src, targets in _mapping(tnode, f"{what}: transitions").items():
        if src not in statuses:
            raise tnode.key_error(src, f"{what}: transitions from unknown status '{src}'; use one of {known}")
        if targets.value is None:
            targets.value = []
        outs = []
        for t in targets.value if isinstance(targets.value, list) else [targets]:
            s = _str(t, f"{what}: transition target")
            if s not in statuses:
                raise t.error(f"{what}: transition {src} -> {s} names an unknown status '{s}'; use one of {known}")
            if s == src:
                raise t.error(f"{what}: transition {src} -> {s} goes nowhere; remove it")
            outs.append(s)
        transitions[src] = frozenset(outs)
    for s in statuses:
        transitions.setdefault(s, frozenset())
    anode = _req(m, node, "actions", what)
    actions: dict[str, str] = {}
    for act, target in _mapping(anode, f"{what}: actions").items():
        if act not in ("acknowledge", "resolve"):
            raise anode.key_error(act, f"{what}: actions: unknown action '{act}'; only acknowledge and resolve map to statuses")
        actions[act] = status(target, f"actions.{act}")
    for act in ("acknowledge", "resolve"):
        if act not in actions:
            raise anode.error(f"{what}: actions: missing '{act}' (the status an alert '{act}' moves a case to)")
    if actions["resolve"] != final:
        raise anode.value["resolve"].error(f"{what}: actions.resolve must be the final_status '{final}'")
    prefix = _str(_req(m, node, "case_id_prefix", what), f"{what}: case_id_prefix")
    if not re.fullmatch(r"[A-Z]{1,8}", prefix):
        raise m["case_id_prefix"].error(f"{what}: case_id_prefix must be 1-8 upper-case letters, got {prefix!r}")
    index = None
    if "index" in m:
        index = _str(m["index"], f"{what}: index")
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,200}", index):
            raise m["index"].error(f"{what}: index must be lower-case letters, digits, '.', '_' or '-' "
                                   f"(an Elasticsearch index name), got {index!r}")
    return Tenant(
        index=index,
        name=name,
        display_name=_str(_req(m, node, "display_name", what), f"{what}: display_name"),
        case_type=_str(_req(m, node, "case_type", what), f"{what}: case_type"),
        work_type=_str(_req(m, node, "work_type", what), f"{what}: work_type"),
        case_id_prefix=prefix,
        statuses=tuple(statuses),
        default_status=default,
        final_status=final,
        transitions=transitions,
        actions=actions,
    )


def load_tenants(path: Path | str | None = None) -> dict[str, Tenant]:
    p = Path(path) if path else PROJECT_ROOT / "tenants.yaml"
    root = _load_yaml(p)
    top = _mapping(root, "tenants file")
    _no_unknown(root, {"tenants"}, "tenants file")
    tnode = _req(top, root, "tenants", "tenants file")
    tenants = {name: _parse_tenant(name, n) for name, n in _mapping(tnode, "tenants").items()}
    if not tenants:
        raise tnode.error("no tenants defined; add at least one under 'tenants:'")
    prefixes: dict[str, str] = {}
    for t in tenants.values():
        if t.case_id_prefix in prefixes:
            raise tnode.value[t.name].key_error("case_id_prefix",
                f"tenant '{t.name}': case_id_prefix '{t.case_id_prefix}' is already used by '{prefixes[t.case_id_prefix]}'"
            )
        prefixes[t.case_id_prefix] = t.name
    return tenants


def get_tenant(name: str, path: Path | str | None = None) -> Tenant:
    tenants = load_tenants(path)
    if name not in tenants:
        raise ConfigError(f"unknown tenant '{name}'; configured tenants are: {', '.join(sorted(tenants))}")
    return tenants[name]


# --------------------------------------------------------------------------
# topics.yaml
# --------------------------------------------------------------------------

# The largest record a worker writes, which its producer and the topics it writes such records to
# allow (topics.yaml: intake-routed and dlq; every table changelog, below). What it writes for one
# intake message can be larger than the message: an intake-routed envelope holds the message twice
# (normalized, and as JSON text, which escaping can double: up to ~3x its 512 KiB), a dead letter holds
# a message of up to T.intake's max.message.bytes (1 MiB), a dedup key's table entry holds the outputs
# of its recent inputs (streams.domain.cases.RECENT_BYTES). With the 1 MB defaults such a record
# crashed the worker (its producer refused it) or was lost (the broker refused a changelog write).
MAX_RECORD_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    role: str           # intake, intake-routed, domain-events, dlq, or a changelog
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicFamily:
    tenant: str
    app_id: str
    partitions: int
    replication_factor: int
    topics: dict[str, TopicSpec]
    tables: tuple[str, ...]

    def name(self, role: str) -> str:
        return self.topics[role].name

    def changelog(self, table: str) -> TopicSpec:
        return TopicSpec(
            role=f"changelog:{table}",
            name=f"{self.app_id}-{table}-changelog",
            partitions=self.partitions,
            replication_factor=self.replication_factor,
            config={"cleanup.policy": "compact", "max.message.bytes": str(MAX_RECORD_BYTES)},
        )

    def relay(self, subscription: str) -> TopicSpec:
        """The relay topic of a subscription (``streams/oncall_config.py``): ``<tenant>.relay.<id>``."""
        return TopicSpec(
            role=f"relay:{subscription}",
            name=f"{self.tenant}.relay.{subscription}",
            partitions=self.partitions,
            replication_factor=self.replication_factor,
            config={"retention.ms": "604800000"},
        )

    def all_topics(self) -> list[TopicSpec]:
        return list(self.topics.values()) + [self.changelog(t) for t in self.tables]


REQUIRED_ROLES = ("intake", "intake-routed", "domain-events", "dlq", "timers", "notifications")


def app_id_for(tenant: str) -> str:
    return f"casestream-{tenant}"


def load_topics(tenant: str, path: Path | str | None = None) -> TopicFamily:
    p = Path(path) if path else PROJECT_ROOT / "topics.yaml"
    root = _load_yaml(p)
    top = _mapping(root, "topics file")
    _no_unknown(root, {"partitions", "replication_factor", "topics", "tables"}, "topics file")
    partitions = _int(_req(top, root, "partitions", "topics file"), "partitions", 1, 1024)
    rf = _int(top["replication_factor"], "replication_factor", 1, 16) if "replication_factor" in top else 1
    tnode = _req(top, root, "topics", "topics file")
    specs: dict[str, TopicSpec] = {}
    for role, n in _mapping(tnode, "topics").items():
        what = f"topic '{role}'"
        m = _mapping(n, what)
        _no_unknown(n, {"name", "description", "config", "partitions"}, what)
        template = _str(_req(m, n, "name", what), f"{what}: name")
        if "{tenant}" not in template:
            raise m["name"].error(f"{what}: name must contain '{{tenant}}' so every tenant gets its own topic")
        cfg: dict[str, str] = {}
        if "config" in m:
            for k, v in _mapping(m["config"], f"{what}: config").items():
                cfg[k] = str(v.value)
        parts = partitions
        if "partitions" in m:
            parts = _int(m["partitions"], f"{what}: partitions", 1, 1024)
        specs[role] = TopicSpec(role, template.replace("{tenant}", tenant), parts, rf, cfg)
    for role in REQUIRED_ROLES:
        if role not in specs:
            raise tnode.error(f"topics: missing the '{role}' topic; every tenant needs {', '.join(REQUIRED_ROLES)}")
    for role in ("intake-routed", "timers", "notifications"):
        if specs[role].partitions != partitions:
            rnode = tnode.value[role]
            raise rnode.key_error("partitions", f"topic '{role}' must have the table partition count {partitions}")
    tables: tuple[str, ...] = ()
    if "tables" in top:
        tables = tuple(_mapping(top["tables"], "tables").keys())
    return TopicFamily(tenant, app_id_for(tenant), partitions, rf, specs, tables)
