"""Local Kafka + Elasticsearch for development and tests (noida-db).

``casestream services up`` starts the pinned ``noida-db`` binary with
``--only kafka,elasticsearch`` (this machine's own PostgreSQL is used as is)
on configurable ports, data under ``$CASESTREAM_DATA_DIR/services``, and
waits until both answer. Production and docker-compose use real servers;
nothing else in casestream knows about this module.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ServiceError(RuntimeError):
    pass


def noida_binary() -> str:
    here = Path(sys.executable).parent / "noida-db"
    if here.exists():
        return str(here)
    found = shutil.which("noida-db")
    if not found:
        raise ServiceError("noida-db is not installed; run 'make install' (it is pinned in pyproject.toml)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


@dataclass
class LocalServices:
    data_dir: Path
    kafka_port: int = 9092
    es_port: int = 9200
    host: str = "127.0.0.1"

    @property
    def kafka(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def elasticsearch(self) -> str:
        return f"http://{self.host}:{self.es_port}"

    def _args(self, *cmd: str) -> list[str]:
        return [noida_binary(), *cmd, "--data-dir", str(self.data_dir)]

    def running(self) -> dict[str, bool]:
        return {"kafka": tcp_open(self.host, self.kafka_port),
                "elasticsearch": http_ok(self.elasticsearch)}

    def up(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if all(self.running().values()):
            return
        args = self._args("up") + ["--only", "kafka,elasticsearch",
                                   "--kafka-port", str(self.kafka_port),
                                   "--elasticsearch-port", str(self.es_port), "--host", self.host]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"noida-db up failed ({proc.returncode}): {_clean(proc.stderr or proc.stdout)}")
        self.wait(timeout)

    def start_foreground(self, log_path: Path) -> subprocess.Popen:
        """Run in the foreground as a child process (test fixtures)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = self._args("start") + ["--only", "kafka,elasticsearch",
                                      "--kafka-port", str(self.kafka_port),
                                      "--elasticsearch-port", str(self.es_port), "--host", self.host]
        log = open(log_path, "ab")
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.running()
            if all(state.values()):
                return
            time.sleep(0.2)
        down = [k for k, v in self.running().items() if not v]
        raise ServiceError(f"{', '.join(down)} did not answer within {timeout:.0f}s "
                           f"(kafka {self.kafka}, elasticsearch {self.elasticsearch})")

    def stop_service(self, name: str) -> None:
        """Stop one service of the running server (its data is kept)."""
        proc = subprocess.run(self._args("stop", name), capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"noida-db stop {name} failed: {_clean(proc.stderr or proc.stdout)}")

    def start_service(self, name: str) -> None:
        proc = subprocess.run(self._args("start", name), capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"noida-db start {name} failed: {_clean(proc.stderr or proc.stdout)}")

    def down(self) -> None:
        proc = subprocess.run(self._args("down"), capture_output=True, text=True)
        if proc.returncode != 0 and any(self.running().values()):
            raise ServiceError(f"noida-db down failed: {_clean(proc.stderr or proc.stdout)}")


def _clean(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "GLIBC_2.39" not in ln]
    return " ".join(lines).strip() or "(no output)"
