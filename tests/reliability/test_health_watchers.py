"""Health/Watch is open without a token, so its streams are bounded server-wide: past
`max_watchers`, RESOURCE_EXHAUSTED saying so; a watcher that leaves frees its place."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapserve.server.api.health import MAX_WATCHERS
from tests.support.servers import serving


async def test_watchers_are_bounded_server_wide(model_repo: Path) -> None:
    assert MAX_WATCHERS == 256
    async with serving(model_repo) as running:
        running.health.max_watchers = 3
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            calls = [health.Watch(request) for _ in range(3)]
            for call in calls:
                assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Watch(request).read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 Health/Watch streams are open" in info.value.details()
            # Check is not a Watch: still answered.
            assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
            calls[0].cancel()
            for _ in range(100):  # the server hears the cancel shortly
                if running.health.watchers < 3:
                    break
                await asyncio.sleep(0.01)
            assert (await health.Watch(request).read()).status == \
                health_pb2.HealthCheckResponse.SERVING
