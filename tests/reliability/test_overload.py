"""Overload through a real server: a bounded queue that refuses at once, deadlines and cancelled
calls that are never computed and free their place, and the per-connection stream limit.

The batcher waits `max_queue_delay_s` for a batch to fill (adaptive wait off), so requests sit in
the queue long enough to test what happens to them there; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor
from snapserve.server import BatcherConfig, RunningServer, ServerConfig
from snapserve.server.errors import ConfigError
from tests.support.calls import digits_input, predict_request
from tests.support.models import reference_member_probs
from tests.support.servers import serving
from tests.support.waiting import eventually


def held(max_queue_size: int = 256, delay_s: float = 1.0, max_batch_size: int = 8) -> BatcherConfig:
    """Requests wait in the queue for `delay_s` unless a full batch forms."""
    return BatcherConfig(max_batch_size=max_batch_size, max_queue_delay_s=delay_s,
                         max_queue_size=max_queue_size, adaptive_wait=False)


def stats(running: RunningServer):  # type: ignore[no-untyped-def]
    return running.registry.get("digits").batcher.stats


async def test_a_flood_is_refused_at_once_not_queued(model_repo: Path) -> None:
    flood, bound = 60, 4
    async with serving(model_repo, batcher=held(max_queue_size=bound)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            inputs = [digits_input(1, seed=i) for i in range(flood)]
            finished: list[tuple[int, str]] = []  # (request, outcome) in the order they ended

            async def send(i: int) -> None:
                try:
                    response = await stub.Predict(predict_request(inputs[i]))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    assert "queue is full (4 requests waiting, max_queue_size=4)" in exc.details()
                    finished.append((i, "refused"))
                else:
                    expected = reference_member_probs(model_repo / "digits" / "1", inputs[i])
                    np.testing.assert_allclose(from_tensor(response.probabilities),
                                               expected.mean(axis=1), rtol=1e-5, atol=1e-6)
                    finished.append((i, "answered"))

            await asyncio.gather(*(send(i) for i in range(flood)))
        outcomes = [o for _, o in finished]
        assert outcomes.count("answered") == bound and outcomes.count("refused") == flood - bound
        # Refused at once: every refusal came back before the queued requests were answered.
        assert outcomes == ["refused"] * (flood - bound) + ["answered"] * bound
        s = stats(running)
        assert (s.refused_full, s.items, s.batches) == (flood - bound, bound, 1)


async def test_a_deadline_that_passes_in_the_queue_is_never_computed(model_repo: Path) -> None:
    async with serving(model_repo, batcher=held(delay_s=3.0)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(predict_request(digits_input(1)), timeout=0.2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: stats(running).dropped_expired == 1, "counted as expired")
            assert running.registry.get("digits").batcher.queued == 0  # its place is free
        s = stats(running)
        assert (s.items, s.batches, s.dropped_cancelled) == (0, 0, 0)


async def test_a_cancelled_call_frees_its_place_in_the_queue(model_repo: Path) -> None:
    async with serving(model_repo, batcher=held(max_queue_size=2)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            first = [stub.Predict(predict_request(digits_input(1, seed=i))) for i in range(2)]
            await eventually(lambda: running.registry.get("digits").batcher.queued == 2,
                             "queue full")
            for call in first:
                call.cancel()
            await eventually(lambda: stats(running).dropped_cancelled == 2, "counted as cancelled")
            # the queue is free again at once, not when the batch would have formed
            second = [digits_input(1, seed=10 + i) for i in range(2)]
            answers = await asyncio.gather(*(stub.Predict(predict_request(x)) for x in second))
            for x, answer in zip(second, answers):
                expected = reference_member_probs(model_repo / "digits" / "1", x).mean(axis=1)
                np.testing.assert_allclose(from_tensor(answer.probabilities), expected, rtol=1e-5,
                                           atol=1e-6)
        s = stats(running)
        assert (s.items, s.refused_full, s.dropped_expired) == (2, 0, 0)


async def test_concurrent_streams_per_connection_are_limited(model_repo: Path) -> None:
    """With one stream per connection the four calls reach the server one after another, so
    each forms its own batch; the fifth connection's call is not held up by the others."""
    async with serving(model_repo, batcher=held(delay_s=0.2), max_concurrent_streams=1) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            answers = await asyncio.gather(*(stub.Predict(predict_request(digits_input(1, seed=i)))
                                             for i in range(4)))
        assert all(from_tensor(a.probabilities).shape == (1, 5) for a in answers)
        s = stats(running)
        assert (s.items, s.batches) == (4, 4)


def test_limits_have_safe_defaults_and_are_checked(model_repo: Path) -> None:
    config = ServerConfig(model_repository=model_repo)
    assert config.max_message_bytes == 64 * 2**20
    assert config.max_concurrent_streams == 256
    assert (config.batcher.max_batch_size, config.batcher.max_queue_size) == (32, 256)
    assert config.runtime.allow_nonfinite is False
    with pytest.raises(ConfigError, match="max_concurrent_streams must be an integer >= 1"):
        ServerConfig(model_repository=model_repo, max_concurrent_streams=0)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        ServerConfig(model_repository=model_repo, max_message_bytes=10)
