"""One request must not poison the batch it shares, nor come back as NaN.

- A request whose values ONNX Runtime refuses (an index out of range in an imported model)
  batched with good ones: the good ones get their answers, the bad one INVALID_ARGUMENT with a
  message free of ONNX Runtime's internals, and the server logs one line with the cause.
- Finite inputs that overflow the model (3e38 everywhere): the outputs would be NaN; the request
  is refused with INVALID_ARGUMENT, while a good request in the same batch is answered.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor
from snapserve.server import BatcherConfig
from tests.support.calls import digits_input, predict_request
from tests.support.models import write_index_model, write_repository
from tests.support.servers import serving

# Requests sent together wait for each other: one batch.
# Up to 4 one-example requests wait together: the batch goes when 4 have come, or after 2 s (a
# loaded machine may take a while to send them; a short wait split them into two batches).
TOGETHER = BatcherConfig(max_batch_size=4, max_queue_delay_s=2.0, adaptive_wait=False)
INTERNALS = ("onnxruntime", "ONNXRuntimeError", "Gather", "indices", "INVALID_ARGUMENT :")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_repository(tmp_path / "models")
    write_index_model(tmp_path / "models", rows=10)
    return tmp_path / "models"


async def _outcomes(stub: pb_grpc.EnsembleServiceStub, requests: list) -> list:
    async def one(request):  # type: ignore[no-untyped-def]
        try:
            return await stub.Predict(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc
    return await asyncio.gather(*(one(r) for r in requests))


async def test_a_request_ort_refuses_fails_alone(repo: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    good = [np.array([[i % 10, (i + 3) % 10, 9]], dtype=np.int64) for i in range(3)]
    bad = np.array([[1, 2, 99]], dtype=np.int64)  # row 99 of a table of 10
    inputs = [good[0], bad, good[1], good[2]]
    async with serving(repo, batcher=TOGETHER) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="snapserve"):
                mixed = await _outcomes(stub, [predict_request(x, "lookup") for x in inputs])
            batcher = running.registry.get("lookup").batcher
            assert batcher.stats.batches == 1  # they did share one batch
            alone = await _outcomes(stub, [predict_request(x, "lookup") for x in good])
    error = mixed[1]
    assert isinstance(error, grpc.aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "could not compute" in error.details(), error.details()
    assert not any(word in error.details() for word in INTERNALS), error.details()
    for answer, reference in zip([mixed[0], mixed[2], mixed[3]], alone):
        assert not isinstance(answer, Exception), answer
        np.testing.assert_allclose(from_tensor(answer.probabilities),
                                   from_tensor(reference.probabilities), rtol=1e-6)
    # Ours only: after tests/protocol/test_tracing.py shuts its tracer provider down (it stays
    # the process's provider), OpenTelemetry warns about every span that ends.
    records = [r for r in caplog.records
               if r.levelno >= logging.WARNING and r.name.startswith("snapserve")]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None and "\n" not in records[0].getMessage()
    assert "lookup:1" in records[0].getMessage()


def _overflowing() -> np.ndarray:
    return np.full((1, 1, 4, 4), 3e38, dtype=np.float32)


async def test_non_finite_outputs_are_refused_per_request(repo: Path) -> None:
    async with serving(repo, batcher=TOGETHER) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            good = digits_input(2, seed=3)
            bad, fine = await _outcomes(stub, [predict_request(_overflowing()),
                                               predict_request(good)])
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            request = kpb.ModelInferRequest(model_name="digits")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 4, 4])
            request.raw_input_contents.append(_overflowing().tobytes())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await kserve.ModelInfer(request, timeout=30)
    assert isinstance(bad, grpc.aio.AioRpcError), from_tensor(bad.probabilities)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not finite" in bad.details() and "example 0" in bad.details(), bad.details()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not finite" in info.value.details()
    assert not isinstance(fine, Exception), fine
    assert np.isfinite(from_tensor(fine.probabilities)).all()
