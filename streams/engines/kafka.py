"""Apache Kafka, KRaft mode, one combined broker + controller node.

Jars from Maven Central (``maven/kafka.pom.xml``); storage formatted once
with ``kafka.tools.StorageTool format``; started with ``java -cp …
kafka.Kafka server.properties``. Broker settings are the test-friendly
ones of a single node: replication factors 1, no initial rebalance delay,
session timeouts down to 1 s allowed.
"""

from __future__ import annotations

import base64
import os
import subprocess

from streams.engines.base import HOST, Engine, base_env, kafka_answers
from streams.engines.cache import cache_dir, find_java, maven_fetch
from streams.engines.process import EngineError

KAFKA_VERSION = "4.0.2"
LOG4J_VERSION = "2.24.3"
HEAP = os.environ.get("CASESTREAM_KAFKA_HEAP", "512m")

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


class ApacheKafka(Engine):
    name = "kafka"
    label = "Apache Kafka"
    services = ("kafka",)
    port_names = ("kafka", "controller")
    start_timeout = 90.0

    @classmethod
    def default_version(cls) -> str:
        return os.environ.get("CASESTREAM_KAFKA_VERSION", KAFKA_VERSION)

    @property
    def libs(self):
        return cache_dir() / f"kafka-{self.version}"

    def install(self) -> None:
        maven_fetch("kafka.pom.xml", self.libs, f"Apache Kafka {self.version}",
                    {"kafka.version": self.version, "log4j.version": LOG4J_VERSION})

    def properties(self) -> str:
        port, ctl = self.ports["kafka"], self.ports["controller"]
        return "\n".join([
            "# written by casestream (streams/engines/kafka.py) at every start",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{HOST}:{ctl}",
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{ctl}",
            f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={self.home / 'data'}",
            "num.partitions=8",
            "auto.create.topics.enable=false",  # topics come from casestream (topics create, the worker)
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "group.min.session.timeout.ms=1000",  # tests use short session timeouts
            "",
        ])

    def _java(self) -> str:
        home, _ = find_java(17)
        return str(home / "bin" / "java")

    def prepare(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        (self.home / "server.properties").write_text(self.properties())
        (self.home / "log4j2.properties").write_text(LOG4J2)
        if (self.home / "data" / "meta.properties").exists():
            return
        cluster_id = _cluster_id()
        fmt = subprocess.run([self._java(), f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                              "-cp", f"{self.libs}/*", "kafka.tools.StorageTool", "format", "-t", cluster_id,
                              "-c", str(self.home / "server.properties")],
                             capture_output=True, text=True, env=base_env())
        if fmt.returncode != 0:
            raise EngineError(f"formatting Kafka storage in {self.home / 'data'} failed: "
                              f"{(fmt.stderr or fmt.stdout).strip().splitlines()[-1:]}")

    def command(self):
        args = [self._java(), f"-Xms{HEAP}", f"-Xmx{HEAP}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp", f"{self.libs}/*", "kafka.Kafka", str(self.home / "server.properties")]
        return args, base_env()

    def address(self, service: str) -> str:
        return f"{HOST}:{self.ports['kafka']}"

    def ready(self) -> bool:
        return kafka_answers(self.address("kafka"))


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid
