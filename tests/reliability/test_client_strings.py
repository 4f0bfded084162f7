"""What a client writes cannot forge or flood a log line, and text where a number belongs is the
client's fault: a model name with a newline (gRPC, or REST `%0A`) is escaped in the text log, a
100 KB name writes a bounded line; a 5,000-digit KServe version gets INVALID_ARGUMENT (int()
raised ValueError past 4,300 digits: INTERNAL); booleans among REST JSON numbers are refused as
all-boolean data is."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterator

import aiohttp
import grpc
import pytest

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.tensors import to_tensor
from snapserve.server.observability.logs import configure_logging
from tests.support.calls import digits_input, native_stub, predict_request
from tests.support.servers import serving


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root, access = logging.getLogger(), logging.getLogger("snapserve.server.access")
    levels = root.level, access.level
    handler = configure_logging("INFO", "text", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(levels[0])
    access.setLevel(levels[1])


async def test_model_names_cannot_forge_or_flood_log_lines(model_repo: Path,
                                                           text_log: io.StringIO) -> None:
    forged = "nope\n2026-01-01 00:00:00,000 INFO snapserve.server.access [x]: forged"
    async with serving(model_repo, http_port=0) as running:
        async with native_stub(running) as stub:
            for model in (forged, "x" * 100_000):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Predict(predict_request(digits_input(1), model=model))
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
        async with aiohttp.ClientSession(f"http://127.0.0.1:{running.http_port}") as session:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                                "data": [0.0] * 16}]}
            async with session.post("/v2/models/rest%0AINFO%20forged/infer", json=body) as answer:
                assert answer.status == 404
    lines = text_log.getvalue().splitlines()
    assert not [line for line in lines if "forged" in line and not line.startswith("20")], lines
    assert not [line for line in lines if line.startswith("2026-01-01")], lines
    assert any("nope\\n2026" in line for line in lines), lines
    assert any("rest\\nINFO forged" in line for line in lines), lines
    assert max(map(len, lines)) < 1000


async def test_a_5000_digit_version_is_invalid_argument(model_repo: Path) -> None:
    async with serving(model_repo) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            x = digits_input(1)
            request = kpb.ModelInferRequest(model_name="digits", model_version="9" * 5000)
            request.inputs.add(name="input", datatype="FP32", shape=x.shape)
            request.raw_input_contents.append(x.tobytes())
            calls = [stub.ModelInfer(request),
                     stub.ModelReady(kpb.ModelReadyRequest(name="digits", version="9" * 5000)),
                     stub.ModelMetadata(kpb.ModelMetadataRequest(name="digits",
                                                                 version=str(2**63)))]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
                assert "is not a version" in info.value.details()
                assert len(info.value.details()) < 300


@pytest.mark.parametrize("data", [[True] + [0.0] * 15, [0.0] * 15 + [False],
                                  [[[[1.0, 2.0, 3.0, True]] + [[0.0] * 4] * 3]]])
async def test_booleans_among_json_numbers_are_refused(model_repo: Path, data: list) -> None:
    async with serving(model_repo, http_port=0) as running:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{running.http_port}") as session:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                                "data": data}]}
            async with session.post("/v2/models/digits/infer", json=body) as answer:
                assert answer.status == 400
                error = (await answer.json())["error"]
    assert "mixes true/false with numbers" in error and "FP32" in error, error
