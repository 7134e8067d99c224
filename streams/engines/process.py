"""Processes of the local engines: spawn detached, tell alive, stop, wait.

An engine runs in a session of its own (``start_new_session``), so it
outlives the command that started it and a signal to its process group
reaches the JVM or server and every child. A PID recorded in a state file
is trusted only together with the process's start time (``/proc``), so a
reused PID is never taken for the engine.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class EngineError(RuntimeError):
    """An engine could not be installed, started or reached; the message says what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int | None, started: int | None = None) -> bool:
    """True while ``pid`` runs (and is the process that started at ``started``)."""
    if not pid:
        return False
    try:  # reap it if it is our own child that has exited
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    now = start_time(pid)
    return now is not None and (started is None or now == started)


@dataclass(frozen=True)
class RunAs:
    """The account a server runs under (PostgreSQL and Elasticsearch refuse root)."""

    name: str
    uid: int
    gid: int

    def demote(self) -> None:  # preexec_fn: in the child, before exec
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)

    def own(self, path: Path) -> None:
        """Give ``path`` (and everything under it) to this account."""
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                os.chown(os.path.join(root, n), self.uid, self.gid, follow_symlinks=False)

    def can_write(self, path: Path) -> bool:
        """Whether this account can create files in ``path`` (asked as that account)."""
        probe = subprocess.run(["test", "-w", str(path), "-a", "-x", str(path)], preexec_fn=self.demote)
        return probe.returncode == 0

    def can_read(self, path: Path) -> bool:
        probe = subprocess.run(["test", "-r", str(path)], preexec_fn=self.demote)
        return probe.returncode == 0


def run_as() -> RunAs | None:
    """None when not root; else the unprivileged account servers run as:
    ``CASESTREAM_SERVICE_USER``, default ``nobody``."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("CASESTREAM_SERVICE_USER", "nobody")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise EngineError(f"PostgreSQL and Elasticsearch refuse to run as root, and the account '{name}' "
                          f"they would run as does not exist; create it or set CASESTREAM_SERVICE_USER") from None
    return RunAs(name, pw.pw_uid, pw.pw_gid)


def spawn(args: list[str], log_path: Path, *, env: dict | None = None, cwd: Path | None = None,
          user: RunAs | None = None) -> subprocess.Popen:
    """Start ``args`` detached (own session), output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(cwd) if cwd else None, start_new_session=True,
                                    preexec_fn=user.demote if user else None)
        except OSError as exc:
            raise EngineError(f"cannot run {args[0]}: {exc.strerror}") from None


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def terminate(pid: int, started: int | None, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Ask the process group to stop; SIGKILL it after ``timeout`` seconds."""
    if not alive(pid, started):
        return
    signal_group(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, started):
            return
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.1)


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_ready(what: str, probe: Callable[[], bool], *, timeout: float, pid: int, started: int | None,
               log_path: Path, interval: float = 0.25) -> None:
    """Poll ``probe`` until it holds; fail at the deadline or when the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if not alive(pid, started):
            raise EngineError(f"{what} exited during start-up; its log {log_path} ends:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise EngineError(f"{what} did not answer within {timeout:.0f}s; its log {log_path} ends:\n"
                              f"{tail(log_path)}")
        time.sleep(interval)
