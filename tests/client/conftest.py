"""Client tests reuse the server tests' repository fixture, and add a server on its own thread
(a blocking client in the test's event loop would starve an in-loop server)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Iterator

import pytest

from snapserve.server import BatcherConfig, RunningServer, ServerConfig, start_server
from tests.server.conftest import model_repo, running_server, server_config  # noqa: F401 (fixtures)


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

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(None), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def threaded_server(model_repo: Path) -> Iterator[ThreadedServer]:  # noqa: F811
    server = ThreadedServer(ServerConfig(model_repository=model_repo, port=0,
                                         batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=0.002)))
    yield server
    server.stop()
