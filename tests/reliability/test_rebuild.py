"""Scenarios 7 and 10 of the reliability suite: state rebuilt from the logs, on the session's workers.

7. Replay from offset 0: a generated history for both tenants (raw Kafka and gateway requests;
   triggers, acknowledges, resolves, commands, redeliveries) applied by the session's workers; then
   ``casestream replay --sink all --from-beginning`` (the command) rebuilds both projections from
   ``T.domain-events`` into a side prefix: every row of ``cases``, ``timeline`` and ``case_states``
   and every search document of the run's cases equals the live one, and both equal the oracle.
10. The worker's local store (RocksDB: its data directory) deleted between runs: after a first
   history is applied, each tenant's worker is stopped, its data directory deleted and the worker
   started again; a second history on the same keys then decides as the oracle says -- a trigger on
   a case opened before counts an occurrence, a resolve closes it, a trigger after a resolve opens
   a new case, a redelivery of a message applied before has no effect: the state the worker
   restored from the changelog topics is the state it had.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.reliability.generator import Generator
from tests.reliability.harness import Gateway, Run, watchdog
from tests.reliability.report import PeakRss, Report, record, scale

pytestmark = pytest.mark.integration

TENANTS = ("case-management", "on-call")


@pytest.fixture(scope="module")
def gateway(stack, tmp_path_factory):
    g = Gateway(stack, tmp_path_factory.mktemp("reliability-gateway"), TENANTS)
    yield g
    g.stop()


def _perform(runs: dict[str, Run], steps, gateway: Gateway) -> None:
    for step in steps:
        runs[step.tenant].perform(step, gateway)


def _report(scenario: str, engine: str, runs: dict[str, Run], verdicts: dict, started: float, rss: PeakRss,
            notes: str) -> Report:
    for t, v in verdicts.items():
        print(f"\n{scenario} ({t}): {runs[t].marks}\n  {v}")
    print(f"  watchdog {watchdog(next(iter(runs.values())).stack)}")
    vs = verdicts.values()
    return record(Report(scenario, engine, sum(v.stats["acked"] for v in vs), sum(v.stats["effects"] for v in vs),
                         sum(v.lost for v in vs), sum(v.doubled for v in vs), sum(v.divergent for v in vs),
                         round(time.monotonic() - started, 1), rss.peak, notes))


def test_replay_from_offset_zero_rebuilds_both_projections(stack, engine_set, gateway, tmp_path, run_id):
    started, rss = time.monotonic(), PeakRss()
    runs = {t: Run(stack, t, tmp_path / t, run_id) for t in TENANTS}
    _perform(runs, Generator(run_id, tenants=TENANTS, seed=7, keys=30, gateway=0.2).steps(scale(400)), gateway)
    verdicts = {t: run.verdict(replay="cli") for t, run in runs.items()}
    rss.sample(stack.cm.proc.pid, stack.oncall.proc.pid)
    history = [runs[t].history for t in TENANTS]
    compared = {table: sum(len(h.replay_pg_rows[table]) for h in history) for table in ("cases", "timeline")}
    docs = sum(len(h.replay_es_docs) for h in history)
    report = _report("7 replay from offset 0", engine_set.profile, runs, verdicts, started, rss,
                     f"rebuilt by `casestream replay --sink all --from-beginning`; compared {compared['cases']} "
                     f"cases rows (and their case_states), {compared['timeline']} timeline rows, {docs} documents")
    report.assert_clean("\n".join(map(str, verdicts.values())))
    # the rebuild held every case of the run (a replay that rebuilt nothing would compare nothing)
    assert all(len(h.replay_pg_rows["cases"]) == len(h.pg_rows["cases"]) == len(h.pg_states) > 0 and
               len(h.replay_es_docs) == len(h.es_docs) == len(h.pg_states) for h in history)


def test_store_deleted_between_runs_state_rebuilt_from_changelog(stack, engine_set, gateway, tmp_path, run_id):
    started, rss = time.monotonic(), PeakRss()
    runs = {t: Run(stack, t, tmp_path / t, run_id) for t in TENANTS}
    generator = Generator(run_id, tenants=TENANTS, seed=10, keys=30, gateway=0.15, redeliveries=0.15)
    steps = generator.steps(scale(300))
    _perform(runs, steps, gateway)
    sent = {m["event_id"] for s in steps for m in s.messages if "event_id" in m}
    first = {t: {e["event_id"]: e for e in run.events()} for t, run in runs.items()}   # phase 1 applied
    for run in runs.values():
        run.mark("first run applied")
    workers = (stack.cm, stack.oncall)
    for w in workers:
        rss.sample(w.proc.pid)
        w.stop()
        assert w.data_dir.is_dir() and any(w.data_dir.iterdir()), f"no store in {w.data_dir}"
        shutil.rmtree(w.data_dir)
    for w in workers:
        w.start()
    second = generator.steps(scale(300))
    _perform(runs, second, gateway)
    verdicts = {t: run.verdict(replay=None) for t, run in runs.items()}
    rss.sample(*(w.proc.pid for w in workers))
    # what the second run decided on state from the first: the test is only as good as these
    decided = {"occurrences on earlier cases": 0, "earlier cases closed": 0, "new cases on earlier keys": 0}
    for t, run in runs.items():
        earlier = {e["case_id"] for e in first[t].values()}
        keys = {e["dedup_key"] for e in first[t].values()}
        for e in run.model().events:
            if e["event_id"] in first[t] or not run.mine(e):
                continue
            if e["type"] == "AlertDeduplicated" and e["case_id"] in earlier:
                decided["occurrences on earlier cases"] += 1
            elif e["type"] == "StatusChanged" and e["case_id"] in earlier and \
                    e["to_status"] == run.tenant.final_status:
                decided["earlier cases closed"] += 1
            elif e["type"] == "CaseCreated" and e["dedup_key"] in keys:
                decided["new cases on earlier keys"] += 1     # the case sequence goes on: -2, -3, ...
    redelivered = sum(1 for s in second for m in s.messages if m.get("event_id") in sent)
    report = _report("10 store deleted between runs", engine_set.profile, runs, verdicts, started, rss,
                     f"both tenants' data directories deleted after {sum(len(f) for f in first.values())} events; "
                     f"second run on the restored state: {decided}, redeliveries of the first {redelivered}")
    report.assert_clean("\n".join(map(str, verdicts.values())))
    assert all(decided.values()) and redelivered, (decided, redelivered)
    assert all(w.alive() for w in workers), stack.diagnostics()
