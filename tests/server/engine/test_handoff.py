"""engine/handoff.py: a batch's thread is running before the event loop goes on."""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from snapserve.server.engine.handoff import start_in_thread


async def test_the_work_has_started_when_the_call_returns() -> None:
    started = threading.Event()

    def work(a: int, b: int) -> int:
        started.set()
        return a + b

    # A long switch interval: the worker, once it has the GIL, keeps it until it blocks, so
    # `work`'s first line has run when the caller gets the GIL back (with plain
    # run_in_executor the caller never lets go of it, and the flag is never set in time).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        with ThreadPoolExecutor(1) as executor:
            for _ in range(20):  # each time, not by luck
                started.clear()
                future = start_in_thread(asyncio.get_running_loop(), executor, work, 2, 3,
                                         wait_s=10.0)
                assert started.is_set()
                assert await future == 5
    finally:
        sys.setswitchinterval(interval)


async def test_a_busy_thread_costs_the_loop_at_most_the_wait() -> None:
    """The thread is still on other work: the call gives up waiting after wait_s, and the work
    runs (and answers) once the thread is free."""
    release = threading.Event()
    started = threading.Event()

    def work() -> str:
        started.set()
        return "done"

    with ThreadPoolExecutor(1) as executor:
        blocker = executor.submit(release.wait, 30)
        future = start_in_thread(asyncio.get_running_loop(), executor, work, wait_s=0.01)
        assert not started.is_set()  # returned without it
        release.set()
        assert await future == "done"
        assert blocker.result() is True


async def test_what_the_work_raises_reaches_the_awaiting_caller() -> None:
    def work() -> None:
        raise ValueError("the model refused it")

    with ThreadPoolExecutor(1) as executor:
        with pytest.raises(ValueError, match="the model refused it"):
            await start_in_thread(asyncio.get_running_loop(), executor, work)
