"""Decoding requests: a huge request cannot stall the server, and bytes that are not a protobuf
get INVALID_ARGUMENT naming the message type expected (unary calls: test_bad_input.py).

A ~60 MB KServe ModelInfer whose typed `fp32_contents` cannot fit the model used to be
converted whole with np.asarray on the event loop before any size check: health checks sent
meanwhile waited seconds. Now the value count is checked against what the model can take first,
and large payloads are parsed and decoded off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from tests.support.calls import digits_input, predict_request
from tests.support.servers import ThreadedServer, local_config

VALUES = 15_000_000  # 60 MB of float32, under the default 64 MiB message limit
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PREDICT = "/snapserve.v1.EnsembleService/Predict"
PREDICT_STREAM = "/snapserve.v1.EnsembleService/PredictStream"


@pytest.fixture(scope="module")
def huge_typed_request() -> bytes:
    """fp32_contents for a shape consistent with itself but far beyond the digits model (8 x 16)."""
    request = kpb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[VALUES // 16, 1, 4, 4])
    tensor.contents.fp32_contents.extend(np.ones(VALUES, dtype=np.float32))
    return request.SerializeToString()


async def _health_latencies(channel: grpc.aio.Channel, stop: asyncio.Event) -> list[float]:
    stub = health_pb2_grpc.HealthStub(channel)
    latencies = []
    while not stop.is_set():
        began = time.perf_counter()
        await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.01)
    return latencies


async def test_health_stays_fast_while_huge_typed_requests_arrive(
        model_repo: Path, huge_typed_request: bytes) -> None:
    server = ThreadedServer(local_config(model_repo))
    try:
        async with grpc.aio.insecure_channel(server.target) as channel, \
                grpc.aio.insecure_channel(server.target) as health_channel:
            infer = channel.unary_unary(MODEL_INFER, request_serializer=None,
                                        response_deserializer=kpb.ModelInferResponse.FromString)
            stop = asyncio.Event()
            health = asyncio.ensure_future(_health_latencies(health_channel, stop))
            await asyncio.sleep(0.2)
            codes = []
            for _ in range(4):
                try:
                    await infer(huge_typed_request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    codes.append((exc.code(), exc.details()))
            stop.set()
            latencies = await health
    finally:
        server.stop()
    # Generous for a loaded machine (the suite runs on two workers, and this test's client
    # shares the server's process): a request decoded on the event loop holds it for seconds.
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert [c for c, _ in codes] == [grpc.StatusCode.INVALID_ARGUMENT] * 4, codes
    assert "at most 128" in codes[0][1], codes[0][1]  # 8 examples x 16 values


NOT_PROTOBUF = b"\xff\xff\xff\xff not a protobuf"


async def test_not_protobuf_in_a_stream_ends_it_with_invalid_argument(running_server) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running_server.port}") as channel:
        stream = channel.stream_stream(PREDICT_STREAM, request_serializer=None,
                                       response_deserializer=pb.PredictResponse.FromString)
        good = predict_request(digits_input(1)).SerializeToString()
        call = stream(timeout=10)
        await call.write(good)
        assert (await call.read()).model == "digits"  # the stream works
        await call.write(NOT_PROTOBUF)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "snapserve.v1.PredictRequest" in info.value.details()
