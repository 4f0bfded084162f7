"""Starting a batch on an instance's thread without waiting milliseconds for the GIL.

`loop.run_in_executor` queues the work and returns; the instance's thread wakes and then needs
the GIL to run a line of Python. A busy event loop (grpc.aio, many calls in flight) drops the GIL
for microseconds at a time, around each system call, and takes it back before the woken thread
is on a core. Measured on digits (2 cores, KServe, c=32): 1.4-1.8 ms from `run_in_executor` to
the first line in the thread, for a batch that computes in about 1.2 ms; a shorter switch
interval (`sys.setswitchinterval`, down to 0.1 ms) did not shorten it (docs/performance.md,
"Third pass").

`start_in_thread` hands the GIL over instead: after queueing the work, the loop thread blocks
on a lock (which releases the GIL) until the worker has started, at most `wait_s`. The worker
then holds the GIL for the few lines before ONNX Runtime's run, which releases it again.
Measured (same machine and load, against run_in_executor, alternately): the hop fell to
0.15-0.23 ms, the server's own time per request at c=32 from 8.5-9.0 to 6.2-6.7 ms (queue
3.6 -> 2.5 ms), and in an open loop of 1,800 requests/s from 4.8-8.1 to 3.2-5.3 ms in each of
six pairs. The closed-loop rate at c=32 did not change (within noise): there the calls wait
for grpc.aio to accept them, not for us (docs/performance.md, "Third pass").
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from typing import Callable, TypeVar

__all__ = ["HANDOFF_WAIT_S", "start_in_thread"]

T = TypeVar("T")

# The longest the event loop blocks for one hand-over: a worker that has not started by then
# (its thread busy, or no core free) gets the GIL the usual way. Measured hand-overs take
# 0.1-0.3 ms on a loaded 2-core machine.
HANDOFF_WAIT_S = 0.001


def start_in_thread(loop: asyncio.AbstractEventLoop, executor: Executor, fn: Callable[..., T],
                    *args: object, wait_s: float = HANDOFF_WAIT_S) -> asyncio.Future[T]:
    """`loop.run_in_executor(executor, fn, *args)`, returning once `fn` has started on the
    executor's thread (or after `wait_s`). Call it on the loop's thread; await what it returns."""
    started = threading.Lock()
    started.acquire()

    def run() -> T:
        started.release()
        return fn(*args)

    future = loop.run_in_executor(executor, run)
    if started.acquire(timeout=wait_s):  # blocks this thread, not the GIL
        started.release()
    return future
