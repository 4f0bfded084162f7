"""The server's limits on every door (docs/reliability.md, "Limits"): each refuses with the
documented code, and each flag maps onto its config field with its default."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from snapserve.server.api.intake import Intake, IntakeConfig
from snapserve.server.process.cli import load_config
from snapserve.server.errors import ConfigError, Overloaded
from tests.support.calls import digits_input, predict_request
from tests.support.servers import serving


def test_intake_bounds_calls_and_bytes_until_queued() -> None:
    intake = Intake(IntakeConfig(max_pending_calls=2, max_pending_bytes=100))
    with intake.admit(60):
        with pytest.raises(Overloaded, match="max_pending_bytes=100"):
            with intake.admit(50):
                pass
        with intake.admit(40) as ticket:
            with pytest.raises(Overloaded, match="max_pending_calls=2"):
                with intake.admit(0):
                    pass
            ticket.queued()  # the inner call went to a batcher: it no longer counts
            assert (intake.calls, intake.bytes) == (1, 60)
            ticket.queued()  # given back once
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
    config = load_config(["--model-repository", str(model_repo)], {})[1]
    assert config.intake == IntakeConfig()
    assert (config.intake.max_pending_calls, config.intake.max_pending_bytes,
            config.intake.decode_threads) == (1024, 256 * 2**20, 2)
    config = load_config([
        "--model-repository", str(model_repo), "--max-pending-calls", "8",
        "--max-pending-mb", "1", "--decode-threads", "1"], {})[1]
    assert config.intake == IntakeConfig(max_pending_calls=8, max_pending_bytes=2**20, decode_threads=1)


# -- tokens and health ----------------------------------------------------------------------------

import logging  # noqa: E402

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from snapserve.server.config import ConnectionConfig  # noqa: E402
from snapserve.server.api.security import SecurityConfig  # noqa: E402

TOKEN = "a-token-long-enough-for-tests-01"


def _token_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


async def test_token_warnings_and_named_model_health_needs_a_token(
        model_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = _token_file(tmp_path, 0o644)
    with caplog.at_level(logging.WARNING, logger="snapserve"):
        async with serving(model_repo, security=SecurityConfig(auth_token_file=tokens)) as running:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                check = health_pb2.HealthCheckRequest
                assert (await health.Check(check(service=""))).status == 1  # probes: open
                for name in ("digits", "no-such-model"):  # same answer: reveals nothing
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await health.Check(check(service=name))
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                metadata = (("authorization", f"Bearer {TOKEN}"),)
                answer = await health.Check(check(service="digits"), metadata=metadata)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "readable by other users" in warnings
    assert "without TLS" in warnings


async def test_idle_connections_are_closed(model_repo: Path) -> None:
    connections = ConnectionConfig(max_idle_s=0.5)
    async with serving(model_repo, connections=connections) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            for _ in range(40):  # the server's GOAWAY after 0.5 s idle: the channel goes IDLE
                await asyncio.sleep(0.1)
                if channel.get_state() == grpc.ChannelConnectivity.IDLE:
                    break
            assert channel.get_state() == grpc.ChannelConnectivity.IDLE


def test_connection_flags_and_defaults(model_repo: Path) -> None:
    config = load_config(["--model-repository", str(model_repo)], {})[1]
    assert config.connections == ConnectionConfig()
    assert dict(ConnectionConfig().grpc_options())["grpc.max_connection_idle_ms"] == 300_000
    config = load_config([
        "--model-repository", str(model_repo), "--max-connection-idle-s", "5",
        "--max-connection-age-s", "0", "--keepalive-s", "30"], {})[1]
    assert config.connections == ConnectionConfig(max_idle_s=5, max_age_s=0, keepalive_s=30)
    assert "grpc.max_connection_age_ms" not in dict(config.connections.grpc_options())
