"""What every local engine is: a process, its ports, its directory, a probe."""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from streams.engines.process import RunAs, run_as

HOST = "127.0.0.1"


class Engine:
    """One server process under ``home`` (a directory of the data dir).

    Subclasses name the ``services`` they serve (kafka, elasticsearch,
    postgres) and the ``ports`` they need; the first port of each service
    is the one clients use. ``install`` fills the download cache,
    ``prepare`` writes configuration and formats storage (both idempotent),
    ``command`` is what to run, ``ready`` asks the server itself.
    """

    name = ""                 # its key in the state file
    label = ""                # for people
    services: tuple[str, ...] = ()
    port_names: tuple[str, ...] = ()
    stop_signal = 15          # SIGTERM
    start_timeout = 60.0
    needs_unprivileged = False  # refuses to run as root

    def __init__(self, home: Path, ports: dict[str, int], version: str | None = None) -> None:
        self.home = home
        self.ports = dict(ports)
        self.version = version or self.default_version()

    # -- to override -----------------------------------------------------------
    @classmethod
    def default_version(cls) -> str:
        raise NotImplementedError

    def install(self) -> None:
        pass

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def address(self, service: str) -> str:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.home / f"{self.name}.log"

    @property
    def user(self) -> RunAs | None:
        return run_as() if self.needs_unprivileged else None

    def env_vars(self) -> dict[str, str]:
        names = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "elasticsearch": "ELASTICSEARCH_URL",
                 "postgres": "POSTGRES_DSN"}
        return {names[s]: self.address(s) for s in self.services}


def base_env() -> dict[str, str]:
    """The environment a server is started with: ours, minus what would
    point it at other servers' settings."""
    env = dict(os.environ)
    for k in ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "KAFKA_OPTS", "KAFKA_HEAP_OPTS", "ES_JAVA_OPTS",
              "ES_PATH_CONF", "PGDATA", "PGPORT", "PGHOST"):
        env.pop(k, None)
    return env


def kafka_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when a broker answers a metadata request (an open port is not enough)."""
    from streams import kafka

    async def probe() -> bool:
        client = kafka.client(bootstrap, request_timeout_ms=int(timeout * 1000),
                              connections_max_idle_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
            return bool(client.cluster.brokers())
        finally:
            await client.close()

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(probe())
    except Exception:
        return False
    finally:
        quiet.setLevel(level)


def http_json(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read() or b""
    except OSError:
        return 0, b""
