"""One PredictStream cannot take most of a model's queue (its window is at most
max_stream_share of the queue), and streamed requests carry the stream's deadline into the
batcher, so one that waits past it is dropped as expired before compute."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server import BatcherConfig
from tests.support.calls import digits_input, predict_request
from tests.support.servers import serving


async def test_one_stream_holds_at_most_its_share_of_the_queue(model_repo: Path) -> None:
    batcher = BatcherConfig(max_batch_size=16, max_queue_size=8, max_queue_delay_s=0.05,
                            adaptive_wait=False)
    async with serving(model_repo, batcher=batcher, max_stream_share=0.25) as running:
        assert running.config.stream_window == 2
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            requests = [predict_request(digits_input(1, seed=i)) for i in range(8)]
            answers = [a async for a in stub.PredictStream(iter(requests), timeout=30)]
        stats = running.registry.get("digits").batcher.stats
    assert len(answers) == 8 and not any(a.HasField("error") for a in answers)
    # Before: the stream's 64-request window put all 8 in the queue at once (one batch of 8).
    assert max(stats.batch_examples) <= 2, stats.batch_examples


async def test_streamed_requests_carry_the_deadline_into_the_batcher(model_repo: Path) -> None:
    batcher = BatcherConfig(max_batch_size=16, max_queue_delay_s=3.0, adaptive_wait=False)
    async with serving(model_repo, batcher=batcher) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.PredictStream(iter([predict_request(digits_input(1))]),
                                                  timeout=0.3):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = running.registry.get("digits").batcher.stats
    # Before: no deadline reached the batcher, so gRPC's cancel counted it as cancelled.
    assert (stats.dropped_expired, stats.dropped_cancelled, stats.items) == (1, 0, 0), stats
