"""The engines a benchmark runs on: ``streams.engines`` in a temporary directory.

    from bench_engines import add_engines_arg, running_engines, stop

    ap = argparse.ArgumentParser(); add_engines_arg(ap); args = ap.parse_args()
    with running_engines(args.engines, only=("kafka",)) as env:   # KAFKA_BOOTSTRAP_SERVERS, ...
        ...

Free ports, a fresh data directory (readable by the unprivileged account
PostgreSQL and Elasticsearch run as when we are root), everything stopped and
removed at the end.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streams.engines import Engines, choose_profile  # noqa: E402


def add_engines_arg(ap) -> None:
    ap.add_argument("--engines", choices=["apache", "standin"], default=None,
                    help="Apache Kafka (+ Elasticsearch) or the noida-db stand-in; PostgreSQL either way "
                         "(default: CASESTREAM_ENGINES, else apache where a JDK 17+ and Maven are present, "
                         "else standin)")


@contextmanager
def running_engines(profile: str | None, only: tuple[str, ...] | None = None):
    """Start the engines of ``profile`` serving ``only`` these services (None: all) on free
    ports; yield their addresses (KAFKA_BOOTSTRAP_SERVERS, ELASTICSEARCH_URL, POSTGRES_DSN)."""
    profile, why = choose_profile(profile)
    # a benchmark stopped with SIGTERM (timeout, kill) still runs its cleanup: no engines or workers left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    root = Path(tempfile.mkdtemp(prefix=f"casestream-bench-{profile}-"))
    root.chmod(0o755)
    engines = Engines(root)
    try:
        engines.up(profile, {"kafka": 0, "elasticsearch": 0, "postgres": 0}, only=only)
        versions = ", ".join(f"{r.engine.label} {r.engine.version}" for r in engines.running().values())
        print(f"engines: {profile} ({why}): {versions}", flush=True)
        yield engines.env()
    finally:
        engines.down()
        shutil.rmtree(root, ignore_errors=True)


def stop(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM a process the benchmark started; SIGKILL it if it has not exited after ``timeout`` s
    (never leave a worker behind, spinning against a stopped broker)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
