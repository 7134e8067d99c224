"""The download cache and the tools that fill it: a JDK and Maven.

Jars and the Elasticsearch distribution come from Maven Central, fetched by
Maven from the small poms in ``streams/engines/maven/`` into a cache outside
the checkout:

* ``CASESTREAM_CACHE_DIR`` if set;
* else, as root, ``/var/cache/casestream`` (readable by the unprivileged
  account Elasticsearch runs as, which cannot enter ``/root``);
* else ``$XDG_CACHE_HOME/casestream`` (default ``~/.cache/casestream``).

Maven's own repository lives under it (``m2/``), so a second fetch, or a
second checkout, downloads nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from streams.engines.process import EngineError

POMS = Path(__file__).resolve().parent / "maven"


def cache_dir() -> Path:
    env = os.environ.get("CASESTREAM_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if os.geteuid() == 0:
        return Path("/var/cache/casestream")
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "casestream"


# --------------------------------------------------------------------------
# JDK
# --------------------------------------------------------------------------


def java_major(java: Path) -> int | None:
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _java_candidates() -> list[Path]:
    found = []
    if os.environ.get("JAVA_HOME"):
        found.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        found.append(Path(on_path).resolve())
    found += sorted(Path("/usr/lib/jvm").glob("*/bin/java"))
    return found


def find_java(minimum: int = 17, maximum: int | None = None) -> tuple[Path, int]:
    """A ``java`` of major version ``minimum``..``maximum``: JAVA_HOME first,
    then the one on PATH, then /usr/lib/jvm. Returns (java home, major)."""
    for java in _java_candidates():
        if not java.exists():
            continue
        major = java_major(java)
        if major is not None and major >= minimum and (maximum is None or major <= maximum):
            return java.resolve().parent.parent, major
    want = f"{minimum}" + (f" to {maximum}" if maximum else " or newer")
    raise EngineError(f"Apache Kafka and Elasticsearch need a JDK {want}, and none was found "
                      f"(JAVA_HOME, PATH, /usr/lib/jvm); install one (Debian: apt-get install openjdk-17-jdk-headless) "
                      f"or use the stand-in: --engines standin")


def have_jdk(minimum: int = 17) -> bool:
    try:
        find_java(minimum)
    except EngineError:
        return False
    return shutil.which("mvn") is not None


# --------------------------------------------------------------------------
# Maven
# --------------------------------------------------------------------------

_DOWNLOADED = re.compile(r"Downloaded from \S+: (\S+) \(([\d.,]+) ([kMG]?B)")
_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def maven_fetch(pom: str, out_dir: Path, what: str, properties: dict[str, str]) -> Path:
    """Resolve the dependencies of ``maven/<pom>`` (with ``properties``)
    into ``out_dir``, once: a finished fetch leaves ``out_dir/.complete``.
    Progress goes to stderr; Maven's output to ``<cache>/logs``."""
    if (out_dir / ".complete").exists():
        return out_dir
    mvn = shutil.which("mvn")
    if not mvn:
        raise EngineError(f"{what} is fetched from Maven Central by Maven, which is not installed "
                          f"(Debian: apt-get install maven); or use the stand-in: --engines standin")
    java_home, _ = find_java(17)
    cache = cache_dir()
    log_path = cache / "logs" / f"maven-{out_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    args = [mvn, "-B", "-f", str(POMS / pom), f"-Dmaven.repo.local={cache / 'm2'}",
            f"-Dcasestream.out={partial}", *(f"-D{k}={v}" for k, v in properties.items()),
            "dependency:copy-dependencies"]
    env = dict(os.environ, JAVA_HOME=str(java_home))
    progress = _Progress(what, cache)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(cache))
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = _DOWNLOADED.search(line)
            if m:
                progress.add(float(m.group(2).replace(",", "")) * _UNITS[m.group(3)])
        code = proc.wait()
    progress.done(code == 0)
    if code != 0:
        errors = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if "[ERROR]" in ln]
        first = errors[0].replace("[ERROR]", "").strip() if errors else "(no error line)"
        raise EngineError(f"fetching {what} from Maven Central failed: {first[:300]} (full log: {log_path})")
    shutil.rmtree(out_dir, ignore_errors=True)
    (partial / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    partial.rename(out_dir)
    return out_dir


class _Progress:
    """One line of download progress on stderr (rewritten in place on a terminal)."""

    def __init__(self, what: str, cache: Path) -> None:
        self.what, self.files, self.bytes = what, 0, 0.0
        self.tty = sys.stderr.isatty()
        self.last = time.monotonic()
        print(f"fetching {what} from Maven Central (first time; cached in {cache})", file=sys.stderr, flush=True)

    def add(self, size: float) -> None:
        self.files += 1
        self.bytes += size
        now = time.monotonic()
        if self.tty:
            print(f"\r  {self.files} files, {self.bytes / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)
        elif now - self.last > 5:
            print(f"  {self.files} files, {self.bytes / 1e6:.1f} MB so far", file=sys.stderr, flush=True)
            self.last = now

    def done(self, ok: bool) -> None:
        end = "\r" if self.tty else ""
        state = "done" if ok else "failed"
        print(f"{end}  {self.files} files, {self.bytes / 1e6:.1f} MB: {state}", file=sys.stderr, flush=True)
