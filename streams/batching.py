"""The Faust stream class of casestream's apps: batches that sleep while idle.

Every agent takes batches (``stream.take_events(max_, within)``). Faust's
``take_events`` waits for a full buffer with a timeout of ``within`` and, when
the timeout passes with nothing buffered, simply waits again: an idle agent
wakes every ``within`` (the intake agents every 20 ms, the delivery agent
every 50 ms), and each wake-up goes through mode's ``wait_first`` (new
futures and tasks). That was most of an idle worker's CPU (bench/RESULTS.md,
"Idle CPU"). ``QuietStream.take_events`` is Faust's, with one change: while the
buffer is empty it waits for the first event without a timeout; from then on
a batch is handed over when it is full or ``within`` after its first event
arrived. The buffer's back-pressure and the hand-over are Faust's
(faust-streaming 0.15, ``faust/streams.py``); acking differs in one thing: a
batch whose handling raised (or was cancelled), and what is still buffered
when the stream stops, is acknowledged as *not processed*
(``streams.rebalance.mark_unsafe``): no commit passes it, and a stopping
worker does not wait for it.
"""

from __future__ import annotations

import asyncio
from asyncio import CancelledError
from typing import Any, AsyncGenerator, Optional

import faust
from faust.streams import _tracks_buffer_agen
from mode import want_seconds
from mode.utils.aiter import aiter
from mode.utils.futures import notify

from streams.rebalance import mark_unsafe


class QuietStream(faust.Stream):
    """``faust.Stream`` whose ``take_events`` does not wake up while nothing is buffered."""

    @_tracks_buffer_agen
    async def take_events(self, max_: int, within: Any) -> AsyncGenerator[list, None]:
        events: list = []
        arrived = asyncio.Event()        # the buffer holds at least one event
        buffer_full = asyncio.Event()
        buffer_consumed = asyncio.Event()
        timeout = want_seconds(within) if within else None
        stream_enable_acks: bool = self.enable_acks
        buffer_consuming: Optional[asyncio.Future] = None
        channel_it = aiter(self.channel)

        async def add_to_buffer(value: Any) -> Any:
            try:
                nonlocal buffer_consuming
                if buffer_consuming is not None:  # a batch is being handled: hold new events until it is
                    try:
                        await buffer_consuming
                    finally:
                        buffer_consuming = None
                event = self.current_event
                if event is None:
                    raise RuntimeError("Take buffer found current_event is None")
                events.append(event)
                arrived.set()
                if len(events) >= max_:
                    buffer_full.set()
                    buffer_consumed.clear()
                    await self.wait(buffer_consumed)  # never more than max_ events in a batch
            except CancelledError:  # pragma: no cover
                raise
            except Exception as exc:
                self.log.exception("Error adding to take buffer: %r", exc)
                await self.crash(exc)
            return value

        self.enable_acks = False  # events are acked here, once their batch has been handled
        self.add_processor(add_to_buffer)
        self._enable_passive(channel_it)
        try:
            while not self.should_stop:
                if not events:
                    await self.wait_for_stopped(arrived)  # idle: asleep until an event arrives
                    continue
                await self.wait_for_stopped(buffer_full, timeout=timeout)
                if events:
                    buffer_consuming = self.loop.create_future()
                    handled = False
                    try:
                        yield list(events)
                        handled = True
                    finally:
                        for event in events:
                            if not handled:  # the agent failed or was cancelled: not processed
                                mark_unsafe(event.message)
                            await self.ack(event)
                        events.clear()
                        arrived.clear()
                        notify(buffer_consuming)
                        buffer_full.clear()
                        buffer_consumed.set()
        finally:
            # the stream stopped with events never handed over: done with, not processed (the
            # consumer's stop waits for every event to be acknowledged; the next owner processes them)
            for event in events:
                mark_unsafe(event.message)
                await self.ack(event)
            events.clear()
            self.enable_acks = stream_enable_acks
            self._processors.remove(add_to_buffer)
