"""grpc.health.v1.Health (overall and per model, loading and draining) and server reflection."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

import snapserve.server.models.lifecycle
from snapserve.server import RunningServer, ServerConfig, start_server
from snapserve.server.process.healthcheck import check
from snapserve.server.models.policy import RepositoryConfig

from tests.support.calls import triton_client
from tests.support.servers import fast_batching, pinned_runtime, serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_check(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


async def test_overall_service_and_per_model_status(running: RunningServer) -> None:
    for service in ("", "snapserve.v1.EnsembleService", "inference.GRPCInferenceService",
                    "digits", "tiny"):
        assert await health_check(running.port, service) == SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_check(running.port, "nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_container_probe_reads_it(running: RunningServer) -> None:
    target = f"127.0.0.1:{running.port}"  # a blocking client: off the loop that serves
    assert await asyncio.to_thread(check, target) == (True, f"{target}: SERVING")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_not_serving_while_loading(model_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port answers health checks before the models are loaded, with NOT_SERVING, for the
    server and for every model of the repository."""
    release = threading.Event()
    real_load = snapserve.server.models.lifecycle.load_version

    def held_load(*args: object) -> object:  # runs in a loader thread: blocks it, not the event loop
        release.wait(timeout=30)
        return real_load(*args)

    monkeypatch.setattr(snapserve.server.models.lifecycle, "load_version", held_load)
    port = free_port()
    starting = asyncio.ensure_future(start_server(ServerConfig(
        model_repository=model_repo, port=port, http_port=None, batcher=fast_batching(),
        runtime=pinned_runtime())))
    try:
        while True:  # until the port is bound and answers
            if starting.done():
                starting.result()  # start-up failed (the port was taken meanwhile?): say why
                pytest.fail("the server finished loading while its loads were held")
            try:
                overall = await health_check(port, "")
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.02)
        assert overall == NOT_SERVING
        # Every model of the repository is known from the first answer: the one loading and the
        # one queued behind it (loads run one at a time) alike, never an unknown service.
        assert await health_check(port, "digits") == NOT_SERVING
        assert await health_check(port, "tiny") == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_check(port, "nope")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        release.set()
        running = await starting
        assert await health_check(port, "") == SERVING
        assert await health_check(port, "digits") == SERVING
        assert await health_check(port, "tiny") == SERVING
        await running.stop(None)
    finally:
        release.set()
        if not starting.done():
            starting.cancel()


async def test_watchers_hear_not_serving_when_shutdown_begins(model_repo: Path) -> None:
    running = await start_server(ServerConfig(model_repository=model_repo, port=0, http_port=None,
                                              batcher=fast_batching(), runtime=pinned_runtime()))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # Two watchers of one service: one leaving must not silence the other.
        leaving = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await leaving.read()).status == SERVING
        assert (await watch.read()).status == SERVING
        leaving.cancel()
        stopping = asyncio.ensure_future(running.stop(grace=30))
        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()  # the last call in flight: the server may finish draining now
        await stopping


async def test_model_status_follows_unload_and_load(model_repo: Path) -> None:
    async with serving(model_repo, repository=RepositoryConfig(allow_repository_control=True)) \
            as running, triton_client(running) as client:
        await client.unload_model("tiny")
        assert await health_check(running.port, "tiny") == NOT_SERVING
        assert await health_check(running.port, "") == SERVING
        await client.load_model("tiny")
        assert await health_check(running.port, "tiny") == SERVING


async def test_reflection_describes_every_service(running: RunningServer) -> None:
    # The reflection client is blocking: run it off the loop that serves.
    def describe() -> tuple[list[str], list[str], list[str]]:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            kserve = pool.FindServiceByName("inference.GRPCInferenceService")
            infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
            return (sorted(database.get_services()), [m.name for m in kserve.methods],
                    [f.name for f in infer.fields])

    services, methods, fields = await asyncio.to_thread(describe)
    assert services == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                        "inference.GRPCInferenceService", "snapserve.v1.EnsembleService"]
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryModelLoad"} <= set(methods)
    assert fields == ["model_name", "model_version", "id", "parameters", "inputs", "outputs",
                      "raw_input_contents"]
