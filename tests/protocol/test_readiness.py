"""Ready means "can serve": not ready while no model is loaded, on every transport; a model
folder passed as the repository is refused at start-up."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.server import ConfigError, RunningServer
from snapserve.server.models.policy import RepositoryConfig
from tests.support.calls import triton_client
from tests.support.servers import serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _readiness(running: RunningServer) -> tuple[int, bool, int, str]:
    """(gRPC health of "", KServe ServerReady, REST /v2/health/ready status, its body)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
        ready = await kpb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            kpb.ServerReadyRequest(), timeout=5)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{running.http_port}") as session:
        async with session.get("/v2/health/ready") as response:
            return health.status, ready.ready, response.status, await response.text()


async def test_an_empty_repository_is_live_but_not_ready(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    async with serving(tmp_path / "models", http_port=0) as running:
        health, ready, status, body = await _readiness(running)
        assert (health, ready, status) == (NOT_SERVING, False, 503)
        assert "no model is loaded" in body
        async with aiohttp.ClientSession(f"http://127.0.0.1:{running.http_port}") as session:
            async with session.get("/v2/health/live") as response:
                assert response.status == 200  # alive: not to be restarted, only not sent to


async def test_ready_follows_whether_any_model_serves(model_repo: Path) -> None:
    control = RepositoryConfig(allow_repository_control=True)
    async with serving(model_repo, http_port=0, repository=control) as running, \
            triton_client(running) as client:
        assert (await _readiness(running))[:3] == (SERVING, True, 200)
        await client.unload_model("tiny")
        assert (await _readiness(running))[:3] == (SERVING, True, 200)  # digits still serves
        await client.unload_model("digits")
        health, ready, status, body = await _readiness(running)
        assert (health, ready, status) == (NOT_SERVING, False, 503) and "no model" in body
        await client.load_model("digits")
        assert (await _readiness(running))[:3] == (SERVING, True, 200)


async def test_a_model_folder_as_the_repository_is_refused(model_repo: Path) -> None:
    with pytest.raises(ConfigError, match=r"this looks like a model folder .*1/.*pass its parent, "
                                          r"--model-repository .*which serves it as model 'digits'"):
        async with serving(model_repo / "digits"):
            pass
