"""benchmarks/echo_floor.py: the C++ echo builds against the system's gRPC C++ library and
answers a real KServe client with the grpc.aio echo's very bytes. Skipped where libgrpc++-dev is
missing, except in CI (CI=true), where .ci/run installs it and its absence is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from benchmarks.echo_floor import _answers, build_cxx_echo, format_report
from benchmarks.serve import _span
from benchmarks.echo_server import canned_kserve_response
from benchmarks.serve import _process
from snapserve.proto.inference import grpc_service_pb2 as kpb

pytestmark = pytest.mark.scripts


def _have_grpcpp() -> bool:
    found = shutil.which("pkg-config") is not None and subprocess.run(
        ["pkg-config", "--exists", "grpc++"]).returncode == 0
    if not found and os.environ.get("CI") == "true":
        pytest.fail("gRPC's C++ library is missing in CI: .ci/run installs it (libgrpc++-dev)")
    return found


def test_the_cxx_echo_answers_as_the_grpc_aio_one(tmp_path: Path) -> None:
    if not _have_grpcpp():
        pytest.skip("no gRPC C++ library (apt-get install libgrpc++-dev)")
    binary = build_cxx_echo(tmp_path / "build")
    command = [str(binary), "0", *_answers(tmp_path)]
    with _process(command, tmp_path / "echo.log") as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        answer = infer(kpb.ModelInferRequest(model_name="echo").SerializeToString(), timeout=10)
        assert answer == canned_kserve_response(10, 5)
        assert kpb.ModelInferResponse.FromString(answer).outputs[0].name
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.RpcError) as refused:  # no canned answer: refused, not empty
            live(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_report_shows_each_repeat_as_a_span() -> None:
    assert _span([4300.0, 4100.0], ",.0f") == "4,100-4,300" and _span([1.0], ".2f") == "1.00"
    level = {"throughput_rps": 100.0, "latency_ms": {"p50": 1.0, "p99": 2.0},
             "server_cpu_ms_per_request": 0.1, "client_cpu_ms_per_request": 0.2}
    table = format_report({"levels": {8: {"C++": [level, {**level, "throughput_rps": 120.0}]}}})
    assert "| 8 | C++ | 100-120 | 1.00 / 2.00 | 0.100 | 0.200 |" in table
