"""benchmarks/cpp_frontend.py end to end on a small repository: one server, both ports driven
in turn, the section rendered. Needs g++ and libgrpc++ (skipped without them, but not in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import cpp_frontend
from tests.support.models import write_repository

pytestmark = pytest.mark.scripts


def _toolchain() -> bool:
    found = shutil.which("g++") is not None and shutil.which("pkg-config") is not None and (
        subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode == 0)
    if not found and os.environ.get("CI") == "true":
        pytest.fail("g++ or gRPC's C++ library is missing in CI: .ci/run installs them")
    return found


@pytest.mark.parametrize("api", ["kserve", "stream"])
def test_both_ports_are_driven_and_reported(api: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if not _toolchain():
        pytest.skip("needs g++ and libgrpc++ (apt-get install g++ libgrpc++-dev pkg-config)")
    monkeypatch.setenv("SNAPSERVE_CPP_DIR", str(tmp_path / "cpp"))  # the server's build
    repo = write_repository(tmp_path / "models")
    work = tmp_path / "work"
    work.mkdir()
    report = cpp_frontend.run({"digits": repo / "digits" / "1"}, [2], 0.5, 0.2, 1, work, api)
    rows = report["models"]["digits"][2]
    for port in cpp_frontend.PORTS:
        (level,) = rows[port]
        assert level["throughput_rps"] > 0 and not level["errors"], (port, level)
        assert level["thread_cpu_ms_per_request"]["loop"] > 0
    text = cpp_frontend.render(report, "python -m benchmarks.cpp_frontend")
    section = cpp_frontend.STREAM_SECTION if api == "stream" else cpp_frontend.SECTION
    assert text.startswith(f"## {section}\n")
    assert ("PredictStream" in text) == (api == "stream")
    assert "| digits | 2 | C++ / grpc.aio |" in text
    assert any("C++ front end serving gRPC" in line for line in report["server_log"])
