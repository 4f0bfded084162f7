"""The metrics endpoint cannot be used to pile up threads or connections, answers GET /metrics
only, and binds loopback unless told otherwise (its own --metrics-host, apart from the gRPC
--host)."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from snapserve.server.errors import ConfigError
from snapserve.server.observability.metrics_endpoint import MetricsEndpoint, MetricsEndpointConfig
from snapserve.server.process.cli import load_config
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
        # after timeout_s for those it took; none holds a thread.
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
    expected = MetricsEndpointConfig(host="0.0.0.0", timeout_s=2.0, max_connections=4)
    assert config.metrics_endpoint == expected


async def _ask(port: int, request_line: str, *headers: str) -> bytes:
    """What the endpoint answers to one raw request, up to its closing the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "\r\n".join([request_line, "Host: 127.0.0.1", *headers, "", ""])
    writer.write(head.encode("latin-1"))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("probe", "A counter the endpoint serves", registry=registry).inc()
    return registry


async def test_only_get_and_head_of_metrics_are_answered() -> None:
    endpoint = MetricsEndpoint(_registry(), MetricsEndpointConfig(timeout_s=2.0))
    port = await endpoint.start(0)
    try:
        got = await _ask(port, "GET /metrics HTTP/1.1")
        assert got.startswith(b"HTTP/1.1 200 ") and b"probe_total 1.0" in got
        assert b"Connection: close" in got and b"text/plain; version=0.0.4" in got
        got = await _ask(port, "GET /metrics?x=1 HTTP/1.1",
                         "Accept: application/openmetrics-text; version=1.0.0")
        assert b"application/openmetrics-text" in got and got.endswith(b"# EOF\n")
        got = await _ask(port, "HEAD /metrics HTTP/1.1")
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n")
        assert (await _ask(port, "GET / HTTP/1.1")).startswith(b"HTTP/1.1 404 ")
        assert (await _ask(port, "GET /other HTTP/1.1")).startswith(b"HTTP/1.1 404 ")
        got = await _ask(port, "POST /metrics HTTP/1.1", "Content-Length: 0")
        assert got.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in got
        got = await _ask(port, "GET /metrics HTTP/1.1", "X: " + "y" * 9000)
        assert got.startswith(b"HTTP/1.0 400 ")  # a header line beyond the bound
    finally:
        await endpoint.stop()
    assert endpoint.open == 0


async def test_connections_beyond_the_bound_are_closed_and_slow_ones_time_out() -> None:
    endpoint = MetricsEndpoint(_registry(), MetricsEndpointConfig(timeout_s=1.5, max_connections=2))
    port = await endpoint.start(0)
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        # Each one beyond the bound closes the one idle longest: a scraper always gets in.
        ends = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in held[:3])), 1.0)
        assert ends == [b""] * 3 and endpoint.evicted == 3 and endpoint.open == 2
        held[3][1].write(b"GET /met")  # a request begun and never finished times out too
        ends = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in held[3:])), 5)
        assert ends == [b""] * 2
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.05)
        assert endpoint.open == 0
        assert b"probe_total" in await _ask(port, "GET /metrics HTTP/1.1")
    finally:
        await endpoint.stop()


class _Bulky(Collector):
    """A scrape far larger than the sockets' buffers, so a client that never reads stalls it."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("bulky", "A large scrape", labels=["filler"])
        for i in range(32):
            family.add_metric([f"{i}" + "x" * (1 << 20)], i)
        yield family


async def test_a_client_that_does_not_read_the_answer_is_dropped() -> None:
    registry = CollectorRegistry()
    registry.register(_Bulky())
    endpoint = MetricsEndpoint(registry, MetricsEndpointConfig(timeout_s=1.0))
    port = await endpoint.start(0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await asyncio.sleep(0.5)
        assert endpoint.open == 1
        for _ in range(100):  # at timeout_s the server drops the connection, unsent bytes and all
            await asyncio.sleep(0.05)
            if not endpoint.open:
                break
        assert endpoint.open == 0
        writer.close()
    finally:
        await endpoint.stop()


async def test_a_taken_port_is_a_config_error() -> None:
    first = MetricsEndpoint(_registry())
    port = await first.start(0)
    second = MetricsEndpoint(_registry())
    try:
        with pytest.raises(ConfigError, match="metrics_port: cannot bind"):
            await second.start(port)
    finally:
        await first.stop()
        await second.stop()
