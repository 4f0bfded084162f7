"""Inputs for the `digits` model and ways to call a running server over a real channel."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
import tritonclient.http.aio as triton_http

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor, to_tensor
from snapserve.server import RunningServer
from snapserve.server.api.kserve_messages import DEFAULT_OUTPUTS
from tests.support.models import DIGITS_SHAPE

# The scores every API answers by default, from the score table (member_probabilities only when
# asked; top_class is compared on its own).
SCORES = DEFAULT_OUTPUTS


def digits_input(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *DIGITS_SHAPE)).astype(np.float32)


def predict_request(x: np.ndarray, model: str = "digits", **kwargs: object) -> pb.PredictRequest:
    return pb.PredictRequest(model=model, input=to_tensor(x), **kwargs)


@contextlib.asynccontextmanager
async def triton_client(running: RunningServer, rest: bool = False) -> AsyncIterator[Any]:
    """tritonclient's asyncio client for the server's gRPC port, or (rest) its REST port."""
    client = (triton_http.InferenceServerClient(f"127.0.0.1:{running.http_port}") if rest else
              triton.InferenceServerClient(f"127.0.0.1:{running.port}"))
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
