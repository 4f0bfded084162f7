"""Threads named for the operating system (server/observability/threads.py)."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapserve.server.observability.threads import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's comm")


def _comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_pool_thread_carries_its_name_for_the_system() -> None:
    with ThreadPoolExecutor(1, initializer=name_os_thread, initargs=("inference-3",)) as pool:
        native_id = pool.submit(threading.get_native_id).result()
        assert _comm(native_id) == "inference-3"


def test_a_long_name_is_cut_to_what_the_system_keeps() -> None:
    seen: list[str] = []

    def named() -> None:
        name_os_thread("a-name-longer-than-fifteen-bytes")
        seen.append(_comm(threading.get_native_id()))

    thread = threading.Thread(target=named)
    thread.start()
    thread.join()
    assert seen == ["a-name-longer-t"]
