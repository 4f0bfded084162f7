"""The batcher's adaptive wait and concurrent batches (one per runtime instance), with plain
asyncio. Waits are bounded generously: these check behaviour, not speed."""

from __future__ import annotations

import asyncio

import pytest

from snapserve.server.engine.batcher import Batcher, BatcherConfig
from snapserve.server.errors import ConfigError
from tests.support.waiting import eventually


class Held:
    """A batch function whose calls wait until released, one event per call."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        gate = asyncio.Event()
        self.batches.append(list(items))
        self.gates.append(gate)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await gate.wait()
        self.running -= 1
        return [10 * i for i in items]

    def release_all(self) -> None:
        for gate in self.gates:
            gate.set()


async def test_a_lone_item_on_an_idle_batcher_does_not_wait_for_company() -> None:
    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    # A 60 s delay: only the adaptive wait can answer within the 2 s bound.
    async with Batcher(double, BatcherConfig(max_batch_size=64, max_queue_delay_s=60.0)) as batcher:
        assert await asyncio.wait_for(batcher.submit(21), 2.0) == 42


async def test_items_arriving_during_a_batch_form_the_next_one() -> None:
    fn = Held()
    async with Batcher(fn, BatcherConfig(max_batch_size=16, max_queue_delay_s=60.0)) as batcher:
        first = asyncio.ensure_future(batcher.submit(0))
        await eventually(lambda: len(fn.batches) == 1, "batch 1 sent")
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        assert len(fn.batches) == 1  # one instance, busy: the others queue
        fn.gates[0].set()
        # sent when the first ends, not after 60 s
        await eventually(lambda: len(fn.batches) == 2, "batch 2 sent")
        fn.release_all()
        assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    assert fn.batches == [[0], [1, 2, 3, 4, 5]]


async def test_concurrent_batches_up_to_the_instance_count() -> None:
    fn = Held()
    config = BatcherConfig(max_batch_size=2, max_queue_delay_s=0.0, max_concurrent_batches=2)
    async with Batcher(fn, config) as batcher:
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
        await eventually(lambda: len(fn.batches) == 2, "batch 2 sent")
        await asyncio.sleep(0.01)
        assert batcher.in_flight == 2 and len(fn.batches) == 2 and batcher.queued == 2
        fn.gates[0].set()
        # a freed slot takes the next batch
        await eventually(lambda: len(fn.batches) == 3, "batch 3 sent")
        while not all(t.done() for t in tasks):  # release each batch as it comes
            fn.release_all()
            await asyncio.sleep(0.001)
        assert [t.result() for t in tasks] == [10 * i for i in range(6)]
    assert fn.most_running == 2
    assert sorted(i for b in fn.batches for i in b) == list(range(6))


async def test_a_free_instance_takes_a_lone_callers_request_while_another_computes() -> None:
    fn = Held()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=60.0, max_concurrent_batches=2)
    async with Batcher(fn, config) as batcher:
        first = asyncio.ensure_future(batcher.submit(0))
        await eventually(lambda: len(fn.batches) == 1, "batch 1 sent")
        second = asyncio.ensure_future(batcher.submit(1))
        # No company is expected (one caller at a time so far): the free instance takes it at
        # once, while the first batch still computes, not after the 60 s delay.
        await eventually(lambda: len(fn.batches) == 2, "batch 2 sent")
        assert fn.running == 2
        fn.release_all()
        assert await asyncio.gather(first, second) == [0, 10]


async def test_a_free_instance_waits_for_its_share_of_the_company_not_for_the_delay() -> None:
    fn = Held()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=60.0, max_concurrent_batches=2)
    async with Batcher(fn, config) as batcher:
        crowd = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await eventually(lambda: len(fn.batches) == 1, "batch 1 sent")
        assert fn.batches == [[0, 1, 2, 3]]  # four callers seen: two per instance from now on
        later = [asyncio.ensure_future(batcher.submit(4))]
        await asyncio.sleep(0.05)
        assert len(fn.batches) == 1  # one of its two: more is coming
        later.append(asyncio.ensure_future(batcher.submit(5)))
        # its share: sent, the first batch still held
        await eventually(lambda: len(fn.batches) == 2, "batch 2 sent")
        assert fn.batches[1] == [4, 5] and fn.running == 2
        fn.release_all()
        assert await asyncio.gather(*crowd, *later) == [10 * i for i in range(6)]


async def test_close_lets_computing_batches_answer() -> None:
    fn = Held()
    batcher = Batcher(fn, BatcherConfig(max_batch_size=1, max_concurrent_batches=2))
    await batcher.start()
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    await eventually(lambda: len(fn.batches) == 2, "batch 2 sent")
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    fn.release_all()
    await closing
    assert [t.result() for t in tasks] == [0, 10]


def test_max_concurrent_batches_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_concurrent_batches"):
        BatcherConfig(max_concurrent_batches=0)
