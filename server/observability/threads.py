"""The operating system's name for a thread (Linux `comm`), so that `top -H`, `ps -L`, py-spy and
/proc/<pid>/task/*/comm tell the server's threads apart: Python's thread names stay inside
Python, and every thread of ours would otherwise show as `python`."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["name_os_thread"]

_PR_SET_NAME = 15  # prctl option: the calling thread's name, at most 15 bytes


@functools.lru_cache(maxsize=1)
def _prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str) -> None:
    """Name the calling thread for the operating system (cut to 15 bytes); a no-op where the
    system has no such name. Meant as a thread pool's `initializer`."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_NAME, name.encode("ascii", "replace")[:15], 0, 0, 0)
