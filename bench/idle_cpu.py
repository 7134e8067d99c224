"""Idle CPU: what a worker, a `casestream tail` and `casestream api` cost with no traffic.

    .venv/bin/python bench/idle_cpu.py [--engines apache,standin] [--window 30] [--rounds 3] [--json]

For each engine profile: the engines (``streams.engines``) on free ports in a
temporary directory, topics and the tenant databases; then, one at a time and
in rounds (interleaved, so machine noise spreads over all of them):

* ``worker-on-call``: ``casestream worker --tenant on-call`` with the shipped
  ``oncall/on-call.yaml`` and both projections (the default worker);
* ``worker-case-management``: the same for ``--tenant case-management``;
* ``tail``: ``casestream tail --tenant on-call`` (new domain events only);
* ``api``: ``casestream api`` (every route);
* ``engines-alone``: no casestream process, the engines only (context).

Each process is started, waited for until it is ready (a worker: its health
line shows assigned partitions and no lag; tail: connected to Kafka; api:
``/ready`` answers 200), left alone ``--settle`` seconds, then sampled over
``--window`` seconds: utime + stime from ``/proc/<pid>/stat`` of the process
and every descendant (reaped children through cutime + cstime), as percent of
one core. The engines' processes are sampled over the same window. Then the
process is stopped (SIGTERM) and the next one starts.

The machine may be shared (other tests, the JVMs): run several rounds and
report the spread (min, median, max), not one figure.
Figures go to bench/RESULTS.md by hand, with the machine and the date.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.engines import Engines, choose_profile, free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROCESSES = ("worker-on-call", "worker-case-management", "tail", "api", "engines-alone")


# -- /proc sampling -------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime + cutime + cstime in ticks) of one process, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2:].split()
    return int(f[1]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def tree_ticks(roots: list[int]) -> int:
    """CPU ticks used so far by ``roots`` and all their descendants (threads included:
    /proc/<pid>/stat counts every thread of a process; reaped children are in
    their parent's cutime/cstime)."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _stat(int(d))
            if s is not None:
                stats[int(d)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, [r for r in roots if r in stats], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo += children.get(pid, [])
    return total


def sample(procs: list[int], engines: list[int], window: float) -> tuple[float, float]:
    """Percent of one core used over ``window`` seconds by ``procs`` (with their
    children) and by the engines' processes."""
    a, ea, t0 = tree_ticks(procs), tree_ticks(engines), time.monotonic()
    time.sleep(window)  # the measurement window
    b, eb, t1 = tree_ticks(procs), tree_ticks(engines), time.monotonic()
    el = t1 - t0
    return 100.0 * (b - a) / CLK_TCK / el, 100.0 * (eb - ea) / CLK_TCK / el


# -- readiness ----------------------------------------------------------------------


def connected_to(pid: int, port: int) -> bool:
    """Whether ``pid`` holds an established TCP connection to 127.0.0.1:``port``."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.match(r"socket:\[(\d+)\]", link)
            if m:
                inodes.add(m.group(1))
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "01" and f[9] in inodes and int(f[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


HEALTH = re.compile(r"health (\{.*\})")


def worker_ready(log: Path) -> bool:
    """The last health line shows assigned partitions, a known lag of 0 and flow active."""
    try:
        lines = HEALTH.findall(log.read_text(errors="replace"))
    except OSError:
        return False
    if not lines:
        return False
    h = orjson.loads(lines[-1])
    return h["partitions"] > 0 and h["lag"] == 0 and h["flow_active"]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# -- one set of engines ---------------------------------------------------------------


class Bench:
    def __init__(self, profile: str, root: Path, settle: float, ready_timeout: float) -> None:
        self.profile, self.root, self.settle, self.ready_timeout = profile, root, settle, ready_timeout
        self.engines = Engines(root / "engines")
        self.env: dict[str, str] = {}
        self.kafka_port = 0
        self.prefix = f"csidle_{uuid.uuid4().hex[:6]}_"
        self.runs = 0

    def up(self) -> None:
        self.engines.up(self.profile, {"kafka": 0, "elasticsearch": 0, "postgres": 0})
        self.env = dict(os.environ, **self.engines.env(), PYTHONPATH=str(ROOT), CASESTREAM_DB_PREFIX=self.prefix,
                        CASESTREAM_INDEX_PREFIX=self.prefix, CASESTREAM_ONCALL_DIR=str(ROOT / "oncall"),
                        CASESTREAM_DATA_DIR=str(self.root / "data"))
        self.kafka_port = int(self.env["KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
        # the tenants' topic families and the relay topics of the shipped subscriptions
        subprocess.run([sys.executable, "-m", "streams.cli", "topics", "create"], env=self.env, cwd=str(ROOT),
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "streams.cli", "db", "migrate"], env=self.env, cwd=str(ROOT),
                       check=True, stdout=subprocess.DEVNULL)

    def engine_pids(self) -> list[int]:
        return [r.pid for r in self.engines.running().values() if r.alive]

    def down(self) -> None:
        self.engines.down()

    def measure(self, name: str, window: float) -> dict:
        """Start ``name``, wait until it is ready and settled, sample, stop it."""
        if name == "engines-alone":
            time.sleep(self.settle)
            cpu, eng = sample([], self.engine_pids(), window)
            return {"cpu": cpu, "engines_cpu": eng, "ready_s": 0.0}
        self.runs += 1
        log = self.root / f"{name}-{self.runs}.log"  # one log per run: readiness is read from this run's lines
        port = free_port()
        args = {
            "worker-on-call": ["worker", "--tenant", "on-call", "--instance-id", "idle-on-call"],
            "worker-case-management": ["worker", "--tenant", "case-management", "--instance-id", "idle-cm"],
            "tail": ["tail", "--tenant", "on-call"],
            "api": ["api", "--port", str(port)],
        }[name]
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "streams.cli", *args], env=self.env, cwd=str(ROOT),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            ready = {
                "worker-on-call": lambda: worker_ready(log),
                "worker-case-management": lambda: worker_ready(log),
                "tail": lambda: connected_to(proc.pid, self.kafka_port),
                "api": lambda: http_ok(f"http://127.0.0.1:{port}/ready"),
            }[name]
            t0 = time.monotonic()
            while not ready():
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited ({proc.returncode}); see {log}")
                if time.monotonic() - t0 > self.ready_timeout:
                    raise SystemExit(f"{name} not ready within {self.ready_timeout:.0f}s; see {log}")
                time.sleep(0.25)  # readiness polling, bounded above
            ready_s = time.monotonic() - t0
            time.sleep(self.settle)  # let start-up work (recovery, first fetches, JIT-less warm-up) pass
            cpu, eng = sample([proc.pid], self.engine_pids(), window)
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited during the window ({proc.returncode}); see {log}")
            return {"cpu": cpu, "engines_cpu": eng, "ready_s": ready_s}
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def run_profile(profile: str, names: list[str], rounds: int, window: float, settle: float,
                ready_timeout: float, keep: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"casestream-idle-{profile}-"))
    root.chmod(0o755)  # PostgreSQL and Elasticsearch run as an unprivileged account when we are root
    bench = Bench(profile, root, settle, ready_timeout)
    results: dict[str, list[dict]] = {n: [] for n in names}
    try:
        print(f"[{profile}] starting engines in {root}", file=sys.stderr, flush=True)
        bench.up()
        versions = {r.engine.label: r.engine.version for r in bench.engines.running().values()}
        for rnd in range(rounds):
            for name in names:
                r = bench.measure(name, window)
                results[name].append(r)
                print(f"[{profile}] round {rnd + 1}/{rounds} {name}: {r['cpu']:.2f} % "
                      f"(engines {r['engines_cpu']:.1f} %, ready after {r['ready_s']:.1f}s)",
                      file=sys.stderr, flush=True)
    finally:
        bench.down()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {"profile": profile, "versions": versions, "window_s": window, "settle_s": settle, "rounds": rounds,
            "processes": {n: summarize(rs) for n, rs in results.items()}}


def summarize(rs: list[dict]) -> dict:
    cpu = [r["cpu"] for r in rs]
    eng = [r["engines_cpu"] for r in rs]
    return {"cpu_percent": [round(c, 2) for c in cpu], "median": round(statistics.median(cpu), 2),
            "min": round(min(cpu), 2), "max": round(max(cpu), 2),
            "engines_cpu_percent_median": round(statistics.median(eng), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=None,
                    help="comma-separated profiles: apache, standin (default: choose_profile(), "
                         "i.e. CASESTREAM_ENGINES, else apache where a JDK 17+ and Maven are present)")
    ap.add_argument("--processes", default=",".join(PROCESSES),
                    help=f"comma-separated subset of {', '.join(PROCESSES)}")
    ap.add_argument("--window", type=float, default=30.0, help="seconds sampled per measurement (default 30)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds left alone after ready (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per process (default 3)")
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stopped: still clean up
    profiles = args.engines.split(",") if args.engines else [choose_profile()[0]]
    names = [n for n in args.processes.split(",") if n]
    unknown = set(names) - set(PROCESSES) | {p for p in profiles if p not in ("apache", "standin")}
    if unknown:
        ap.error(f"unknown: {', '.join(sorted(unknown))}")
    out = [run_profile(p, names, args.rounds, args.window, args.settle, args.ready_timeout, args.keep)
           for p in profiles]
    if args.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    for res in out:
        print(f"\nengines: {res['profile']} ({', '.join(f'{k} {v}' for k, v in res['versions'].items())}); "
              f"window {res['window_s']:g} s after {res['settle_s']:g} s settle, {res['rounds']} round(s); "
              f"% of one core")
        print(f"{'process':<24} {'median':>7} {'min':>7} {'max':>7}  {'rounds':<28} {'engines (median)':>16}")
        for name, s in res["processes"].items():
            print(f"{name:<24} {s['median']:>7.2f} {s['min']:>7.2f} {s['max']:>7.2f}  "
                  f"{', '.join(f'{c:.2f}' for c in s['cpu_percent']):<28} {s['engines_cpu_percent_median']:>16.1f}")


if __name__ == "__main__":
    main()
