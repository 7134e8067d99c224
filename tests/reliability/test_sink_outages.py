"""Scenario 6 of the reliability suite: the projections' servers unreachable for a while under a steady feed.

Elasticsearch is stopped, and right after it is back PostgreSQL, each while a steady feed of alerts
(``Feeder``: triggers, acknowledges, resolves on many keys) flows in. Intake and projections run as
separate workers (``--role intake`` / ``--role projections``), so the projections worker's memory is the
sinks' alone (the intake worker's RocksDB write buffers grow with the input, outage or not). Each outage
lasts until ``scale(150)`` more intake records are acknowledged, plus the engine's stop and start (CI:
~20-30 s each; the recorded run is longer). It proves:

* the sink pauses: intake keeps flowing, the other projection keeps up with what is acknowledged
  while one is away (the first ``KEEPS_UP`` records: within the paused agent's stream buffer), no
  transient error becomes a dead letter (the tenant's ``T.dlq`` holds nothing of the run), and no worker
  is restarted;
* the projections worker's memory stays bounded: its peak RSS at the end is within a generous bound
  of its peak before the first outage -- a paused sink waits for its server, it does not hoard what
  arrives meanwhile;
* full catch-up: both projections equal the fold of the log for every case of the run, and a rebuild
  from it (the checker of ``tests/reliability/checker.py``; the documents compared field for field).

The fresh stack has a Kafka of its own but shares the session's Elasticsearch and PostgreSQL: stopping
them pauses every stack of the session, so each is started again in a ``finally`` (``start_engine``
returns when it answers). Not on the stand-in, which serves Kafka and the index from one process (an
index outage there is a broker outage), nor on external servers.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import pytest

from sinks.elasticsearch import document
from streams.domain import cases as domain
from tests.integration.test_projection_faults import _indexed, _projected
from tests.reliability.checker import clean
from tests.reliability.report import PeakRss, Report, record, scale
from tests.reliability.test_faults import Feeder, Run

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.environ.get("CASESTREAM_TEST_EXTERNAL") == "1",
                                 reason="stops the local Elasticsearch and PostgreSQL; not done to external servers")]

TENANT = "case-management"
RSS_BOUND_MIB = 100.0   # growth allowed over the peak before the outages (generous: GC, fetch buffers)
# the other projection keeps up while the paused agent's stream buffer (4 096 events) has room; past it the
# consumer pauses the domain-event partitions for both (README, "PostgreSQL projection")
KEEPS_UP = 1000


@pytest.fixture(autouse=True)
def _own_engines(engine_set):
    if engine_set.profile != "apache":
        pytest.skip("stops the session's Elasticsearch and PostgreSQL: only with the local Apache engines "
                    "(the stand-in serves Kafka and the index from one process)")


def _latest(run: Run) -> dict[str, int]:
    """Case id -> the version the inputs acknowledged so far lead to (the model's)."""
    latest: dict[str, int] = {}
    for e in run.model().events:
        if run.mine(e):
            latest[e["case_id"]] = max(latest.get(e["case_id"], 0), e["version"])
    return latest


def _reached(got: dict[str, int], want: dict[str, int]) -> bool:
    return all(got.get(cid, 0) >= v for cid, v in want.items())


def _figures(verdict) -> tuple[int, int, int]:
    """(lost, doubled, divergent) of a verdict: inputs without their effect, effects twice, the rest."""
    lost = doubled = divergent = 0
    for kind, items in verdict.anomalies.items():
        if kind in ("lost", "relay_lost", "delivery_lost"):
            lost += len(items)
        elif kind.endswith("conflict") or kind == "delivery_differs":
            doubled += len(items)
        else:
            divergent += len(items)
    return lost, doubled, divergent


def _documents_off_the_fold(run: Run) -> list[str]:
    """Cases whose search document is not the document of the fold of their events in the log."""
    events: dict[str, dict[int, dict]] = defaultdict(dict)
    for e in run.history.events:
        events[e["case_id"]][e["version"]] = clean(e)
    return sorted(cid for cid, evs in events.items() if run.history.es_docs.get(cid) !=
                  document(domain.replay(run.tenant, [evs[v] for v in sorted(evs)])))


def test_elasticsearch_then_postgres_unreachable_under_a_steady_feed(fresh_stack, engine_set, tmp_path, run_id):
    stack, outage = fresh_stack, scale(150)
    run = Run(stack, TENANT, tmp_path, run_id)
    intake = stack.worker(TENANT, instance_id=f"intake-{run_id}", role="intake", env=run.env)
    projector = stack.worker(TENANT, instance_id=f"projections-{run_id}", role="projections", env=run.env)
    rss, want = PeakRss(), {}

    def watch(read):
        """``read``, sampling the projections worker's peak RSS on the way."""
        def fn():
            rss.sample(projector.proc.pid)
            return read()
        return fn

    def pg():
        return _projected(stack, TENANT, want)

    def es():
        return _indexed(stack, TENANT, want)

    def through_outage(service: str, other, other_name: str) -> float:
        """``service`` stopped until ``outage`` more records are acknowledged, the other projection having
        everything acknowledged within the paused agent's buffer; started again (and answering) whatever
        happens."""
        nonlocal want
        stopped = time.monotonic()
        stack.stop_engine(service)
        try:
            n = feed.acked()
            stack.poll(watch(feed.acked), lambda k: k >= n + min(outage, KEEPS_UP),
                       what=f"the feed while {service} is down")
            want = _latest(run)
            stack.poll(watch(other), lambda got: _reached(got, want), deadline=120,
                       what=f"{other_name} keeping up while {service} is down")
            stack.poll(watch(feed.acked), lambda k: k >= n + outage, what=f"the rest of the {service} outage")
        finally:
            stack.start_engine(service)
        return round(time.monotonic() - stopped, 1)

    feed = Feeder(run, keys=60, per_round=10, pause=0.2)
    feed.start()
    try:
        stack.poll(lambda: feed.acked(), lambda k: k >= 100, what="the feed under way")
        want = _latest(run)
        stack.poll(watch(lambda: (pg(), es())), lambda got: _reached(got[0], want) and _reached(got[1], want),
                   deadline=120, what="both projections before the outages")
        before = rss.peak
        run.mark("steady")
        es_down = through_outage("elasticsearch", pg, "PostgreSQL")
        run.mark("elasticsearch back")
        # PostgreSQL goes right away: Elasticsearch catches up while it is away
        pg_down = through_outage("postgres", es, "Elasticsearch")
        run.mark("postgres back")
    finally:
        feed.stop()
    want = _latest(run)
    stack.poll(watch(lambda: (pg(), es())), lambda got: got == (want, want), deadline=180,
               what="both projections caught up")
    run.mark("caught up")
    verdict = run.verdict()
    dead = stack.read(TENANT, "dlq", lambda r: run.prefix in (r.get("original") or ""), until=lambda f: True,
                      settle=1.0)
    off_fold = _documents_off_the_fold(run)
    rss.sample(projector.proc.pid)
    lost, doubled, divergent = _figures(verdict)
    report = record(Report(
        "6 elasticsearch then postgres unreachable", engine_set.profile, feed.acked(),
        verdict.stats["distinct_events"], lost, doubled, divergent + len(dead) + len(off_fold),
        round(time.monotonic() - run.started, 1), rss.peak,
        f"outages (stop to answering again): elasticsearch {es_down}s, postgres {pg_down}s, {outage} records "
        f"acknowledged during each; projections worker peak rss {before and round(before, 1)} MiB before the "
        f"outages; dead letters {len(dead)}; documents off the fold {len(off_fold)}; watchdog restarts "
        f"{intake.restarts + projector.restarts}; marks {run.marks}"))
    assert rss.peak <= before + RSS_BOUND_MIB, f"the projections worker grew from {before:.0f} to {rss.peak:.0f} MiB"
    assert intake.restarts == projector.restarts == 0 and intake.alive() and projector.alive(), stack.diagnostics()
    report.assert_clean(f"{verdict}\ndead letters: {[d.get('detail') for d in dead[:3]]}\n"
                        f"documents off the fold: {off_fold[:5]}")
