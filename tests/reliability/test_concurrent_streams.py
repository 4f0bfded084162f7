"""More concurrent calls on one connection than `max_concurrent_streams`: what a client sees is
what docs/protocol.md says. gRPC's server refuses the extra streams (HTTP/2 REFUSED_STREAM), which
a plain gRPC client reports as UNAVAILABLE "Stream removed (... RST_STREAM with error code 7)":
the call never reached the server, so it is safe to retry. The snapserve clients retry
UNAVAILABLE with backoff, so every one of their calls is answered."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import grpc

from snapserve.client import AsyncEnsembleClient
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from tests.support.calls import digits_input, predict_request
from tests.support.servers import serving


async def test_extra_calls_are_refused_streams_which_the_client_retries(model_repo: Path) -> None:
    async with serving(model_repo, max_concurrent_streams=8) as running:
        target = f"127.0.0.1:{running.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            request = predict_request(digits_input(1))

            async def plain() -> str:
                try:
                    await stub.Predict(request, timeout=20)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()}"

            seen = collections.Counter(await asyncio.gather(*(plain() for _ in range(64))))
        refused = {k for k in seen if k != "OK"}
        assert seen["OK"] > 0 and refused, seen
        assert all(k.startswith("UNAVAILABLE") and "error code 7" in k for k in refused), seen
        async with AsyncEnsembleClient(target) as client:
            answers = await asyncio.gather(*(client.predict("digits", digits_input(1))
                                             for _ in range(64)))
        assert len(answers) == 64
