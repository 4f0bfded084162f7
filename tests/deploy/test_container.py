"""The server image, built and run for real with podman (marker `container`; .ci/run runs it).

Builds the Dockerfile's default target on a local stand-in for the slim Python base image (no image
registry is reachable here), starts it with a model repository volume and the C++ front end's port,
waits for the HEALTHCHECK (gRPC health) to pass, compares predictions on both gRPC ports and REST
with a local computation, and stops it: exit code 0.

Needs this workplace's container helpers in `../shared/container/` beside the repository (they build
the stand-in base image and run podman with the flags this machine needs); skipped without them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from snapserve.client import EnsembleClient
from tests.support.models import random_members, reference_member_probs, write_model_version

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT.parent / "shared" / "container"
PODMAN_HERE = HELPERS / "podman-here"
MAKE_BASE_IMAGE = HELPERS / "make-base-image.sh"
BUILD_TIMEOUT_S = 1200  # the first build downloads onnxruntime, numpy and grpcio from PyPI
START_TIMEOUT_S = 120


def sh(*args: str | Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def podman(*args: str | Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(PODMAN_HERE, *args, timeout=timeout, check=check)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def base_image() -> str:
    if not PODMAN_HERE.exists() or not MAKE_BASE_IMAGE.exists():
        pytest.skip(f"no container helpers at {HELPERS} (../shared/container/ beside the repository: "
                    "this workplace's podman-here and make-base-image.sh); outside it, build with "
                    "docker or podman by hand as docs/deploy.md shows")
    # Installs podman when missing, and builds the stand-in once (then reuses it): prints its tag.
    out = sh("bash", MAKE_BASE_IMAGE, timeout=BUILD_TIMEOUT_S).stdout.split()
    assert out, "make-base-image.sh printed no tag"
    return out[-1]


@pytest.fixture(scope="module")
def image(base_image: str) -> Iterator[str]:
    tag = f"localhost/snapserve-test:{uuid.uuid4().hex[:12]}"
    try:
        started = time.monotonic()
        podman("build", "--layers=false", "--build-arg", f"BASE_IMAGE={base_image}", "-t", tag,
               ROOT, timeout=BUILD_TIMEOUT_S)
        print(f"built {tag} in {time.monotonic() - started:.0f}s")
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """digits (3 members) and tiny, readable by the image's non-root user (uid 10001)."""
    repo = tmp_path / "models"
    write_model_version(repo, "digits", random_members(3, 16, 5, seed=1), (1, 4, 4),
                        [str(i) for i in range(5)], normalization={"mean": [0.5], "std": [2.0],
                                                                    "axis": 1})
    write_model_version(repo, "tiny", random_members(2, 3, 2, seed=2), (3,), ["no", "yes"],
                        temperature=2.0)
    for path in [repo, *repo.rglob("*")]:  # mounted as it is: the container's user needs r(x)
        path.chmod(0o755 if path.is_dir() else 0o644)
    return repo


class Container:
    def __init__(self, name: str, http_port: int = 0) -> None:
        self.name = name
        self.http_port = http_port  # the KServe v2 REST port (SNAPSERVE_HTTP_PORT)

    def state(self) -> dict[str, str]:
        out = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.name).stdout
        status, code = out.split()
        return {"status": status, "exit_code": code}

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        return podman("healthcheck", "run", self.name, timeout=60, check=False)

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthcheck().returncode == 0:
                return
            if self.state()["status"] != "running":
                pytest.fail(f"container stopped while starting: {self.state()}\n{self.logs()}")
            time.sleep(1)
        pytest.fail(f"not healthy after {timeout}s:\n{self.logs()}")


@pytest.fixture
def container(image: str, repository: Path) -> Iterator[tuple[Container, int]]:
    name = f"snapserve-test-{uuid.uuid4().hex[:12]}"
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    # Host network (podman-here): bind loopback only, on free ports (the metrics default, 8002,
    # may be another server's on this host). Configured by variables (SNAPSERVE_*) and flags
    # after the image name, as docs/deploy.md shows.
    podman("run", "--detach", "--name", name,
           "--env", f"SNAPSERVE_PORT={port}", "--env", f"SNAPSERVE_HTTP_PORT={http_port}",
           "--env", f"SNAPSERVE_METRICS_PORT={metrics_port}",
           "--env", "SNAPSERVE_HOST=127.0.0.1",
           "--volume", f"{repository}:/models:ro",
           image, "--max-batch-size", "16", "--max-queue-delay-ms", "2", "--grace-s", "5")
    try:
        yield Container(name, http_port), port
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_image_serves_predictions_and_stops_cleanly(container: tuple[Container, int],
                                                    repository: Path) -> None:
    box, port = container
    box.wait_healthy()
    assert box.healthcheck().returncode == 0

    x = np.random.default_rng(7).normal(0.5, 1.0, (6, 1, 4, 4)).astype(np.float32)
    with EnsembleClient(f"127.0.0.1:{port}", timeout=30) as client:
        assert sorted(m.name for m in client.list_models()) == ["digits", "tiny"]
        prediction = client.predict("digits", x, normalize=True, member_probabilities=True)
        tiny = client.predict("tiny", np.eye(3, dtype=np.float32))
    # The oracle: each member run here with onnxruntime on the same normalized input.
    expected = reference_member_probs(repository / "digits" / "1", (x - 0.5) / 2.0)
    np.testing.assert_allclose(prediction.member_probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(prediction.probabilities, expected.mean(axis=1), atol=1e-5)
    assert tiny.probabilities.shape == (3, 2)
    np.testing.assert_allclose(tiny.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The same image answers KServe v2 REST (JSON; REST sends the input as is: normalized here).
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": ((x - 0.5) / 2.0).ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}
    request = urllib.request.Request(f"http://127.0.0.1:{box.http_port}/v2/models/digits/infer",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        output = json.loads(response.read())["outputs"][0]
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(output["shape"]),
                               expected.mean(axis=1), atol=1e-5)

    logs = box.logs()
    assert "execution providers ['CPUExecutionProvider']" in logs
    # The gRPC answers above came through the C++ front end: its library was built with the
    # image, so `auto` serves the port through it, and the server (no compiler) loads it as is.
    assert (f"gRPC port 127.0.0.1:{port}: the C++ front end (auto: the C++ front end is built "
            "here)") in logs, logs
    assert "building the C++ front end" not in logs
    # The image's plan cache is the server user's to write: the start measured and kept them.
    assert "plan measured at load, kept in the plan cache (/var/cache/snapserve/plans/digits-1-" \
        in logs, logs
    assert "plan cache: cannot write" not in logs

    # `podman stop` sends the image's STOPSIGNAL (SIGTERM): the server drains and exits 0.
    podman("stop", "--time", "30", box.name, timeout=60)
    assert box.state() == {"status": "exited", "exit_code": "0"}, box.logs()
    assert "stopped serving" in box.logs()

    # Started again, the container (its own layer kept) serves the plans it measured.
    podman("start", box.name, timeout=60)
    box.wait_healthy()
    with EnsembleClient(f"127.0.0.1:{port}", timeout=30) as client:
        again = client.predict("digits", x, normalize=True)
    np.testing.assert_allclose(again.probabilities, expected.mean(axis=1), atol=1e-5)
    assert "plan the plan cache (/var/cache/snapserve/plans/digits-1-" in box.logs()
    podman("stop", "--time", "30", box.name, timeout=60)


def test_image_runs_as_non_root_without_pytorch(image: str) -> None:
    out = podman("run", "--rm", "--entrypoint", "python", image, "-c",
                 "import os, importlib.util as u, onnxruntime; "
                 "print(os.getuid(), os.getgid(), u.find_spec('torch') is None, "
                 "onnxruntime.get_available_providers())", timeout=120).stdout
    assert out.split(" ", 3)[:3] == ["10001", "10001", "True"]
    assert "CPUExecutionProvider" in out


def test_missing_repository_fails_fast_with_a_clear_error(image: str) -> None:
    result = podman("run", "--rm", "--env", f"SNAPSERVE_PORT={free_port()}", image,
                    "--model-repository", "/nowhere", timeout=120, check=False)
    assert result.returncode == 2
    assert "model_repository '/nowhere' is not a directory" in result.stdout + result.stderr
