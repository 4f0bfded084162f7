"""`python -m snapserve.server.process.healthcheck`, the image's HEALTHCHECK, against a real server: exit 0 only for
SERVING, 1 for anything else, reading SNAPSERVE_PORT like the server does."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from snapserve.server import RunningServer
from tests.support.pki import self_signed
from tests.support.servers import pinned_runtime

ROOT = Path(__file__).resolve().parents[2]


async def healthcheck(*args: str, port: int | None = None) -> tuple[int, str]:
    """Runs the CLI as the container does (a separate process), while this loop serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSERVE_")}
    if port is not None:
        env["SNAPSERVE_PORT"] = str(port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapserve.server.process.healthcheck", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_serving_server_is_healthy(running_server: RunningServer) -> None:
    code, out = await healthcheck(port=running_server.port)
    assert (code, out.strip()) == (0, f"127.0.0.1:{running_server.port}: SERVING")


async def test_flags_beat_the_environment(running_server: RunningServer) -> None:
    code, out = await healthcheck("--port", str(running_server.port),
                                  "--service", "snapserve.v1.EnsembleService", port=1)
    assert code == 0, out


async def test_unknown_service_is_unhealthy(running_server: RunningServer) -> None:
    code, out = await healthcheck("--service", "no.such.Service", port=running_server.port)
    assert code == 1
    assert "NOT_FOUND" in out


async def test_nothing_listening_is_unhealthy() -> None:
    code, out = await healthcheck("--timeout", "2", port=free_port())
    assert code == 1
    assert "UNAVAILABLE" in out


async def test_tls_server_is_checked_over_tls(model_repo: Path, tmp_path: Path) -> None:
    from snapserve.server import ServerConfig, start_server
    from snapserve.server.api.security import SecurityConfig

    cert, key = self_signed(tmp_path)
    running = await start_server(ServerConfig(model_repository=model_repo, port=0, http_port=None,
                                              security=SecurityConfig(tls_cert=cert, tls_key=key),
                                              runtime=pinned_runtime()))
    try:
        # As in the container: SNAPSERVE_TLS_CERT set for the server, so the check trusts it.
        code, out = await healthcheck("--tls-ca", str(cert), port=running.port)
        assert (code, out.strip()) == (0, f"127.0.0.1:{running.port}: SERVING")
        code, out = await healthcheck("--tls-ca", str(cert), "--host", "localhost",
                                      port=running.port)
        assert code == 0, out
        code, out = await healthcheck("--timeout", "2", port=running.port)  # plaintext: refused
        assert code == 1
    finally:
        await running.stop(None)


def test_tls_follows_the_server_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from snapserve.server.process.healthcheck import build_parser

    monkeypatch.delenv("SNAPSERVE_TLS_CERT", raising=False)
    assert build_parser().parse_args([]).tls_ca is None
    monkeypatch.setenv("SNAPSERVE_TLS_CERT", str(tmp_path / "c.pem"))
    monkeypatch.setenv("SNAPSERVE_PORT", "7000")
    args = build_parser().parse_args([])
    assert (args.tls_ca, args.port) == (tmp_path / "c.pem", 7000)
