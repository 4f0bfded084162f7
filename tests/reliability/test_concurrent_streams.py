"""More concurrent calls on one connection than `max_concurrent_streams`: what a client sees is
what docs/protocol.md says. The server never holds more than the limit of one connection's
calls at once. grpc.aio's port refuses the streams a client opens beyond it before the client
knows the limit (HTTP/2 REFUSED_STREAM), which a plain gRPC client reports as UNAVAILABLE
"Stream removed (... RST_STREAM with error code 7)": the call never reached the server, so it
is safe to retry. On the C++ front end's port (the system's libgrpc) the client learns the limit
first and holds its extra calls until a stream frees: none is refused. The snapserve clients
retry UNAVAILABLE with backoff, so every one of their calls is answered on either."""

from __future__ import annotations

import asyncio
import collections
import math
from pathlib import Path

import grpc

from snapserve.client import AsyncEnsembleClient
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server import BatcherConfig
from tests.support.calls import digits_input, predict_request
from tests.support.servers import serving

LIMIT = 8
# A batch of up to 64 waits 0.1 s for company: every call the server holds at once joins it.
HELD = BatcherConfig(max_batch_size=64, max_queue_delay_s=0.1, adaptive_wait=False)


async def test_extra_calls_are_held_back_or_refused_streams_which_the_client_retries(
        model_repo: Path, each_frontend: str) -> None:
    async with serving(model_repo, max_concurrent_streams=LIMIT, batcher=HELD,
                       grpc_frontend=each_frontend) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            request = predict_request(digits_input(1))

            async def plain() -> str:
                try:
                    await stub.Predict(request, timeout=20)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()}"

            seen = collections.Counter(await asyncio.gather(*(plain() for _ in range(64))))
        stats = running.registry.get("digits").batcher.stats
        assert stats.items == seen["OK"] > 0, (stats, seen)
        assert stats.batches >= math.ceil(stats.items / LIMIT), stats  # never more than 8 at once
        refused = {k for k in seen if k != "OK"}
        if each_frontend == "aio":
            assert refused, seen
        else:
            assert not refused, seen
        assert all(k.startswith("UNAVAILABLE") and "error code 7" in k for k in refused), seen
    # Answered in milliseconds (not held): a call refused again and again would run out of
    # attempts while 64 calls take turns at 0.1 s each.
    async with serving(model_repo, max_concurrent_streams=LIMIT,
                       grpc_frontend=each_frontend) as running:
        async with AsyncEnsembleClient(f"127.0.0.1:{running.port}") as client:
            answers = await asyncio.gather(*(client.predict("digits", digits_input(1))
                                             for _ in range(64)))
        assert len(answers) == 64
