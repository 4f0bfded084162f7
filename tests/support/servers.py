"""A real server on 127.0.0.1, port 0: in the test's event loop (`serving`) or on a thread of
its own (`ThreadedServer`, for blocking clients that would starve an in-loop server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from snapserve.server import BatcherConfig, RunningServer, RuntimeConfig, ServerConfig, start_server


def free_port() -> int:
    """A port free on 127.0.0.1 just now, for a server process that must be told its port
    (the CLI's --http-port 0 turns REST off instead of picking one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fast_batching() -> BatcherConfig:
    """Small batches, a short wait: tests answer quickly and still batch."""
    return BatcherConfig(max_batch_size=8, max_queue_delay_s=0.002)


# Instances and threads as the test servers pin them. Auto (0) measures the model at every load,
# which costs a server start most of its time; only the tests about that choice ask for it.
PINNED = {"instances": 1, "intra_op_threads": 1}
# The same for a `python -m snapserve.server` process.
PINNED_FLAGS = ("--instances", "1", "--intra-op-threads", "1")


def grpc_frontend() -> str:
    """The gRPC port's front end for the servers the tests start: the one
    SNAPSERVE_GRPC_FRONTEND names (tests/conftest.py sets grpc.aio unless the run says otherwise;
    `make test-cpp` runs the server tests again through the C++ front end), as a server process
    started by a test reads it too."""
    return os.environ.get("SNAPSERVE_GRPC_FRONTEND", "aio")


def cpp_toolchain() -> bool:
    """Whether the C++ front end can be built here (g++, pkg-config and gRPC's C++ library)."""
    if shutil.which("g++") is None or shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode == 0


def pinned_runtime(**runtime: Any) -> RuntimeConfig:
    """A RuntimeConfig with these settings, instances and threads `PINNED` unless given."""
    return RuntimeConfig(**{**PINNED, **runtime})


def local_config(repo: Path, **config: Any) -> ServerConfig:
    """A config for 127.0.0.1:0 over `repo`, with `fast_batching` unless `batcher` is given,
    `pinned_runtime()` unless `runtime` is given, no REST port unless `http_port` is given (0: a
    free one; the default 8000 would collide between test runs), and no frozen heap unless
    `freeze_heap` is given. The gRPC port's front end is `grpc_frontend()`, or grpc.aio beside
    a `cpp_grpc_port` (the two together are refused)."""
    config.setdefault("grpc_frontend", "aio" if "cpp_grpc_port" in config else grpc_frontend())
    config.setdefault("batcher", fast_batching())
    config.setdefault("runtime", pinned_runtime())
    config.setdefault("http_port", None)
    # The suite's own heap stays the collector's (tests/server/test_heap.py turns it on).
    config.setdefault("freeze_heap", False)
    return ServerConfig(model_repository=repo, port=0, **config)


@contextlib.asynccontextmanager
async def serving(repo: Path, **config: Any) -> AsyncIterator[RunningServer]:
    """A real server over `repo` (`local_config`), stopped (without grace) on the way out."""
    running = await start_server(local_config(repo, **config))
    try:
        yield running
    finally:
        await running.stop(None)


class ThreadedServer:
    """A real server running in an event loop on a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.running: RunningServer = asyncio.run_coroutine_threadsafe(
            start_server(config), self.loop).result(timeout=30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self, grace: float | None = None) -> None:
        """Stop the server (`grace`: as RunningServer.stop, a drain), then its thread."""
        asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def cpu_server(repo: Path, **runtime: Any) -> ThreadedServer:
    """A ThreadedServer on the CPU with these RuntimeConfig settings (graph, instances, ...),
    instances and threads `PINNED` unless given."""
    return ThreadedServer(local_config(repo, runtime=pinned_runtime(device="cpu", **runtime)))
