"""`--workers N`: two server processes answer on one port (SO_REUSEPORT), each with its own
sessions and metrics; SIGTERM to the parent drains both and it exits 0."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from benchmarks.soak import INPUT_SHAPE, MODEL, build_repository
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import to_tensor

ROOT = Path(__file__).resolve().parents[2]
ALL_READY = re.compile(r"serving on 127\.0\.0\.1:(\d+) with 2 workers")
METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
ANSWERED = re.compile(r'snapserve_inference_requests_total\{[^}]*code="OK"[^}]*\} (\S+)')


class _Parent:
    def __init__(self, repo: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapserve.server", "--model-repository", str(repo),
             "--port", "0", "--http-port", "0", "--metrics-port", "0", "--workers", "2",
             "--drain-window-s", "0", "--grace-s", "5", "--poll-interval", "0"],
            cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if ALL_READY.search(line):
                self.ready.set()
        self.ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)


def _predict_on_a_new_connection(port: int) -> None:
    x = np.zeros((1, *INPUT_SHAPE), np.float32)
    # A channel of its own each time: a new TCP connection, which the kernel hands to either
    # worker (SO_REUSEPORT hashes the connection's addresses).
    with grpc.insecure_channel(f"127.0.0.1:{port}",
                               options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        answer = pb_grpc.EnsembleServiceStub(channel).Predict(
            pb.PredictRequest(model=MODEL, input=to_tensor(x)), timeout=30)
    assert answer.probabilities.shape == [1, 10]


def _answered(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    return sum(float(v) for v in ANSWERED.findall(text.decode()))


def test_two_workers_answer_on_one_port_and_sigterm_drains_both(tmp_path: Path) -> None:
    parent = _Parent(build_repository(tmp_path / "models"))
    try:
        assert parent.ready.wait(120) and parent.proc.poll() is None, parent.log
        port = int(ALL_READY.search(parent.log).group(1))  # type: ignore[union-attr]
        metrics_ports = sorted({int(p) for p in METRICS.findall(parent.log)})
        assert len(metrics_ports) == 2, parent.log  # one endpoint per worker
        sent = 40
        for _ in range(sent):
            _predict_on_a_new_connection(port)
        per_worker = [_answered(p) for p in metrics_ports]
        assert sum(per_worker) == sent and all(n > 0 for n in per_worker), per_worker
        began = time.monotonic()
        parent.proc.send_signal(signal.SIGTERM)
        assert parent.proc.wait(60) == 0, parent.log
        assert time.monotonic() - began < 30
    finally:
        if parent.proc.poll() is None:
            parent.proc.kill()
            parent.proc.wait(30)
    log = parent.log
    assert log.count("stopped serving on 127.0.0.1:") == 2, log  # both workers drained
    assert "all 2 workers stopped" in log
