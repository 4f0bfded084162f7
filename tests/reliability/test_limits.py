"""The server's limits on every door (docs/reliability.md, "Limits"): each refuses with the
documented code, and each flag maps onto its config field with its default."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from snapserve.server.api.intake import Intake, IntakeConfig, queued
from snapserve.server.cli import build_parser, config_from_args
from snapserve.server.errors import ConfigError, Overloaded
from tests.support.calls import digits_input, predict_request
from tests.support.servers import serving


def test_intake_bounds_calls_and_bytes_until_queued() -> None:
    intake = Intake(IntakeConfig(max_pending_calls=2, max_pending_bytes=100))
    with intake.admit(60):
        with pytest.raises(Overloaded, match="max_pending_bytes=100"):
            with intake.admit(50):
                pass
        with intake.admit(40):
            with pytest.raises(Overloaded, match="max_pending_calls=2"):
                with intake.admit(0):
                    pass
            queued()  # the inner call went to a batcher: it no longer counts
            assert (intake.calls, intake.bytes) == (1, 60)
    assert (intake.calls, intake.bytes, intake.refused) == (0, 0, 2)
    with pytest.raises(ConfigError, match="max_pending_calls"):
        IntakeConfig(max_pending_calls=0)


async def test_a_server_at_its_intake_bound_refuses_with_resource_exhausted(
        model_repo: Path) -> None:
    async with serving(model_repo, intake=IntakeConfig(max_pending_calls=1)) as running:
        ticket = running.intake.admit(0)
        ticket.__enter__()  # one call held between receipt and the queue
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                predict = channel.unary_unary(
                    "/snapserve.v1.EnsembleService/Predict",
                    request_serializer=lambda r: r.SerializeToString())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await predict(predict_request(digits_input(1)), timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_pending_calls=1" in info.value.details()
                ticket.__exit__(None, None, None)
                assert await predict(predict_request(digits_input(1)), timeout=10)
        finally:
            ticket.__exit__(None, None, None)


def test_limit_flags_and_defaults(model_repo: Path) -> None:
    config = config_from_args(build_parser({}).parse_args(["--model-repository", str(model_repo)]))
    assert config.intake == IntakeConfig()
    assert (config.intake.max_pending_calls, config.intake.max_pending_bytes,
            config.intake.decode_threads) == (1024, 256 * 2**20, 2)
    config = config_from_args(build_parser({}).parse_args([
        "--model-repository", str(model_repo), "--max-pending-calls", "8",
        "--max-pending-mb", "1", "--decode-threads", "1"]))
    assert config.intake == IntakeConfig(8, 2**20, 1)
