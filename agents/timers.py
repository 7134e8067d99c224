"""Due timers, and the on-call configuration's hot reload.

Pending timers are stream state (``entry["oncall"]`` in the ``keys`` table,
see ``streams/domain/oncall.py``); the ``timers`` table is their index
(timer id -> due time, case, dedup key), kept in step with the entries by
the apply agent and partitioned like them. Faust lets tables change only
inside stream iteration, so a timer does not fire here: every ``tick`` this
scheduler scans the index of its own partitions and sends each timer that is
due by the worker's clock to ``T.timers``, keyed like ``T.intake-routed``
(the same partition). The apply agent reads both topics and fires a timer
only while it is still pending in the entry, so re-sending is harmless: a
timer not applied within ``RESEND_SECONDS`` (a crash, a lost send) is sent
again. After a restart or a rebalance, the restored index still holds every
timer that has not fired, so each fires exactly once, late at most by the
recovery time.

The on-call configuration file is checked every tick (a stat) and re-read
on SIGHUP; an invalid file is logged and the previous configuration stays.
"""

from __future__ import annotations

import logging
import signal
import time

import orjson

from streams import metrics
from agents.topology import Topology, ensure_relay_topics
from streams.domain.intake import routing_token
from streams.domain.oncall import TIMER_KINDS

log = logging.getLogger("casestream.timers")

RESEND_SECONDS = 30.0


def due_timers(index_items, now_ms: int, sent: dict[str, float], mono: float,
               resend_seconds: float = RESEND_SECONDS) -> tuple[list[dict], dict[str, int]]:
    """The timers to send now, and the count pending by kind. ``sent``
    (timer id -> when last sent, monotonic) is updated and pruned."""
    out: list[dict] = []
    pending = dict.fromkeys(TIMER_KINDS, 0)
    alive: set[str] = set()
    for _key, raw in index_items:
        t = orjson.loads(raw)
        pending[t["kind"]] = pending.get(t["kind"], 0) + 1
        alive.add(t["timer_id"])
        if t["due_at"] > now_ms:
            continue
        last = sent.get(t["timer_id"])
        if last is not None and mono - last < resend_seconds:
            continue
        sent[t["timer_id"]] = mono
        out.append(t)
    for tid in [tid for tid in sent if tid not in alive]:
        del sent[tid]
    return out, pending


def register(topo: Topology, tick: float = 0.5) -> None:
    app, tname = topo.app, topo.tenant.name
    sent: dict[str, float] = {}

    @app.timer(interval=tick, name=f"{topo.family.app_id}.timers")
    async def fire_due_timers():
        topo.oncall.check()
        await ensure_relay_topics(topo)  # a subscription added by a reload
        if not app.tables.recovery.completed.is_set():
            return  # the index is still being restored
        now = topo.clock.now_ms()
        due, pending = due_timers(topo.timers.items(), now, sent, time.monotonic())
        for kind, n in pending.items():
            metrics.TIMERS_PENDING.labels(tname, kind).set(n)
        for t in due:
            topo.timers_topic.send_soon(key=routing_token(t["dedup_key"]).encode(), value=orjson.dumps(t))
            metrics.TIMERS_FIRED.labels(tname, t["kind"]).inc()
            metrics.TIMER_LATENESS.labels(tname).observe(max(0, now - t["due_at"]) / 1000)
        if due:
            log.info("timers: sent %d due timer(s) of %s", len(due), tname)

    @app.task
    async def reload_on_sighup():
        import asyncio

        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, topo.oncall.reload)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            log.warning("SIGHUP reload unavailable; the config file is still watched")
