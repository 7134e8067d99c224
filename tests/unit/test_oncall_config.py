"""Per-tenant on-call configuration (streams/oncall_config.py): loading, file:line errors, hot reload.

Error tests mark the line the error must point at with ``#!`` and assert
the exact ``<file>:<line>:`` prefix.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

import streams.oncall_config as oc
from streams.config import PROJECT_ROOT, ConfigError, Node, get_tenant
from streams.domain.escalation import Target
from streams.oncall_config import (
    AutomationRule,
    ConfigWatcher,
    OnCallConfig,
    RoutingRule,
    User,
    empty_config,
    load_oncall,
    locate,
    matches,
    oncall_path,
)

ONCALL = get_tenant("on-call")
CM = get_tenant("case-management")

BASE = """\
users:
  u-alice: {name: Alice Example, email: alice@example.com}
  u-bob: {name: Bob Example, email: bob@example.com}
teams:
  sre: [u-alice, u-bob]
schedules:
  primary:
    time_zone: Europe/Berlin
    layers:
      - users: [u-alice, u-bob]
        rotation_start: 2026-11-02T09:00:00+01:00
        shift_length: 1w
escalation_policies:
  default:
    steps:
      - escalate_after_seconds: 300
        targets: [{schedule: primary}]
"""


def write(tmp_path: Path, text: str, name: str = "on-call.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def marked_line(text: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if "#!" in line]
    assert len(lines) == 1, f"mark exactly one line with #!, got {lines}"
    return lines[0]


def error(tmp_path: Path, text: str, tenant=ONCALL) -> str:
    """Load ``text``; it must fail at the line marked ``#!``. Returns the message after ``file:line: ``."""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_oncall(tenant, p)
    msg = str(exc.value)
    prefix = f"{p}:{marked_line(text)}: "
    assert msg.startswith(prefix), f"expected {prefix!r}, got {msg!r}"
    return msg[len(prefix):]


def load(tmp_path: Path, text: str, tenant=ONCALL) -> OnCallConfig:
    return load_oncall(tenant, write(tmp_path, text))


# --------------------------------------------------------------------------
# the example files
# --------------------------------------------------------------------------


def test_on_call_example_loads():
    path = oncall_path(PROJECT_ROOT, "on-call")
    assert path == PROJECT_ROOT / "oncall" / "on-call.yaml"
    c = load_oncall(ONCALL, path)
    assert c.tenant == "on-call"
    assert c.source == str(path)
    assert c.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(c.users) == {"u-alice", "u-bob", "u-carol", "u-dave"}
    assert all(u.email.endswith("@example.com") for u in c.users.values())
    assert c.users["u-bob"].contact["slack"] == "@bob"
    assert c.users["u-alice"].contact == {}
    assert c.directory.teams["sre"] == ("u-alice", "u-bob", "u-carol")
    assert set(c.directory.schedules) == {"primary", "secondary"}
    assert str(c.directory.schedules["primary"].tz) == "Europe/Berlin"
    default = c.policies["default"]
    assert [s.escalate_after_seconds for s in default.steps] == [300, 600, 900]
    assert default.steps[0].targets == (Target("schedule", "primary"),)
    assert default.steps[1].targets == (Target("schedule", "secondary"),)
    assert default.steps[2].targets == (Target("team", "sre"),) and default.steps[2].assignment == "notify_all"
    assert default.retries == 1 and default.resolve_page_on_policy_end is False
    assert c.policies["database"].steps[0].assignment == "round_robin"
    assert c.routing_rules[0].escalation_policy_id == "database"
    assert c.routing_rules[-1].match == {} and c.routing_rules[-1].escalation_policy_id == "default"
    assert c.route({"source": "db-2", "component": "postgres"}).id == "database-pages"
    assert c.route({"source": "web-1"}).escalation_policy_id == "default"
    (rule,) = [r for r in c.automation_rules if r.trigger == "occurrence_count"]
    assert rule.count == 10
    assert ("set_priority", "P1") in rule.actions and any(k == "comment" for k, _ in rule.actions)
    assert set(c.slas) == {"P1", "P2"}
    assert c.ack_timeout_seconds == 1800


def test_case_management_example_loads():
    c = load_oncall(CM, oncall_path(PROJECT_ROOT, "case-management"))
    assert c.ack_timeout_seconds is None
    assert set(c.slas) == {"P1", "P2", "P3"}
    assert (c.slas["P1"].first_response_seconds, c.slas["P1"].resolution_seconds) == (900, 14400)
    rules = {r.trigger: r for r in c.automation_rules}
    created = rules["case_created"]
    assert created.conditions == {"severity": ("critical",)}
    assert created.actions[0] == ("set_priority", "P1") and created.actions[1][0] == "assign"
    breached = rules["sla_breached"]
    assert breached.sla == "first_response"
    assert [k for k, _ in breached.actions] == ["comment", "page"]
    assert ("page", "case-escalation") in breached.actions
    assert c.policies["case-escalation"].steps[0].targets[0].kind == "team"
    closed = rules["status_changed"]
    assert closed.to_status == "CLOSED" and closed.actions == (("comment", "closed"),)


# --------------------------------------------------------------------------
# missing / empty files, defaults
# --------------------------------------------------------------------------


def test_missing_file_is_the_empty_config(tmp_path):
    c = load_oncall(ONCALL, tmp_path / "nope.yaml")
    assert c == empty_config(ONCALL)
    assert c.source is None and c.digest == ""
    assert c.users == {} and c.policies == {} and c.routing_rules == () and c.automation_rules == ()
    assert c.directory.schedules == {} and c.directory.teams == {} and c.slas == {}
    assert c.ack_timeout_seconds == 1800
    assert c.route({"severity": "critical"}) is None


def test_file_with_only_comments_is_empty_but_has_a_source(tmp_path):
    p = write(tmp_path, "# nothing yet\n")
    c = load_oncall(ONCALL, p)
    assert c.source == str(p) and c.digest == hashlib.sha256(b"# nothing yet\n").hexdigest()
    assert c.policies == {} and c.ack_timeout_seconds == 1800


def test_sections_may_be_empty(tmp_path):
    c = load(tmp_path, "users:\nteams: {}\nschedules:\nescalation_policies: {}\nrouting_rules: []\n"
                       "automation_rules:\nslas:\n")
    assert c.users == {} and c.routing_rules == () and c.slas == {}


def test_user_fields_are_optional(tmp_path):
    c = load(tmp_path, "users:\n  u-x:\n  u-y: {name: Y}\n  u-z: {email: z@example.com, contact: {pager: '123'}}\n")
    assert c.users["u-x"] == User("u-x", None, None, {})
    assert c.users["u-y"].name == "Y" and c.users["u-y"].email is None
    assert c.users["u-z"].contact == {"pager": "123"}


@pytest.mark.parametrize("value, seconds", [
    ("30m", 1800), ("45m", 2700), ("2h", 7200), ("90", 90), ("0", None), ("off", None), ('"off"', None),
    ('"0"', None),
])
def test_ack_timeout(tmp_path, value, seconds):
    assert load(tmp_path, f"ack_timeout: {value}\n").ack_timeout_seconds == seconds


def test_ack_timeout_invalid(tmp_path):
    msg = error(tmp_path, "users: {}\nack_timeout: soon   #!\n")
    assert msg.startswith("ack_timeout: a duration like") and "off to disable" in msg
    assert "off to disable" in error(tmp_path, "ack_timeout:    #!\n")


# --------------------------------------------------------------------------
# syntax and top level
# --------------------------------------------------------------------------


def test_yaml_syntax_error_has_file_and_line(tmp_path):
    msg = error(tmp_path, "users:\n  u-alice: {name: [oops\nteams: {}   #!\n")
    assert "not valid YAML" in msg and "fix the syntax" in msg


def test_unknown_top_level_key(tmp_path):
    msg = error(tmp_path, BASE + "routing:   #!\n  - id: x\n")
    assert "unknown key 'routing'" in msg and "routing_rules" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    assert "must be a mapping" in error(tmp_path, "- users   #!\n")


def test_duplicate_key(tmp_path):
    assert "duplicate key 'u-alice'" in error(tmp_path, "users:\n  u-alice: {}\n  u-alice: {}   #!\n")


# --------------------------------------------------------------------------
# users and teams
# --------------------------------------------------------------------------


def test_user_unknown_key(tmp_path):
    msg = error(tmp_path, "users:\n  u-alice:\n    name: A\n    phone: '123'   #!\n")
    assert "users.u-alice: unknown key 'phone'" in msg and "contact" in msg


def test_user_bad_email(tmp_path):
    assert "not an e-mail address" in error(tmp_path, "users:\n  u-a: {name: A}\n  u-b: {email: nope}   #!\n")


def test_user_contact_must_be_a_mapping(tmp_path):
    assert "contact: must be a mapping" in error(tmp_path, "users:\n  u-a:\n    contact: [x]   #!\n")


def test_invalid_user_id(tmp_path):
    assert "invalid user id 'alice smith'" in error(tmp_path, "users:\n  u-a: {}\n  alice smith: {}   #!\n")


def test_team_member_must_be_a_known_user(tmp_path):
    msg = error(tmp_path, "users:\n  u-alice: {}\n  u-bob: {}\nteams:\n  sre:\n    - u-alice\n    - u-zed   #!\n")
    assert msg.startswith("teams.sre[1]: unknown user 'u-zed'")
    assert "define it under 'users:'" in msg and "u-alice, u-bob" in msg


def test_team_member_without_any_users(tmp_path):
    msg = error(tmp_path, "teams:\n  sre: [u-alice]   #!\n")
    assert "unknown user 'u-alice'" in msg and "none are defined" in msg


def test_team_must_have_members_once_each(tmp_path):
    assert "at least one member" in error(tmp_path, "users: {u-a: {}}\nteams:\n  sre: []   #!\n")
    assert "listed twice" in error(tmp_path, "users: {u-a: {}}\nteams:\n  sre:\n    - u-a\n    - u-a   #!\n")


# --------------------------------------------------------------------------
# schedules: parse_schedule's dotted paths mapped to lines
# --------------------------------------------------------------------------


def test_schedule_bad_shift_length_points_at_its_line(tmp_path):
    text = BASE.replace("        shift_length: 1w\n", "        shift_length: fortnight   #!\n")
    msg = error(tmp_path, text)
    assert msg.startswith("schedules.primary.layers[0].shift_length: a duration like")


def test_schedule_error_in_second_layer(tmp_path):
    text = BASE.replace("        shift_length: 1w\n", "        shift_length: 1w\n"
                        "      - users: [u-bob]\n"
                        "        rotation_start: 2026-11-02T09:00:00+01:00\n"
                        "        shift_length: 1d\n"
                        "        restrictions:\n"
                        "          - {days: [mon], start: \"09:00\", end: \"17:00\"}\n"
                        "          - {days: [someday], start: \"09:00\", end: \"17:00\"}   #!\n")
    assert error(tmp_path, text).startswith("schedules.primary.layers[1].restrictions[1].days:")


def test_schedule_unknown_time_zone(tmp_path):
    text = BASE.replace("    time_zone: Europe/Berlin\n", "    time_zone: Mars/Olympus   #!\n")
    assert "unknown time zone 'Mars/Olympus'" in error(tmp_path, text)


def test_schedule_unknown_key_points_at_the_key(tmp_path):
    text = BASE.replace("    time_zone: Europe/Berlin\n", "    time_zone: Europe/Berlin\n    owner: sre   #!\n")
    assert error(tmp_path, text) == "schedules.primary: unknown keys owner"


def test_schedule_missing_field_falls_back_to_the_deepest_node(tmp_path):
    text = BASE.replace("      - users: [u-alice, u-bob]\n", "      - users: [u-alice, u-bob]   #!\n") \
               .replace("        rotation_start: 2026-11-02T09:00:00+01:00\n", "")
    assert error(tmp_path, text).startswith("schedules.primary.layers[0].rotation_start:")


def test_schedule_layer_user_must_be_known(tmp_path):
    text = BASE.replace("      - users: [u-alice, u-bob]\n",
                        "      - users:\n          - u-alice\n          - u-carol   #!\n")
    msg = error(tmp_path, text)
    assert msg.startswith("schedules.primary.layers[0].users[1]: unknown user 'u-carol'")
    assert "u-alice, u-bob" in msg


def test_schedule_override_user_must_be_known(tmp_path):
    text = BASE.replace("escalation_policies:\n", "    overrides:\n"
                        "      - user: u-alice\n        start: 2026-12-24T00:00:00+01:00\n"
                        "        end: 2026-12-25T00:00:00+01:00\n"
                        "      - user: u-mallory   #!\n        start: 2026-12-25T00:00:00+01:00\n"
                        "        end: 2026-12-26T00:00:00+01:00\n"
                        "escalation_policies:\n")
    assert error(tmp_path, text).startswith("schedules.primary.overrides[1].user: unknown user 'u-mallory'")


def test_schedule_not_a_mapping(tmp_path):
    assert error(tmp_path, "schedules:\n  primary: [x]   #!\n").startswith("schedules.primary: a mapping")


# --------------------------------------------------------------------------
# escalation policies: parse_policy's dotted paths mapped to lines
# --------------------------------------------------------------------------

POLICY_TAIL = """\
      - escalate_after_seconds: 600
        targets:
          - {team: sre}
          - {schedule: nightly}   #!
"""


def test_policy_unknown_schedule_points_at_the_target(tmp_path):
    msg = error(tmp_path, BASE + POLICY_TAIL)
    assert msg == "escalation_policies.default.steps[1].targets[1]: unknown schedule 'nightly'; known: primary"


def test_policy_unknown_team(tmp_path):
    msg = error(tmp_path, BASE + "      - escalate_after_seconds: 600\n        targets: [{team: dba}]   #!\n")
    assert msg == "escalation_policies.default.steps[1].targets[0]: unknown team 'dba'; known: sre"


def test_policy_target_with_nothing_defined(tmp_path):
    text = ("escalation_policies:\n  p:\n    steps:\n      - escalate_after_seconds: 60\n"
            "        targets: [{schedule: primary}]   #!\n")
    assert error(tmp_path, text).endswith("unknown schedule 'primary'; known: (none defined)")


def test_policy_user_target_must_be_known(tmp_path):
    text = BASE + "      - escalate_after_seconds: 600\n        targets:\n          - user: u-eve   #!\n"
    msg = error(tmp_path, text)
    assert msg.startswith("escalation_policies.default.steps[1].targets[0].user: unknown user 'u-eve'")


def test_policy_step_too_fast(tmp_path):
    text = BASE.replace("      - escalate_after_seconds: 300\n", "      - escalate_after_seconds: 30   #!\n")
    assert "escalate_after_seconds: an integer of at least 60" in error(tmp_path, text)


def test_policy_retries(tmp_path):
    assert ".retries: an integer from 0 to 9" in error(tmp_path, BASE + "    retries: 12   #!\n")


def test_policy_unknown_key(tmp_path):
    assert error(tmp_path, BASE + "    repeat: 2   #!\n") == "escalation_policies.default: unknown keys repeat"


# --------------------------------------------------------------------------
# routing rules
# --------------------------------------------------------------------------


def test_routing_rules_load_in_order(tmp_path):
    c = load(tmp_path, BASE + """\
routing_rules:
  - id: db
    match: {source: [db-1, db-2], component: postgres, severity: [critical, error], tags: [db]}
    escalation_policy: default
    urgency: high
  - id: all
    match: {}
    escalation_policy: default
""")
    assert c.routing_rules == (
        RoutingRule("db", {"source": ("db-1", "db-2"), "component": ("postgres",),
                           "severity": ("critical", "error"), "tags": ("db",)}, "default", "high"),
        RoutingRule("all", {}, "default", None),
    )


def test_routing_rule_unknown_policy(tmp_path):
    msg = error(tmp_path, BASE + "routing_rules:\n  - id: a\n    escalation_policy: critical   #!\n")
    assert msg.startswith("routing_rules[0].escalation_policy: unknown escalation policy 'critical'")
    assert "escalation_policies" in msg and "default" in msg


def test_routing_rule_missing_policy(tmp_path):
    msg = error(tmp_path, BASE + "routing_rules:\n  - id: a   #!\n    match: {}\n")
    assert "missing required key 'escalation_policy'" in msg and "default" in msg


def test_routing_rule_missing_id(tmp_path):
    msg = error(tmp_path, BASE + "routing_rules:\n  - escalation_policy: default   #!\n")
    assert "missing required key 'id'" in msg


def test_routing_rule_duplicate_id(tmp_path):
    text = BASE + ("routing_rules:\n  - id: a\n    escalation_policy: default\n"
                   "  - id: a   #!\n    escalation_policy: default\n")
    first = marked_line(text) - 2
    assert f"duplicate rule id 'a' (first used on line {first})" in error(tmp_path, text)


def test_routing_rule_unknown_key(tmp_path):
    text = BASE + "routing_rules:\n  - id: a\n    escalation_policy: default\n    policy: x   #!\n"
    msg = error(tmp_path, text)
    assert "routing_rules[0]: unknown key 'policy'" in msg and "escalation_policy" in msg


def test_routing_rule_bad_urgency(tmp_path):
    text = BASE + "routing_rules:\n  - id: a\n    escalation_policy: default\n    urgency: urgent   #!\n"
    assert "unknown urgency 'urgent'; use one of high, low" in error(tmp_path, text)


def test_routing_rules_must_be_a_list(tmp_path):
    assert "must be a list" in error(tmp_path, BASE + "routing_rules:   #!\n  a: {}\n")


RULE = BASE + "routing_rules:\n  - id: r\n    escalation_policy: default\n    match:\n"


@pytest.mark.parametrize("line, expected", [
    ("      team: sre   #!", "routing_rules[0].match: unknown key 'team'; allowed keys are source, component"),
    ("      severity: fatal   #!", "routing_rules[0].match.severity: unknown severity 'fatal'; use one of critical"),
    ("      severity:\n        - critical\n        - urgent   #!", "match.severity[1]: unknown severity 'urgent'"),
    ("      priority: [P1, P7]   #!", "match.priority[1]: unknown priority 'P7'; use one of P1, P2"),
    ("      urgency: medium   #!", "unknown urgency 'medium'; use one of high, low"),
    ("      status: OPEN   #!", "match.status: unknown status 'OPEN'; use one of TRIGGERED, ACKNOWLEDGED, RESOLVED (the statuses of "
     "tenant 'on-call')"),
    ("      tags: []   #!", "an empty list matches nothing"),
    ("      project: 42   #!", "match.project: must be a non-empty string, got 42; quote it"),
])
def test_match_validation(tmp_path, line, expected):
    assert expected in error(tmp_path, RULE + line + "\n")


def test_match_accepts_tenant_statuses(tmp_path):
    c = load(tmp_path, RULE.replace("on-call", "") + "      status: [OPEN, IN_PROGRESS]\n", tenant=CM)
    assert c.routing_rules[0].match == {"status": ("OPEN", "IN_PROGRESS")}


# --------------------------------------------------------------------------
# automation rules
# --------------------------------------------------------------------------


def test_automation_rules_load(tmp_path):
    c = load(tmp_path, BASE + """\
automation_rules:
  - id: p1-for-critical
    trigger: case_created
    conditions: {severity: critical, tags: [db]}
    actions:
      - set_priority: P1
      - assign: u-alice
      - comment: "Auto-escalated: critical database alert"
      - set_status: ACKNOWLEDGED
      - page: default
  - id: flapping
    trigger: occurrence_count
    count: 10
    actions: [{set_priority: P2}]
  - id: acked
    trigger: status_changed
    to_status: ACKNOWLEDGED
    actions: [{comment: acked}]
  - id: any-change
    trigger: status_changed
    actions: [{comment: changed}]
  - id: late
    trigger: sla_breached
    sla: resolution
    actions: [{page: default}]
""")
    r = c.automation_rules
    assert r[0] == AutomationRule("p1-for-critical", "case_created", None, None, None,
                                  {"severity": ("critical",), "tags": ("db",)},
                                  (("set_priority", "P1"), ("assign", "u-alice"),
                                   ("comment", "Auto-escalated: critical database alert"),
                                   ("set_status", "ACKNOWLEDGED"), ("page", "default")))
    assert (r[1].trigger, r[1].count) == ("occurrence_count", 10)
    assert (r[2].to_status, r[3].to_status) == ("ACKNOWLEDGED", None)
    assert (r[4].sla, r[4].conditions) == ("resolution", {})


AUTO = BASE + "automation_rules:\n  - id: a\n"


@pytest.mark.parametrize("body, expected", [
    ("    trigger: case_opened   #!\n    actions: [{comment: x}]",
     "automation_rules[0].trigger: unknown trigger 'case_opened'; use one of case_created, status_changed"),
    ("    trigger: case_created\n    actions: [{comment: x}]\n  - id: b   #!\n    actions: [{comment: x}]",
     "automation_rules[1]: rule 'b' is missing required key 'trigger'"),
    ("    trigger: status_changed\n    to_status: OPEN   #!\n    actions: [{comment: x}]",
     "to_status: unknown status 'OPEN' of tenant 'on-call'; use one of TRIGGERED, ACKNOWLEDGED, RESOLVED"),
    ("    trigger: case_created\n    to_status: RESOLVED   #!\n    actions: [{comment: x}]",
     "to_status: only applies to trigger status_changed (this rule's trigger is case_created); remove it"),
    ("    trigger: case_created\n    count: 3   #!\n    actions: [{comment: x}]",
     "count: only applies to trigger occurrence_count"),
    ("    trigger: status_changed\n    sla: resolution   #!\n    actions: [{comment: x}]",
     "sla: only applies to trigger sla_breached"),
    ("    trigger: occurrence_count\n    actions: [{comment: x}]",
     "is missing required key 'count'"),
    ("    trigger: occurrence_count\n    count: 1   #!\n    actions: [{comment: x}]",
     "count: must be an integer of at least 2, got 1"),
    ("    trigger: occurrence_count\n    count: ten   #!\n    actions: [{comment: x}]",
     "count: must be an integer of at least 2, got 'ten'"),
    ("    trigger: sla_breached\n    sla: response   #!\n    actions: [{comment: x}]",
     "sla: unknown SLA 'response'; use one of first_response, resolution"),
    ("    trigger: case_created", "automation_rules[0].actions: rule 'a' needs at least one action"),
    ("    trigger: case_created\n    actions: []   #!", "needs at least one action"),
    ("    trigger: case_created\n    actions:\n      - {comment: x, set_priority: P1}   #!",
     "actions[0]: each action is a one-key mapping"),
    ("    trigger: case_created\n    actions:\n      - comment: ok\n      - escalate: default   #!",
     "actions[1]: unknown action 'escalate'; use one of set_priority, assign, comment, set_status, page"),
    ("    trigger: case_created\n    actions:\n      - set_priority: P9   #!",
     "actions[0].set_priority: unknown priority 'P9'; use one of P1, P2, P3, P4, P5"),
    ("    trigger: case_created\n    actions:\n      - assign: u-zed   #!",
     "actions[0].assign: unknown user 'u-zed'; define it under 'users:' or use one of: u-alice, u-bob"),
    ("    trigger: case_created\n    actions:\n      - set_status: CLOSED   #!",
     "actions[0].set_status: unknown status 'CLOSED' of tenant 'on-call'"),
    ("    trigger: case_created\n    actions:\n      - page: critical   #!",
     "actions[0].page: unknown escalation policy 'critical'; define it under 'escalation_policies:' "
     "or use one of: default"),
    ("    trigger: case_created\n    actions:\n      - comment: \"\"   #!", "must be a non-empty string"),
    ("    trigger: case_created\n    conditions: {severity: bad}   #!\n    actions: [{comment: x}]",
     "conditions.severity: unknown severity 'bad'"),
    ("    trigger: case_created\n    conditions: {host: x}   #!\n    actions: [{comment: x}]",
     "conditions: unknown key 'host'"),
    ("    trigger: case_created\n    when: now   #!\n    actions: [{comment: x}]",
     "automation_rules[0]: unknown key 'when'"),
    ("    trigger: case_created\n    actions: [{comment: x}]\n  - id: a   #!\n    trigger: case_created\n"
     "    actions: [{comment: y}]", "duplicate rule id 'a'"),
])
def test_automation_validation(tmp_path, body, expected):
    # a missing key is reported at the start of its rule
    head = AUTO if "#!" in body else AUTO.replace("  - id: a\n", "  - id: a   #!\n")
    assert expected in error(tmp_path, head + body + "\n")


def test_rule_ids_are_per_section(tmp_path):
    c = load(tmp_path, BASE + "routing_rules:\n  - {id: x, escalation_policy: default}\n"
                              "automation_rules:\n  - {id: x, trigger: case_created, actions: [{comment: c}]}\n")
    assert c.routing_rules[0].id == c.automation_rules[0].id == "x"


# --------------------------------------------------------------------------
# SLAs: parse_slas's dotted paths mapped to lines
# --------------------------------------------------------------------------


def test_sla_bad_duration(tmp_path):
    text = "slas:\n  P1: {first_response: 15m, resolution: 4h}\n  P2:\n    first_response: 1h\n    resolution: x   #!\n"
    assert error(tmp_path, text).startswith("slas.P2.resolution: a duration like")


def test_sla_bad_priority(tmp_path):
    assert error(tmp_path, "slas:\n  P1: {first_response: 1m}\n  P0: {first_response: 1m}   #!\n") \
        == "slas.P0: priorities are P1-P5"


def test_sla_resolution_before_response(tmp_path):
    assert "must not be shorter" in error(tmp_path, "slas:\n  P1: {first_response: 1h, resolution: 5m}   #!\n")


def test_sla_not_a_mapping(tmp_path):
    assert error(tmp_path, "users: {}\nslas: [P1]   #!\n").startswith("slas: a mapping")


# --------------------------------------------------------------------------
# path -> line, matching
# --------------------------------------------------------------------------


def test_locate_follows_keys_with_dots_and_indexes():
    leaf = Node("v", "f", 7)
    item = Node({"x": leaf}, "f", 6, {"x": 7})
    seq = Node([Node("a", "f", 4), item], "f", 4)
    team = Node({"members": seq}, "f", 3, {"members": 4})
    root = Node({"teams": Node({"sre.eu": team, "sre": Node({}, "f", 9)}, "f", 2, {"sre.eu": 2, "sre": 9})},
                 "f", 1, {"teams": 1})
    assert locate(root, "teams.sre.eu.members[1].x") == (leaf, 7)
    assert locate(root, "teams.sre.eu.members[1]")[1] == 6
    assert locate(root, "teams.sre.eu.members[5].x") == (seq, 4)    # past the end: the deepest node found
    assert locate(root, "teams.sre.eu.nothing")[1] == 2
    assert locate(root, "teams.sre")[1] == 9
    assert locate(root, "elsewhere") == (root, 1)


def test_matches():
    assert matches({}, {})
    crit = {"severity": ("critical", "error"), "tags": ("db", "disk")}
    assert matches(crit, {"severity": "error", "tags": ["web", "disk"]})
    assert not matches(crit, {"severity": "error", "tags": ["web"]})
    assert not matches(crit, {"severity": "error"})
    assert not matches(crit, {"severity": "info", "tags": ["db"]})
    assert not matches({"component": ("postgres",)}, {"component": None})


# --------------------------------------------------------------------------
# ConfigWatcher
# --------------------------------------------------------------------------

POLICY_2 = BASE + "  second:\n    steps:\n      - escalate_after_seconds: 60\n        targets: [{team: sre}]\n"


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __call__(self, outcome: str, detail: str) -> None:
        self.calls.append((outcome, detail))


def rewrite(p: Path, text: str) -> None:
    """New content with an mtime surely different from the previous one (no sleeping)."""
    before = p.stat().st_mtime_ns if p.exists() else 0
    p.write_text(text)
    t = before + 1_000_000_000
    os.utime(p, ns=(t, t))


@pytest.fixture
def parses(monkeypatch):
    """Counts how often the file is parsed."""
    count = [0]
    real = oc._parse

    def counting(*a, **kw):
        count[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(oc, "_parse", counting)
    return count


def test_watcher_loads_at_start_and_check_without_change_does_not_parse(tmp_path, parses):
    p = write(tmp_path, BASE)
    w = ConfigWatcher(ONCALL, p)
    assert set(w.current.policies) == {"default"} and w.last_error is None
    assert parses[0] == 1
    assert w.check() is False and w.check() is False
    assert parses[0] == 1


def test_watcher_touch_with_same_content_does_not_parse(tmp_path, parses):
    p = write(tmp_path, BASE)
    w = ConfigWatcher(ONCALL, p)
    rewrite(p, BASE)
    assert w.check() is False
    assert parses[0] == 1


def test_watcher_invalid_at_start_raises(tmp_path):
    p = write(tmp_path, "nonsense: 1\n")
    with pytest.raises(ConfigError, match=r":1: on-call config: unknown key 'nonsense'"):
        ConfigWatcher(ONCALL, p)


def test_watcher_detects_changes_and_rejects_invalid_ones(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="casestream.config")
    p = write(tmp_path, BASE)
    calls = Recorder()
    w = ConfigWatcher(ONCALL, p, on_reload=calls)
    first = w.current

    # a valid change takes effect
    rewrite(p, POLICY_2)
    assert w.check() is True
    assert set(w.current.policies) == {"default", "second"}
    digest2 = hashlib.sha256(POLICY_2.encode()).hexdigest()
    assert w.current.digest == digest2 != first.digest
    assert calls.calls == [("ok", digest2)]
    assert any(digest2 in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert w.check() is False

    # an invalid change is rejected: the previous config stays, the error is recorded and reported
    bad = POLICY_2 + "routing_rules:\n  - id: a\n    escalation_policy: nope\n"
    rewrite(p, bad)
    caplog.clear()
    assert w.check() is False
    assert w.current.digest == digest2
    assert w.last_error is not None and w.last_error.startswith(f"{p}:{len(bad.splitlines())}: routing_rules[0].escalation_policy:")
    assert calls.calls[-1] == ("error", w.last_error)
    assert [r.levelno for r in caplog.records] == [logging.ERROR] and w.last_error in caplog.records[0].getMessage()
    assert w.check() is False and len(calls.calls) == 2   # reported once per change

    # a valid change after that takes effect and clears the error
    good = POLICY_2 + "routing_rules:\n  - id: a\n    escalation_policy: second\n"
    rewrite(p, good)
    assert w.check() is True
    assert w.last_error is None
    assert w.current.routing_rules[0].escalation_policy_id == "second"
    assert calls.calls[-1] == ("ok", w.current.digest)


def test_watcher_reverting_to_the_running_file_clears_the_error(tmp_path, parses):
    p = write(tmp_path, BASE)
    calls = Recorder()
    w = ConfigWatcher(ONCALL, p, on_reload=calls)
    rewrite(p, "bad: key\n")
    assert w.check() is False and w.last_error
    rewrite(p, BASE)
    assert w.check() is False
    assert w.last_error is None and calls.calls[-1] == ("ok", w.current.digest)
    assert parses[0] == 2   # start + the bad file; the reverted file is recognised by its digest


def test_watcher_reload_rereads_without_a_stat_change(tmp_path):
    p = write(tmp_path, BASE)
    calls = Recorder()
    w = ConfigWatcher(ONCALL, p, on_reload=calls)
    st = p.stat()
    p.write_text(POLICY_2)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))   # same mtime; the size differs but reload ignores stat
    assert w.reload() is True
    assert "second" in w.current.policies
    assert w.reload() is False          # unchanged
    assert calls.calls == [("ok", w.current.digest)]
    p.write_text("ack_timeout: never\n")
    assert w.reload() is False
    assert "second" in w.current.policies
    assert w.last_error.startswith(f"{p}:1: ack_timeout:")
    assert calls.calls[-1] == ("error", w.last_error)


def test_watcher_file_deleted_after_start_is_the_empty_config(tmp_path, caplog):
    p = write(tmp_path, BASE)
    calls = Recorder()
    w = ConfigWatcher(ONCALL, p, on_reload=calls)
    p.unlink()
    assert w.check() is True
    assert w.current == empty_config(ONCALL)
    assert calls.calls == [("ok", "")]
    assert any(r.levelno == logging.WARNING and r.name == "casestream.config" for r in caplog.records)
    assert w.check() is False and w.reload() is False


def test_watcher_file_created_after_start(tmp_path):
    p = tmp_path / "on-call.yaml"
    w = ConfigWatcher(ONCALL, p)
    assert w.current.source is None
    assert w.check() is False
    p.write_text(BASE)
    assert w.check() is True
    assert w.current.source == str(p) and "default" in w.current.policies


def test_watcher_callback_failure_does_not_break_reloading(tmp_path):
    p = write(tmp_path, BASE)

    def boom(outcome, detail):
        raise RuntimeError("metrics down")

    w = ConfigWatcher(ONCALL, p, on_reload=boom)
    rewrite(p, POLICY_2)
    assert w.check() is True and "second" in w.current.policies
