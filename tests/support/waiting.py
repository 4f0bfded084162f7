"""Waiting for a state the server reaches on its own, instead of sleeping a guessed while.

A fixed sleep is a race with a loaded machine (CI runs two workers on two cores): the state it
waits for usually comes in milliseconds and sometimes in hundreds. `eventually` polls for it and
fails with a name for what never came; its limit is a guard, never a timing assertion.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import pytest


async def eventually(condition: Callable[[], object], what: str, limit_s: float = 20.0,
                     every_s: float = 0.005) -> None:
    """Return once `condition()` is true; fail naming `what` after `limit_s`."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while not condition():
        if loop.time() > give_up:
            pytest.fail(f"never happened within {limit_s:g} s: {what}")
        await asyncio.sleep(every_s)
