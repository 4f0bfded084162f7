"""Idle and half-sent connections against a server process whose open-file limit is lowered (as
a pod's is): far more of them than the limit allows must not make gRPC health, REST health or
metrics unreachable (issue 26). Also: gRPC's bound on a gzip-compressed message is on its
inflated size."""

from __future__ import annotations

import asyncio
import gzip
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server import RunningServer
from tests.support.calls import predict_request
from tests.support.servers import PINNED_FLAGS, free_port, serving

FILE_LIMIT = 192
# Sets the limit (soft and hard, so the server cannot raise it), then runs the server's CLI.
LAUNCHER = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FILE_LIMIT}, {FILE_LIMIT})); "
            "sys.argv = ['snapserve.server', *sys.argv[1:]]; "
            "runpy.run_module('snapserve.server', run_name='__main__')")
READY = re.compile(r"serving on 127\.0\.0\.1:(\d+)")


class LimitedServer:
    def __init__(self, repo: Path) -> None:
        self.http_port, self.metrics_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, "--model-repository", str(repo), "--port", "0",
             "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port),
             "--grpc-max-connections", "32", "--grpc-handshake-timeout-s", "1",
             "--http-max-connections", "32", "--http-reserved-connections", "4",
             "--http-header-timeout-s", "1", "--metrics-max-connections", "4",
             "--metrics-timeout-s", "1", *PINNED_FLAGS],
            stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.port = 0
        ready = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if (match := READY.search(line)) and not self.port:
                    self.port = int(match.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(90) or not self.port:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


async def _grpc_health(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        # gRPC's cap has no reserve: a connection refused at the cap is retried (wait_for_ready)
        # and gets in once the half-sent prefaces reach grpc_handshake_timeout_s.
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                  timeout=4.0, wait_for_ready=True)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def _http_ok(url: str, within_s: float = 3.0) -> None:
    """200 within `within_s`, retrying a connection closed at once: right after the burst every
    REST place holds a connection within the eviction grace, which is never closed for room,
    so a probe gets in once they are older than it (server/listeners.py)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while True:
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(url, timeout=aiohttp.ClientTimeout(
                        total=end - loop.time())) as response:
                    assert response.status == 200
                    return
        except (aiohttp.ClientConnectionError, ConnectionError):
            if loop.time() > end - 0.2:
                raise
            await asyncio.sleep(0.1)


async def _flood(server: LimitedServer) -> list[asyncio.StreamWriter]:
    """Far more connections than the file limit: idle, half a header, half an HTTP/2 preface."""
    held = []
    shapes = [(server.http_port, b""), (server.http_port, b"POST /v2 HTTP/1.1\r\nHost"),
              (server.port, b"PRI * HTTP/2.0\r\n"), (server.metrics_port, b"GET /met")]
    for i in range(2 * FILE_LIMIT):
        port, data = shapes[i % len(shapes)]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            continue  # refused or reset: the server keeps its descriptors
        writer.write(data)
        held.append(writer)
    return held


def test_idle_and_half_sent_connections_leave_health_and_metrics_reachable(
        model_repo: Path) -> None:
    server = LimitedServer(model_repo)
    try:
        async def scenario() -> None:
            held = await _flood(server)
            started = time.monotonic()
            # Each must answer within its timeout while the flood is still open.
            await asyncio.gather(
                _grpc_health(server.port),
                _http_ok(f"http://127.0.0.1:{server.http_port}/v2/health/ready"),
                _http_ok(f"http://127.0.0.1:{server.metrics_port}/metrics"))
            assert time.monotonic() - started < 6.0
            for writer in held:
                writer.close()

        asyncio.run(scenario())
        assert server.proc.poll() is None
        text = "".join(server.log)
        assert text.count("Traceback") == 0, text[-4000:]
        assert text.count("cannot accept connections") <= 3, text[-4000:]
    finally:
        server.close()


async def test_a_gzip_message_is_bounded_by_its_inflated_size(model_repo: Path) -> None:
    """grpc core compares a compressed message's inflated size with max_receive_message_length:
    a message a few KiB on the wire that inflates past --max-message-mb is RESOURCE_EXHAUSTED."""
    async with serving(model_repo, max_message_bytes=64 * 1024) as running:
        await _check_gzip(running)


async def _check_gzip(running: RunningServer) -> None:
    big = predict_request(np.zeros((5000, 1, 4, 4), np.float32))  # 320 KB of zeros
    assert len(gzip.compress(big.SerializeToString())) < 16 * 1024
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}",
                                         compression=grpc.Compression.Gzip) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        try:
            await stub.Predict(big, timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        else:
            raise AssertionError("a message inflating past the bound was accepted")
        answer = await stub.Predict(predict_request(np.zeros((2, 1, 4, 4), np.float32)),
                                    timeout=5)
        assert answer.ByteSize() > 0
