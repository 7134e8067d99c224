"""tenants.yaml / topics.yaml loading and their file:line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import PROJECT_ROOT, ConfigError, app_id_for, get_tenant, load_tenants, load_topics

GOOD = """\
tenants:
  t1:
    display_name: T One
    case_type: S
    work_type: C
    case_id_prefix: TA
    statuses: [OPEN, CLOSED]
    default_status: OPEN
    final_status: CLOSED
    transitions:
      OPEN: [CLOSED]
      CLOSED: [OPEN]
    actions:
      acknowledge: OPEN
      resolve: CLOSED
"""


def write(tmp_path: Path, text: str, name: str = "tenants.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def line_of(text: str, needle: str) -> int:
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return n
    raise AssertionError(needle)


def config_error(loader, p: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        loader(p)
    return str(exc.value)


# --------------------------------------------------------------------------
# the real tenants.yaml
# --------------------------------------------------------------------------

EXPECTED = {
    "case-management": dict(display_name="Case Management", case_type="STANDARD", work_type="CASE",
                            case_id_prefix="CM", default_status="OPEN", final_status="CLOSED",
                            statuses=("OPEN", "IN_PROGRESS", "CLOSED")),
    "on-call": dict(display_name="OnCall", case_type="ON_CALL", work_type="PAGE",
                    case_id_prefix="PG", default_status="TRIGGERED", final_status="RESOLVED",
                    statuses=("TRIGGERED", "ACKNOWLEDGED", "RESOLVED")),
}


def test_load_real_tenants():
    tenants = load_tenants()
    assert sorted(tenants) == ["case-management", "on-call"]
    for name, want in EXPECTED.items():
        t = tenants[name]
        assert t.name == name
        for k, v in want.items():
            assert getattr(t, k) == v, (name, k)
    assert load_tenants(PROJECT_ROOT / "tenants.yaml") == tenants


def test_is_open():
    t = load_tenants()["on-call"]
    assert t.is_open("TRIGGERED") and t.is_open("ACKNOWLEDGED") and not t.is_open("RESOLVED")


def test_get_tenant():
    assert get_tenant("on-call").display_name == "OnCall"
    with pytest.raises(ConfigError) as exc:
        get_tenant("nope")
    msg = str(exc.value)
    assert "'nope'" in msg
    assert "case-management" in msg and "on-call" in msg


# --------------------------------------------------------------------------
# errors with file and line
# --------------------------------------------------------------------------


def test_good_minimal_file_loads(tmp_path):
    t = load_tenants(write(tmp_path, GOOD))["t1"]
    assert t.allows("OPEN", "CLOSED") and t.allows("CLOSED", "OPEN")
    assert t.display_name == "T One"


def test_unknown_transition_target_names_file_and_line(tmp_path):
    text = GOOD.replace("CLOSED: [OPEN]", "CLOSED: [OPENED]")
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert line_of(text, "[OPENED]") == 12
    assert f"{p}:12:" in msg
    assert "'OPENED'" in msg
    assert "OPEN, CLOSED" in msg  # says what to use


def test_unknown_transition_target_in_block_list(tmp_path):
    text = GOOD.replace("      CLOSED: [OPEN]\n", "      CLOSED:\n        - OPEN\n        - REOPENED\n")
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert f"{p}:{line_of(text, '- REOPENED')}:" in msg
    assert "'REOPENED'" in msg


def test_unknown_transition_source_flow(tmp_path):
    text = GOOD.replace("CLOSED: [OPEN]", "CLOSD: [OPEN]")
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert f"{p}:12:" in msg and "'CLOSD'" in msg


@pytest.mark.parametrize("old,new,needle,word", [
    ("      CLOSED: [OPEN]\n", "      CLOSD:\n        - OPEN\n", "CLOSD:", "'CLOSD'"),
    ("    work_type: C\n", "    work_type: C\n    colour:\n      - red\n", "colour:", "'colour'"),
    ("    work_type: C\n", "    work_type: C\n    colour:\n      x: red\n", "colour:", "'colour'"),
    ("      acknowledge: OPEN\n", "      acknowledge: OPEN\n      escalate:\n        - OPEN\n", "escalate:",
     "'escalate'"),
    ("      acknowledge: OPEN\n", "      acknowledge: OPEN\n      escalate: OPEN\n", "escalate:", "'escalate'"),
], ids=["transition-source", "unknown-key", "unknown-key-mapping", "unknown-action-block", "unknown-action"])
def test_key_errors_point_at_the_key_line(tmp_path, old, new, needle, word):
    assert old in GOOD
    text = GOOD.replace(old, new)
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert f"{p}:{line_of(text, needle)}:" in msg, msg
    assert word in msg


def test_unknown_status_in_default_status(tmp_path):
    text = GOOD.replace("default_status: OPEN", "default_status: NEW")
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert f"{p}:8:" in msg and "'NEW'" in msg


@pytest.mark.parametrize("old,new,start,needle", [
    ("statuses: [OPEN, CLOSED]", "statuses: [OPEN, CLOSED", 7, "statuses:"),
    ("display_name: T One", 'display_name: "T One', 3, "display_name:"),
], ids=["unclosed-flow-sequence", "unclosed-quote"])
def test_yaml_syntax_error_says_where_the_construct_started(tmp_path, old, new, start, needle):
    assert old in GOOD
    text = GOOD.replace(old, new)
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert msg.startswith(f"{p}:"), msg
    assert "YAML" in msg
    error_line = int(msg[len(str(p)) + 1:].split(":", 1)[0])
    assert error_line > start
    assert line_of(text, needle) == start
    assert f"starts at line {start}" in msg, msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = GOOD.replace("    case_type: S\n", "   case_type: S\n")  # bad indentation on line 4
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert f"{p}:4:" in msg
    assert "YAML" in msg


def test_unknown_key_is_named(tmp_path):
    text = GOOD.replace("    work_type: C\n", "    work_type: C\n    colour: red\n")
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert "'colour'" in msg
    assert f"{p}:6:" in msg
    assert "display_name" in msg  # lists the allowed keys


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, GOOD + "extras: 1\n")
    msg = config_error(load_tenants, p)
    assert "'extras'" in msg and f"{p}:16:" in msg


def test_duplicate_key(tmp_path):
    text = GOOD.replace("    work_type: C\n", "    work_type: C\n    work_type: D\n")
    p = write(tmp_path, text)
    msg = config_error(load_tenants, p)
    assert f"{p}:6:" in msg and "duplicate" in msg and "'work_type'" in msg


@pytest.mark.parametrize("old,new,words", [
    ("    case_type: S\n", "", ["'case_type'"]),
    ("final_status: CLOSED", "final_status: OPEN", ["final_status"]),
    ("      resolve: CLOSED", "      resolve: OPEN", ["actions.resolve"]),
    ("      acknowledge: OPEN\n", "", ["'acknowledge'"]),
    ("      acknowledge: OPEN", "      acknowledge: OPEN\n      escalate: OPEN", ["'escalate'"]),
    ("case_id_prefix: TA", "case_id_prefix: ta", ["case_id_prefix"]),
    ("statuses: [OPEN, CLOSED]", "statuses: [OPEN, OPEN]", ["statuses"]),
    ("      OPEN: [CLOSED]", "      OPEN: [OPEN, CLOSED]", ["OPEN -> OPEN"]),
    ("  t1:", "  T1:", ["'T1'"]),
], ids=["missing-key", "final-equals-default", "resolve-not-final", "missing-action", "unknown-action",
        "bad-prefix", "duplicate-status", "self-transition", "bad-tenant-name"])
def test_validation_errors(tmp_path, old, new, words):
    assert old in GOOD
    p = write(tmp_path, GOOD.replace(old, new))
    msg = config_error(load_tenants, p)
    assert msg.startswith(f"{p}:")
    for w in words:
        assert w in msg, msg


def test_duplicate_case_id_prefix(tmp_path):
    second = GOOD.split("\n", 1)[1].replace("  t1:", "  t2:")
    p = write(tmp_path, GOOD + second)
    msg = config_error(load_tenants, p)
    assert "'TA'" in msg and "'t1'" in msg


def test_missing_and_empty_file(tmp_path):
    msg = config_error(load_tenants, tmp_path / "absent.yaml")
    assert "absent.yaml" in msg and "not found" in msg
    p = write(tmp_path, "# nothing\n")
    assert f"{p}:1:" in config_error(load_tenants, p)


# --------------------------------------------------------------------------
# topics.yaml
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["case-management", "on-call"])
def test_load_topics_names(tenant):
    fam = load_topics(tenant)
    assert fam.tenant == tenant
    assert fam.app_id == app_id_for(tenant) == f"casestream-{tenant}"
    assert fam.name("intake") == f"{tenant}.intake"
    assert fam.name("intake-routed") == f"{tenant}.intake-routed"
    assert fam.name("domain-events") == f"{tenant}.domain-events"
    assert fam.name("dlq") == f"{tenant}.dlq"
    assert fam.name("timers") == f"{tenant}.timers"
    assert fam.tables == ("keys", "case_keys", "timers", "deliveries", "delivery_outcomes")
    assert fam.changelog("keys").name == f"casestream-{tenant}-keys-changelog"
    assert fam.changelog("case_keys").name == f"casestream-{tenant}-case_keys-changelog"
    assert fam.changelog("keys").config == {"cleanup.policy": "compact", "max.message.bytes": "4194304"}
    names = sorted(t.name for t in fam.all_topics())
    assert names == sorted([f"{tenant}.intake", f"{tenant}.intake-routed", f"{tenant}.domain-events",
                            f"{tenant}.dlq", f"{tenant}.timers", f"{tenant}.notifications",
                            f"casestream-{tenant}-keys-changelog", f"casestream-{tenant}-case_keys-changelog",
                            f"casestream-{tenant}-timers-changelog", f"casestream-{tenant}-deliveries-changelog",
                            f"casestream-{tenant}-delivery_outcomes-changelog"])
    assert fam.partitions == 8 and fam.replication_factor == 1
    assert all(t.partitions == 8 for t in fam.all_topics())
    assert fam.topics["domain-events"].config["retention.ms"] == "-1"
    assert fam.topics["intake"].config == {"retention.ms": "604800000", "max.message.bytes": "1048576"}


def test_topic_families_are_isolated():
    a, b = load_topics("case-management"), load_topics("on-call")
    na = {t.name for t in a.all_topics()}
    nb = {t.name for t in b.all_topics()}
    assert len(na) == len(nb) == 11
    assert not na & nb
    assert a.app_id != b.app_id


TOPICS = """\
partitions: 4
topics:
  intake:
    name: "{tenant}.in"
  intake-routed:
    name: "{tenant}.routed"
  domain-events:
    name: "{tenant}.events"
    partitions: 2
  dlq:
    name: "{tenant}.dlq"
  timers:
    name: "{tenant}.timers"
  notifications:
    name: "{tenant}.notifications"
"""


def test_load_topics_from_file(tmp_path):
    fam = load_topics("x", write(tmp_path, TOPICS, "topics.yaml"))
    assert fam.name("intake") == "x.in"
    assert fam.topics["domain-events"].partitions == 2
    assert fam.topics["intake"].partitions == 4
    assert fam.tables == ()


@pytest.mark.parametrize("old,new,line,word", [
    ('    name: "{tenant}.dlq"', '    name: "shared.dlq"', 11, "{tenant}"),
    ("  dlq:\n", "  dead:\n", None, "'dlq'"),
    ("partitions: 4", "partitions: 0", 1, "partitions"),
    ('    name: "{tenant}.in"', '    name: "{tenant}.in"\n    retention: 1', 5, "'retention'"),
], ids=["name-without-tenant", "missing-dlq", "zero-partitions", "unknown-key"])
def test_topics_errors(tmp_path, old, new, line, word):
    assert old in TOPICS
    p = write(tmp_path, TOPICS.replace(old, new), "topics.yaml")
    msg = config_error(lambda path: load_topics("x", path), p)
    assert msg.startswith(f"{p}:"), msg
    if line is not None:
        assert f"{p}:{line}:" in msg, msg
    assert word in msg


def test_routed_partitions_error_points_at_partitions_line(tmp_path):
    text = TOPICS.replace('  intake-routed:\n    name: "{tenant}.routed"\n',
                          '  intake-routed:\n    name: "{tenant}.routed"\n    partitions: 3\n')
    p = write(tmp_path, text, "topics.yaml")
    msg = config_error(lambda path: load_topics("x", path), p)
    assert "intake-routed" in msg and "4" in msg
    assert line_of(text, "partitions: 3") == 7
    assert msg.startswith(f"{p}:7:"), msg  # the line of the 'partitions:' key


def test_index_name_defaults_and_can_be_configured(tmp_path):
    from sinks.elasticsearch import index_name

    tenants = load_tenants()
    assert index_name(tenants["on-call"]) == "cases-on-call"
    assert index_name(tenants["case-management"], "tmp_") == "tmp_cases-case-management"
    text = (PROJECT_ROOT / "tenants.yaml").read_text().replace(
        "  on-call:\n", "  on-call:\n    index: oncall-pages\n", 1)
    (tmp_path / "t.yaml").write_text(text)
    assert index_name(load_tenants(tmp_path / "t.yaml")["on-call"]) == "oncall-pages"
    (tmp_path / "bad.yaml").write_text(text.replace("oncall-pages", "OnCall Pages"))
    with pytest.raises(ConfigError, match="index must be lower-case"):
        load_tenants(tmp_path / "bad.yaml")
