"""The stand-in: ``noida-db`` (PyPI) serving Kafka and Elasticsearch from one
binary, for a zero-Java quick start. Its known gaps (README "Engines"): a
group coordinator that never evicts a departed member, no ``percentiles``,
records in memory, idle consumers that spin."""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

from streams.engines.base import HOST, Engine, base_env, http_json, kafka_answers
from streams.engines.process import EngineError


def noida_binary() -> str:
    here = Path(sys.executable).parent / "noida-db"
    if here.exists():
        return str(here)
    found = shutil.which("noida-db")
    if not found:
        raise EngineError("noida-db is not installed; run 'make install' (it is pinned in pyproject.toml)")
    return found


class Standin(Engine):
    name = "standin"
    label = "noida-db (stand-in)"
    services = ("kafka", "elasticsearch")
    port_names = ("kafka", "elasticsearch")
    start_timeout = 60.0

    @classmethod
    def default_version(cls) -> str:
        try:
            return metadata.version("noida-db")
        except metadata.PackageNotFoundError:
            return "unknown"

    def install(self) -> None:
        noida_binary()

    def command(self):
        return [noida_binary(), "start", "--only", "kafka,elasticsearch", "--host", HOST,
                "--kafka-port", str(self.ports["kafka"]), "--elasticsearch-port", str(self.ports["elasticsearch"]),
                "--data-dir", str(self.home / "data")], base_env()

    def address(self, service: str) -> str:
        if service == "kafka":
            return f"{HOST}:{self.ports['kafka']}"
        return f"http://{HOST}:{self.ports['elasticsearch']}"

    def ready(self) -> bool:
        status, _ = http_json(self.address("elasticsearch") + "/")
        return 200 <= status < 300 and kafka_answers(self.address("kafka"))
