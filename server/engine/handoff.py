"""Starting a batch on an instance's thread without waiting milliseconds for the GIL.

`loop.run_in_executor` queues the work and returns; the instance's thread wakes and then needs
the GIL to run a line of Python. A busy event loop (grpc.aio, many calls in flight) drops the GIL
for microseconds at a time, around each system call, and takes it back before the woken thread
is on a core, so the thread can wait longer for its first line than a small batch takes to
compute. A shorter switch interval (`sys.setswitchinterval`) does not help: the thread loses
the GIL before it is even running, not to a loop that holds it too long.

`start_in_thread` hands the GIL over instead: after queueing the work, the loop thread blocks
on a lock (which releases the GIL) until the worker has started, at most `wait_s`. The worker
then holds the GIL for the few lines before ONNX Runtime's run, which releases it again. The
figures, before and after, are in docs/performance.md ("Third pass").
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from typing import Callable, TypeVar

__all__ = ["HANDOFF_WAIT_S", "start_in_thread"]

T = TypeVar("T")

# The longest the event loop blocks for one hand-over: a worker that has not started by then
# (its thread busy, or no core free) gets the GIL the usual way. A few times what a hand-over
# takes on a loaded machine, and short enough that new calls hardly notice the blocked loop.
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
