"""The server's heap and Python's cyclic garbage collector: what is alive once the server is up
(modules, the loaded versions) is frozen out of the collector's way.

A full (generation 2) collection walks every tracked object, and a loaded server holds tens of
thousands of them (grpc, protobuf, numpy, ONNX Runtime, aiohttp, pydantic, the model versions).
Under load, each request's objects live through a few young collections, so they reach the old
generation fast and full collections follow, each stopping the event loop for the whole walk.
With the start-up heap frozen (`gc.freeze`, as pre-forking servers do before they fork), the
collections that follow walk only what came after (figures in docs/performance.md, "Third
pass").

Frozen objects are never collected, so a retired model version (unloaded, or replaced by a
reload) would stay in memory with its sessions if it were frozen: the version and its batcher
refer to each other, a cycle only the collector frees. `collect_retired` therefore unfreezes,
collects and freezes again after a version is retired (one full collection at each unload;
reloads are rare), and `thaw` gives everything back to the collector when the server stops
(the process may go on, as in tests). `ServerConfig.freeze_heap` (default on) leaves the heap
alone for a server embedded in a process whose own heap should stay the collector's, such as
the test suite, which starts a server many times over a large heap of its own.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["collect_retired", "freeze", "thaw"]

logger = logging.getLogger(__name__)


def freeze() -> None:
    """Collect what is garbage now, then freeze every object still alive."""
    gc.collect()
    gc.freeze()
    logger.debug("froze %d objects out of the cyclic collector's way", gc.get_freeze_count())


def collect_retired() -> None:
    """After a model version is retired: free it even if it was frozen, then freeze the rest.
    Does nothing when nothing is frozen (the version is the collector's as usual)."""
    if gc.get_freeze_count():
        gc.unfreeze()
        freeze()


def thaw() -> None:
    """The server stops: every frozen object is the collector's again."""
    gc.unfreeze()
