"""streams.batching.QuietStream: Faust's take_events batches, without waking up while idle.

In-process (Faust's agent test context, no broker)."""

import asyncio
import uuid

import faust

from streams.batching import QuietStream


def _run(tmp_path, stream_class, feed, within=0.05):
    """Batches an agent taking ``take_events(3, within)`` hands over for
    the values ``feed(agent, batches)`` puts, and the timeouts of the stream's waits."""
    app = faust.App(f"t-batching-{uuid.uuid4().hex[:6]}", Stream=stream_class, web_enabled=False,
                    autodiscover=False, datadir=str(tmp_path))
    batches: list[list] = []
    timeouts: list = []

    @app.agent()
    async def batcher(stream):
        wait = stream.wait_for_stopped

        async def recorded(*args, timeout=None):
            timeouts.append(timeout)
            return await wait(*args, timeout=timeout)

        stream.wait_for_stopped = recorded
        async for events in stream.take_events(3, within=within):
            batches.append([e.value for e in events])
            yield len(events)

    async def main():
        async with batcher.test_context() as agent:
            await feed(agent, batches)

    asyncio.run(asyncio.wait_for(main(), 30))
    return batches, timeouts


def test_batches_are_at_most_max_and_a_partial_one_is_handed_over(tmp_path):
    async def feed(agent, batches):
        await asyncio.gather(*(agent.put(i) for i in range(7)))
        while sum(map(len, batches)) < 7:  # bounded by _run's wait_for
            await asyncio.sleep(0.01)

    batches, _ = _run(tmp_path, QuietStream, feed, within=1.0)
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_idle_stream_waits_without_timeout(tmp_path):
    async def idle(agent, batches):
        await asyncio.sleep(0.3)  # six times `within`, nothing sent

    _, timeouts = _run(tmp_path, QuietStream, idle)
    assert timeouts == [None]  # one wait for the first event, no wake-up every `within`
    _, faust_timeouts = _run(tmp_path, faust.Stream, idle)
    assert len(faust_timeouts) > 1 and set(faust_timeouts) == {0.05}  # what it replaces


def test_batch_timeout_counts_from_the_first_event(tmp_path):
    async def feed(agent, batches):
        await agent.put("a")
        while not batches:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # idle again
        await asyncio.gather(agent.put("b"), agent.put("c"))
        while sum(map(len, batches)) < 3:
            await asyncio.sleep(0.01)

    batches, timeouts = _run(tmp_path, QuietStream, feed)
    assert batches[0] == ["a"] and sum(batches[1:], []) == ["b", "c"]
    assert timeouts[:3] == [None, 0.05, None]  # idle, a batch open, idle again
