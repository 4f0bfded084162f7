"""A generic dynamic batcher: many concurrent callers, one call of `fn` per batch.

It batches an async function of a list of items that returns a list of the same length. It knows
no ONNX and no gRPC: the caller decides what an item is and how many examples it holds (`size`).

- A batch holds up to `max_batch_size` examples and is sent when full or when its oldest item
  has waited `max_queue_delay_s`, whichever comes first. Items are taken in arrival order.
- The queue is bounded (`max_queue_size` items): `submit` raises `QueueFull` at once rather than
  letting latency pile up under overload.
- Items whose caller was cancelled, or whose deadline passed, are dropped before compute.
- One exception from `fn` fails every caller in that batch.
- Up to `max_concurrent_batches` batches compute at once (one per runtime instance); while
  they run the next one fills, so batches grow with load.
- Adaptive wait (`adaptive_wait`): waiting only pays if company is coming, so what is queued
  for a free slot is sent as soon as it holds the company to expect: as many requests as there
  were callers at once lately (a decaying peak, shared among the concurrent batches), or at the
  delay, whichever comes first. A lone caller's requests wait for nothing; N callers in a
  closed loop ride in batches of N (of N/k with k instances, one batch per free instance,
  sent as soon as its share has come back rather than at the delay). Where `fn` computes on
  the event loop while the requests are taken in elsewhere (`waits_for_company` returning
  False), what is queued goes at once: the next requests arrive while the loop computes.
- At once (`fn_now`, `at_once`): an item the owner says is alone (no other caller could join
  it) and that finds nothing queued or computing is computed by `fn_now` in the caller's own
  task, without the queue, the worker task and the future between them: a batch of one,
  counted as every batch is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, TypeVar

from snapserve.server.config import BatcherConfig
from snapserve.server.errors import BatcherClosed, ItemExpired, ItemTooLarge, QueueFull

__all__ = ["Batcher", "BatcherConfig", "BatcherStats", "BatcherClosed", "ItemExpired",
           "ItemTooLarge", "QueueFull"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DEADLINE_SLACK_S = 0.005
# How fast the expected company (Batcher._company) falls when fewer callers come: from 32 to
# one in about a dozen batches, each waiting at most max_queue_delay_s.
_DECAY = 0.8
R = TypeVar("R")


@dataclass
class BatcherStats:
    """Counters for tests and metrics; `batch_examples` counts batches by their size in examples."""

    batches: int = 0
    items: int = 0
    examples: int = 0
    dropped_cancelled: int = 0  # caller went away while queued: never computed
    dropped_expired: int = 0  # deadline passed while queued: never computed
    refused_full: int = 0  # submit() raised QueueFull
    failed_batches: int = 0
    batch_examples: collections.Counter[int] = field(default_factory=collections.Counter)


@dataclass(eq=False, slots=True)  # identity, not field equality: items may be arrays
class _Entry(Generic[T, R]):
    item: T
    size: int
    future: asyncio.Future[R]
    enqueued: float
    deadline: float | None


def _one(_: object) -> int:
    return 1


class Batcher(Generic[T, R]):
    """Batches calls of `fn(list[T]) -> list[R]`; `size(item)` says how many examples an item holds."""

    def __init__(self, fn: Callable[[list[T]], Awaitable[list[R]]],
                 config: BatcherConfig = BatcherConfig(),
                 size: Callable[[T], int] = _one, name: str = "batcher",
                 fn_now: Callable[[list[T]], list[R]] | None = None) -> None:
        self._fn = fn
        self._fn_now = fn_now
        self.config = config
        self._size = size
        self.name = name
        self.stats = BatcherStats()
        self._pending: collections.deque[_Entry[T, R]] = collections.deque()
        self._pending_examples = 0
        self._closed = False
        self._in_flight = 0  # batches computing now
        self._computing: set[asyncio.Task[None]] = set()
        # Created in start(), inside the running loop, not here: asyncio primitives are bound
        # to the loop that was current when they were made.
        self._wakeup: asyncio.Event | None = None
        self._slot_free: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Callers waiting on this batcher now (queued or computing), the most of them since the
        # last batch was taken, and the estimate of how many callers there are (see _company).
        self._callers = 0
        self._peak_callers = 0
        self._expected_callers = 1.0
        # Asked at each batch: False sends what is queued at once under adaptive wait (the
        # owner computes its batches on the event loop, while the requests queue elsewhere).
        self.waits_for_company: Callable[[], bool] = lambda: True
        # Asked of an item that finds the batcher idle, where fn_now is given: whether it is
        # computed at once by fn_now (its owner knows no other caller could join it).
        self.at_once: Callable[[T], bool] = lambda item: False

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the batches being computed)."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Batches computing now."""
        return self._in_flight

    async def start(self) -> None:
        """Start the worker task in the running loop; submit() calls it when needed."""
        if self._worker is None:
            # The loop, kept: asyncio.get_running_loop() is a getpid() system call each time,
            # too dear to make per request.
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
            self._slot_free = asyncio.Event()
            self._worker = self._loop.create_task(self._run(), name=self.name)

    async def __aenter__(self) -> Batcher[T, R]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def submit(self, item: T, timeout: float | None = None) -> R:
        """Queue `item` and wait for its result; `timeout` (seconds) drops it if still queued then.

        Raises QueueFull (queue at its bound), ItemTooLarge (more examples than a batch),
        BatcherClosed (closing), ItemExpired (timeout passed before compute), or whatever fn raised.
        """
        if self._closed:
            raise BatcherClosed(f"{self.name} is closed and takes no new requests "
                                "(the server is stopping, or the version was unloaded)")
        if self._worker is None:
            await self.start()
        assert self._wakeup is not None and self._loop is not None
        size = self._size(item)
        if size > self.config.max_batch_size:
            raise ItemTooLarge(f"item of {size} examples exceeds max_batch_size "
                               f"{self.config.max_batch_size}")
        if size < 1:
            raise ValueError(f"item size must be >= 1, got {size}")
        if (self._fn_now is not None and not self._pending and not self._in_flight
                and self.at_once(item)):
            return self._compute_now(item, size)
        if len(self._pending) >= self.config.max_queue_size:
            self.stats.refused_full += 1
            raise QueueFull(f"{self.name} queue is full ({len(self._pending)} requests waiting, "
                            f"max_queue_size={self.config.max_queue_size}); retry later")
        loop = self._loop
        now = loop.time()
        entry: _Entry[T, R] = _Entry(item, size, loop.create_future(), now,
                                     None if timeout is None else now + timeout)
        self._pending.append(entry)
        self._pending_examples += size
        self._callers += 1
        if self._callers > self._peak_callers:
            self._peak_callers = self._callers
        # Wake the worker only when it has something new to decide: a first item, the company
        # it waits for, or a full batch.
        if (len(self._pending) == 1 or len(self._pending) >= self._company()
                or self._pending_examples >= self.config.max_batch_size):
            self._wakeup.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            # Our caller went away (gRPC also cancels a call at its deadline): free its slot now,
            # not when the worker next looks, so a burst of cancellations cannot fill the queue.
            self._discard(entry, loop.time())
            raise
        finally:
            self._callers -= 1

    async def close(self) -> None:
        """Refuse new items, compute what is queued, then stop the worker."""
        self._closed = True
        if self._worker is None:
            return
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await self._worker
        finally:
            self._fail_pending(BatcherClosed(f"{self.name} closed"))
        stats = self.stats  # one line per closed batcher: what a drain did, for operators and tests
        logger.info("%s closed: %d items computed in %d batches (%d failed); dropped %d cancelled, "
                    "%d expired; refused %d (queue full)", self.name, stats.items, stats.batches,
                    stats.failed_batches, stats.dropped_cancelled, stats.dropped_expired,
                    stats.refused_full)

    async def _run(self) -> None:
        try:
            while True:
                await self._wait_for_slot()
                batch = await self._next_batch()
                if batch is None:
                    break
                if batch:
                    self._start_compute(batch)
            if self._computing:  # closing: let the batches already computing answer
                await asyncio.gather(*self._computing, return_exceptions=True)
        except asyncio.CancelledError:
            for task in list(self._computing):
                task.cancel()
            self._fail_pending(BatcherClosed(f"{self.name} was cancelled"))
            raise

    async def _wait_for_slot(self) -> None:
        assert self._slot_free is not None
        while self._in_flight >= self.config.max_concurrent_batches:
            self._slot_free.clear()
            await self._slot_free.wait()

    def _start_compute(self, batch: list[_Entry[T, R]]) -> None:
        assert self._loop is not None
        self._in_flight += 1
        task = self._loop.create_task(self._compute(batch))
        self._computing.add(task)
        task.add_done_callback(self._computed)

    def _computed(self, task: asyncio.Task[None]) -> None:
        assert self._wakeup is not None and self._slot_free is not None
        self._computing.discard(task)
        self._in_flight -= 1
        self._slot_free.set()

    def _company(self) -> float:
        """The requests a batch for a free slot waits for (adaptive wait): as many as there
        were callers (queued or computing) at once since the last batch, a peak that decays by
        _DECAY a batch when fewer come, shared among the batches that may compute at once. One
        caller: 1, sent at once. Eight callers in a closed loop: a batch of eight as soon as the
        eighth arrives, instead of one batch per arrival: fewer, fuller batches, so a higher
        rate and less CPU per request; with two instances, a batch of four for each, each sent
        as its four come back while the other computes, not at the delay, which would leave the
        free instance idle meanwhile (docs/performance.md, "The batcher")."""
        if not self.waits_for_company():
            return 1.0
        config = self.config
        # At most half the queue: callers beyond a full one are refused, not coming, and a
        # queue that fills while the batcher waits would refuse the next arrivals.
        return min(self._expected_callers / config.max_concurrent_batches,
                   max(config.max_queue_size // 2, 1))

    async def _next_batch(self) -> list[_Entry[T, R]] | None:
        """Wait for a first item, then for a full batch or its oldest item's delay; None: closed."""
        assert self._wakeup is not None and self._loop is not None
        while not self._pending:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        loop = self._loop
        # Timed from the oldest item's arrival, not from now: items that queued up while the
        # previous batch was computing have waited already.
        flush_at = self._pending[0].enqueued + self.config.max_queue_delay_s
        while (self._pending_examples < self.config.max_batch_size and not self._closed
               and (not self.config.adaptive_wait or len(self._pending) < self._company())):
            if flush_at <= loop.time():
                break
            self._wakeup.clear()
            # A timer that sets the event, not asyncio.wait_for (a task per wait).
            timer = loop.call_at(flush_at, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()
        self._expected_callers = max(self._peak_callers, self._expected_callers * _DECAY)
        self._peak_callers = self._callers
        return self._take(loop.time())

    def _take(self, now: float) -> list[_Entry[T, R]]:
        """Pop live entries in order while they fit in one batch; drop cancelled and expired ones."""
        batch: list[_Entry[T, R]] = []
        examples = 0
        while self._pending:
            entry = self._pending[0]
            if entry.future.done():  # its caller was cancelled
                self._count_dropped(entry, now)
            elif entry.deadline is not None and now >= entry.deadline:
                entry.future.set_exception(ItemExpired(
                    f"request waited {now - entry.enqueued:.3f}s in the queue, past its deadline"))
                self.stats.dropped_expired += 1
            elif examples + entry.size > self.config.max_batch_size:
                break  # it leads the next batch
            else:
                batch.append(entry)
                examples += entry.size
            self._pending.popleft()
            self._pending_examples -= entry.size
        return batch

    def _count_batch(self, items: int, examples: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.items += items
        stats.examples += examples
        stats.batch_examples[examples] += 1

    def _compute_now(self, item: T, size: int) -> R:
        """A batch of `item` alone, computed in the caller's task (nothing else runs meanwhile:
        fn_now does not yield)."""
        assert self._fn_now is not None
        self._count_batch(1, size)
        try:
            results = self._fn_now([item])
            if len(results) != 1:
                raise RuntimeError(f"{self.name}: batch function returned {len(results)} "
                                   "results for 1 item")
        except Exception:
            self.stats.failed_batches += 1
            raise
        return results[0]

    async def _compute(self, batch: list[_Entry[T, R]]) -> None:
        self._count_batch(len(batch), sum(e.size for e in batch))
        try:
            results = await self._fn([e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: batch function returned {len(results)} results "
                                   f"for {len(batch)} items")
        except asyncio.CancelledError:  # the worker itself is being cancelled
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosed(f"{self.name} was cancelled"))
            raise
        except Exception as exc:  # one failure fails every caller in the batch, and only them
            self.stats.failed_batches += 1
            logger.debug("%s: batch of %d items failed: %r", self.name, len(batch), exc)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        for entry, result in zip(batch, results):
            if not entry.future.done():  # its caller may have gone while we computed
                entry.future.set_result(result)

    def _discard(self, entry: _Entry[T, R], now: float) -> None:
        try:
            self._pending.remove(entry)
        except ValueError:  # already taken into a batch, or dropped by the worker
            return
        self._pending_examples -= entry.size
        self._count_dropped(entry, now)

    def _count_dropped(self, entry: _Entry[T, R], now: float) -> None:
        # gRPC cancels a call when its deadline passes, a moment before or after the deadline
        # computed here from the time it had left: within _DEADLINE_SLACK_S it counts as expired.
        if entry.deadline is not None and now >= entry.deadline - _DEADLINE_SLACK_S:
            self.stats.dropped_expired += 1
        else:
            self.stats.dropped_cancelled += 1

    def _fail_pending(self, exc: Exception) -> None:
        while self._pending:
            entry = self._pending.popleft()
            if not entry.future.done():
                entry.future.set_exception(exc)
        self._pending_examples = 0
