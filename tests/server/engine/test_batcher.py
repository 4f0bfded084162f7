"""The generic batcher with plain asyncio: no ONNX, no gRPC."""

from __future__ import annotations

import asyncio

import pytest

from snapserve.server.engine.batcher import (Batcher, BatcherClosed, BatcherConfig, ItemExpired, ItemTooLarge,
                            QueueFull)
from snapserve.server.errors import ConfigError


class Recorder:
    """A batch function that records each batch and can be held or made to fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]


async def test_concurrent_items_share_a_batch_and_get_their_own_result() -> None:
    fn = Recorder()
    async with Batcher(fn, BatcherConfig(max_batch_size=8, max_queue_delay_s=0.05)) as batcher:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert fn.batches == [list(range(8))]  # full batch: sent before the delay
    assert batcher.stats.batch_examples == {8: 1}


async def test_size_limit_counts_examples_and_keeps_order() -> None:
    fn = Recorder()
    sizes = {1: 3, 2: 3, 3: 2, 4: 1}  # item -> examples
    config = BatcherConfig(max_batch_size=4, max_queue_delay_s=0.02)
    async with Batcher(fn, config, size=sizes.__getitem__) as batcher:
        await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3, 4)))
    assert fn.batches == [[1], [2], [3, 4]]  # 3+3 > 4: item 2 leads the next batch
    assert all(sum(sizes[i] for i in b) <= 4 for b in fn.batches)


async def test_a_lone_item_waits_at_most_the_delay() -> None:
    fn = Recorder()
    loop = asyncio.get_running_loop()
    config = BatcherConfig(max_batch_size=64, max_queue_delay_s=0.05, adaptive_wait=False)
    async with Batcher(fn, config) as batcher:
        start = loop.time()
        assert await batcher.submit(7) == 70
        waited = loop.time() - start
    assert 0.045 <= waited < 0.5


async def test_zero_delay_sends_at_once() -> None:
    fn = Recorder()
    async with Batcher(fn, BatcherConfig(max_batch_size=64, max_queue_delay_s=0.0)) as batcher:
        assert await asyncio.wait_for(batcher.submit(1), 0.5) == 10


async def test_full_queue_raises_queue_full_at_once() -> None:
    fn = Recorder()
    fn.release.clear()  # hold the first batch in compute
    config = BatcherConfig(max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2)
    async with Batcher(fn, config) as batcher:
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # batch [0] is computing, queue empty
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="max_queue_size=2"):
            await batcher.submit(3)
        fn.release.set()
        assert await first == 0
        assert await asyncio.gather(*waiting) == [10, 20]


async def test_one_exception_fails_every_caller_in_the_batch_only() -> None:
    fn = Recorder()
    async with Batcher(fn, BatcherConfig(max_batch_size=4, max_queue_delay_s=0.02)) as batcher:
        fn.fail = RuntimeError("model exploded")
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
        fn.fail = None
        assert await batcher.submit(5) == 50  # the batcher goes on
    assert batcher.stats.failed_batches == 1


async def test_wrong_number_of_results_fails_the_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async with Batcher(short, BatcherConfig(max_batch_size=2, max_queue_delay_s=0.02)) as batcher:
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in results)


async def test_cancelled_callers_are_dropped_before_compute() -> None:
    fn = Recorder()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.05, adaptive_wait=False)
    async with Batcher(fn, config) as batcher:
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    assert fn.batches == [[0, 3]]
    assert done[0] == 0 and done[3] == 30
    assert isinstance(done[1], asyncio.CancelledError)
    assert batcher.stats.dropped_cancelled == 2


async def test_expired_items_are_dropped_before_compute() -> None:
    fn = Recorder()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.05, adaptive_wait=False)
    async with Batcher(fn, config) as batcher:
        expiring = asyncio.ensure_future(batcher.submit(1, timeout=0.01))
        kept = asyncio.ensure_future(batcher.submit(2, timeout=5.0))
        with pytest.raises(ItemExpired, match="past its deadline"):
            await expiring
        assert await kept == 20
    assert fn.batches == [[2]]
    assert batcher.stats.dropped_expired == 1


async def test_item_larger_than_a_batch_is_refused() -> None:
    async with Batcher(Recorder(), BatcherConfig(max_batch_size=4), size=lambda n: n) as batcher:
        with pytest.raises(ItemTooLarge, match="5 examples exceeds max_batch_size 4"):
            await batcher.submit(5)


async def test_close_computes_queued_items_then_refuses_new_ones() -> None:
    fn = Recorder()
    batcher = Batcher(fn, BatcherConfig(max_batch_size=8, max_queue_delay_s=10.0))
    task = asyncio.ensure_future(batcher.submit(3))
    await asyncio.sleep(0.01)
    await batcher.close()  # does not wait out the 10 s delay
    assert await task == 30
    with pytest.raises(BatcherClosed):
        await batcher.submit(4)


def test_can_be_built_outside_a_running_loop() -> None:
    # asyncio primitives are made in start(), inside the loop that uses them
    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    batcher = Batcher(double, BatcherConfig(max_queue_delay_s=0.0))

    async def use() -> int:
        async with batcher:
            return await batcher.submit(21)

    assert asyncio.run(use()) == 42


@pytest.mark.parametrize("kwargs, field", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_queue_delay_s": -1.0}, "max_queue_delay_s"),
    ({"max_queue_delay_s": float("nan")}, "max_queue_delay_s"),
    ({"max_queue_size": 0}, "max_queue_size"),
])
def test_config_names_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        BatcherConfig(**kwargs)


async def _closed_loop(batcher: Batcher[int, int], callers: int, rounds: int) -> None:
    """`callers` callers, each sending its next item as soon as its last is answered."""
    async def caller(index: int) -> None:
        for _ in range(rounds):
            await batcher.submit(index)
            await asyncio.sleep(0.0005 * (index % 3))  # callers come back at different times

    await asyncio.gather(*(caller(i) for i in range(callers)))


async def test_adaptive_wait_gathers_the_callers_a_closed_loop_has() -> None:
    # Eight callers, one instance: after the first rounds an idle batcher waits for all eight
    # (they come back within the delay) and sends the batch as the eighth arrives, instead of
    # sending each arrival alone because nothing computes.
    fn = Recorder(delay=0.002)
    config = BatcherConfig(max_batch_size=32, max_queue_delay_s=0.05)
    async with Batcher(fn, config) as batcher:
        await _closed_loop(batcher, callers=8, rounds=20)
    later = [len(b) for b in fn.batches[5:]]
    assert later and all(size == 8 for size in later), fn.batches
    # full company, not the delay: 20 rounds of a 2 ms batch, far below 20 x 50 ms
    assert batcher.stats.batches < 30


async def test_the_expected_company_is_shared_among_concurrent_batches() -> None:
    fn = Recorder(delay=0.002)
    config = BatcherConfig(max_batch_size=32, max_queue_delay_s=0.05, max_concurrent_batches=2)
    async with Batcher(fn, config) as batcher:
        await _closed_loop(batcher, callers=8, rounds=20)
    assert max(len(b) for b in fn.batches[5:]) <= 8
    assert sum(len(b) for b in fn.batches) == 160


async def test_a_lone_caller_after_a_crowd_stops_waiting_within_a_few_batches() -> None:
    fn = Recorder()
    delay = 0.02
    async with Batcher(fn, BatcherConfig(max_batch_size=32, max_queue_delay_s=delay)) as batcher:
        await _closed_loop(batcher, callers=16, rounds=5)  # the batcher expects 16 callers now
        loop = asyncio.get_running_loop()
        waits = []
        for i in range(30):
            began = loop.time()
            await batcher.submit(i)
            waits.append(loop.time() - began)
    assert waits[0] >= delay * 0.9  # it waited for company that did not come, the delay at most
    assert max(waits[:20]) < delay * 2
    assert max(waits[-5:]) < delay / 4, waits  # then it expects one caller: no wait


async def test_a_batcher_told_not_to_wait_for_company_sends_what_is_queued_at_once() -> None:
    # Its owner computes batches on the event loop while requests queue elsewhere: the company
    # arrives during each batch. A caller after a crowd (which a batcher waits for, up to the
    # delay: the test below) is sent at once; the callers that queued meanwhile ride together.
    fn = Recorder(delay=0.002)
    delay = 0.5
    async with Batcher(fn, BatcherConfig(max_batch_size=32, max_queue_delay_s=delay)) as batcher:
        await _closed_loop(batcher, callers=16, rounds=2)  # it expects 16 callers now
        batcher.waits_for_company = lambda: False
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await batcher.submit(7) == 70
        assert loop.time() - began < delay / 2
        fn.release.clear()  # the next batch computes until released; three queue meanwhile
        sent = len(fn.batches)
        first = asyncio.ensure_future(batcher.submit(1))
        while len(fn.batches) == sent:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.01)
        fn.release.set()
        assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]
    assert fn.batches[-3:] == [[7], [1], [2, 3, 4]], fn.batches


async def test_without_adaptive_wait_a_lone_caller_always_waits_the_delay() -> None:
    fn = Recorder()
    delay = 0.01
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=delay, adaptive_wait=False)
    async with Batcher(fn, config) as batcher:
        loop = asyncio.get_running_loop()
        for i in range(3):
            began = loop.time()
            await batcher.submit(i)
            assert loop.time() - began >= delay * 0.9


async def test_an_item_alone_at_an_idle_batcher_computes_at_once_in_its_own_task() -> None:
    # Its owner says the item is alone (no other caller could join it): at an idle batcher,
    # fn_now computes it before the loop turns even once, and the batch is counted as any.
    fn = Recorder()
    now: list[list[int]] = []

    def fn_now(items: list[int]) -> list[int]:
        now.append(list(items))
        if items == [13]:
            raise ValueError("unlucky")
        return [i * 100 for i in items]

    async with Batcher(fn, BatcherConfig(max_batch_size=8), fn_now=fn_now) as batcher:
        batcher.at_once = lambda item: item != 0
        turned: list[int] = []
        asyncio.get_running_loop().call_soon(turned.append, 1)
        assert await batcher.submit(5) == 500
        assert turned == [] and now == [[5]] and fn.batches == []
        assert (batcher.stats.batches, batcher.stats.items, batcher.stats.examples) == (1, 1, 1)
        with pytest.raises(ValueError, match="unlucky"):  # its caller's error, and only its
            await batcher.submit(13)
        assert batcher.stats.failed_batches == 1
        # Not alone: through the queue and fn.
        assert await batcher.submit(0) == 0
        assert fn.batches == [[0]]
        # Alone, but a batch computes: it queues behind it, as every item does.
        fn.release.clear()
        held = asyncio.ensure_future(batcher.submit(0))
        while not fn.batches[1:]:
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(batcher.submit(6))
        await asyncio.sleep(0.01)
        fn.release.set()
        assert await asyncio.gather(held, queued) == [0, 60]
        assert fn.batches == [[0], [0], [6]] and now == [[5], [13]]
    assert batcher.stats.batches == 5


async def test_without_fn_now_every_item_goes_through_the_queue() -> None:
    fn = Recorder()
    async with Batcher(fn, BatcherConfig(max_batch_size=8)) as batcher:
        batcher.at_once = lambda item: True  # nothing to compute it with at once
        assert await batcher.submit(2) == 20
    assert fn.batches == [[2]]
