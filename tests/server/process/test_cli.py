"""`python -m snapserve.server` as a real process: the ready line, serving, and clean exit on signals."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor, to_tensor
from snapserve.server.process.cli import load_config
from tests.support.servers import PINNED_FLAGS

ROOT = Path(__file__).resolve().parents[3]
READY = re.compile(r"serving on 127\.0\.0\.1:(\d+)")


def start(repo: Path, *extra: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapserve.server", "--model-repository", str(repo), "--port", "0",
         "--http-port", "0", *PINNED_FLAGS, *extra],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if match := READY.search(line):
            return proc, int(match.group(1)), lines
    proc.kill()
    pytest.fail("server did not report ready:\n" + "".join(lines + [proc.stderr.read()]))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_cleanly(model_repo: Path, sig: signal.Signals) -> None:
    proc, port, lines = start(model_repo, "--max-queue-delay-ms", "1", "--grace-s", "1")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            x = np.zeros((2, 1, 4, 4), np.float32)
            response = pb_grpc.EnsembleServiceStub(channel).Predict(
                pb.PredictRequest(model="digits", input=to_tensor(x)), timeout=10)
            assert from_tensor(response.probabilities).shape == (2, 5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines) + err
    log = "".join(lines) + err
    assert "execution providers ['CPUExecutionProvider']" in log
    assert "loaded model digits version 1" in log
    assert "stopped serving" in err


def test_flags_map_onto_the_config(model_repo: Path) -> None:
    _, config = load_config([
        "--model-repository", str(model_repo), "--host", "0.0.0.0", "--port", "9000",
        "--device", "cpu", "--max-batch-size", "4", "--max-queue-delay-ms", "7.5",
        "--max-queue-size", "3", "--intra-op-threads", "2", "--grace-s", "0.5"], {})
    assert (config.host, config.port, config.grace_s) == ("0.0.0.0", 9000, 0.5)
    assert (config.batcher.max_batch_size, config.batcher.max_queue_delay_s,
            config.batcher.max_queue_size) == (4, 0.0075, 3)
    assert (config.runtime.device, config.runtime.intra_op_threads) == ("cpu", 2)


def test_bad_flag_value_names_the_field(model_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from snapserve.server.process.cli import main
    with pytest.raises(SystemExit) as info:
        main(["--model-repository", str(model_repo), "--max-batch-size", "0"])
    assert info.value.code == 2
    assert ("max_batch_size (--max-batch-size, SNAPSERVE_MAX_BATCH_SIZE or 'max_batch_size' in the "
            "config file): must be an integer >= 1, got 0") in capsys.readouterr().err


def test_version_is_not_taken_for_a_prefix_of_another_flag() -> None:
    """`--version` prints the version; abbreviations are off, so `--version-p` is no flag."""
    done = subprocess.run([sys.executable, "-m", "snapserve.server", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ensemble-server ")
    done = subprocess.run([sys.executable, "-m", "snapserve.server", "--model-repository", ".",
                           "--version-p", "latest"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unrecognized arguments: --version-p" in done.stderr
