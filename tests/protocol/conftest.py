"""Fixtures for protocol tests: a real server on 127.0.0.1 (port 0) and real clients.

The KServe side is driven with the real `tritonclient.grpc.aio` package in the test's event
loop. Our own `inference.*` messages live in a private descriptor pool (proto/generate.py), so
tritonclient's copies can be imported in the same process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as triton
from onnx import TensorProto, helper, numpy_helper

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor, to_tensor
from snapserve.server import BatcherConfig, RunningServer, ServerConfig, start_server
from tests.server.conftest import (DIGITS_CLASSES, DIGITS_SHAPE, IR_VERSION, OPSET,  # noqa: F401
                                   model_repo, random_members, write_model_version)

SCORES = ("probabilities", "predictive_entropy", "expected_entropy", "mutual_information",
          "vote_disagreement", "member_kl", "member_top_class")


def digits_input(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *DIGITS_SHAPE)).astype(np.float32)


def fast_batching() -> BatcherConfig:
    return BatcherConfig(max_batch_size=8, max_queue_delay_s=0.002)


@contextlib.asynccontextmanager
async def serving(repo: Path, **config: object) -> AsyncIterator[RunningServer]:
    config.setdefault("batcher", fast_batching())
    settings = ServerConfig(model_repository=repo, port=0, **config)  # type: ignore[arg-type]
    running = await start_server(settings)
    try:
        yield running
    finally:
        await running.stop(None)


@contextlib.asynccontextmanager
async def triton_client(running: RunningServer) -> AsyncIterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(f"127.0.0.1:{running.port}")
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def native_stub(running: RunningServer) -> AsyncIterator[pb_grpc.EnsembleServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.EnsembleServiceStub(channel)


async def native_predict(stub: pb_grpc.EnsembleServiceStub, x: np.ndarray, model: str = "digits",
                         version: int = 0, members: bool = False) -> dict[str, np.ndarray]:
    response = await stub.Predict(pb.PredictRequest(model=model, version=version,
                                                    input=to_tensor(x),
                                                    include_member_probabilities=members))
    names = SCORES + (("member_probabilities",) if members else ())
    scores = {name: from_tensor(getattr(response, name)) for name in names}
    scores["version"] = np.array(response.version)
    return scores


@pytest.fixture
async def running(model_repo: Path) -> AsyncIterator[RunningServer]:  # noqa: F811
    async with serving(model_repo, metrics_port=0) as server:
        yield server


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[triton.InferenceServerClient]:
    async with triton_client(running) as c:
        yield c


def int_input_member(features: int, classes: int, seed: int) -> onnx.ModelProto:
    """A member whose input is int64 (token ids, counts): logits = float(x) @ W + b."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes)).astype(np.float32)
    b = rng.normal(size=classes).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("Gemm", ["xf", "W", "b"], ["logits"])], "int-member",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def write_int_model(repo: Path, name: str = "counts") -> Path:
    return write_model_version(
        repo, name, [int_input_member(3, 2, seed=s) for s in (1, 2)], (3,), ["a", "b"],
        manifest_overrides={"input": {"name": "input", "dtype": "int64", "shape": [-1, 3],
                                      "normalization": None}})
