"""The metrics endpoint cannot be used to pile up threads or connections, and binds loopback
unless told otherwise (its own --metrics-host, apart from the gRPC --host)."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path

from snapserve.server.process.cli import load_config
from snapserve.server.observability.metrics_endpoint import MetricsEndpointConfig
from tests.support.servers import serving

IDLE = 300


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


async def test_idle_connections_hold_no_thread_and_are_closed(model_repo: Path) -> None:
    endpoint = MetricsEndpointConfig(timeout_s=0.5, max_connections=16)
    async with serving(model_repo, metrics_port=0, metrics_endpoint=endpoint) as running:
        port = running.metrics_port
        assert port
        loop = asyncio.get_running_loop()
        assert "snapserve_models_loaded" in await loop.run_in_executor(None, _scrape, port)
        before = _threads()
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(IDLE)]
        await asyncio.sleep(0.3)
        during = _threads()
        # Each idle connection is closed by the server: at once beyond max_connections, and
        # after timeout_s for those it took. (Before: a thread each, never closed.)
        ends = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in idle)), 10)
        assert ends == [b""] * IDLE
        for _, writer in idle:
            writer.close()
        assert "snapserve_models_loaded" in await loop.run_in_executor(None, _scrape, port)
    assert during - before < 10, (before, during)


def test_metrics_host_defaults_to_loopback(model_repo: Path) -> None:
    _, config = load_config(["--model-repository", str(model_repo), "--host", "0.0.0.0",
                             "--metrics-port", "9100"], {})
    assert config.metrics_endpoint == MetricsEndpointConfig()
    assert (config.metrics_endpoint.host, config.metrics_endpoint.timeout_s,
            config.metrics_endpoint.max_connections) == ("127.0.0.1", 5.0, 16)
    _, config = load_config(["--model-repository", str(model_repo), "--metrics-timeout-s", "2",
                             "--metrics-max-connections", "4"], {"SNAPSERVE_METRICS_HOST": "0.0.0.0"})
    assert config.metrics_endpoint == MetricsEndpointConfig("0.0.0.0", 2.0, 4)
