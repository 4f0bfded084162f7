"""`--workers N`: two server processes answer on one port (SO_REUSEPORT), each with its own
sessions; the parent serves one /metrics, their sum; SIGTERM to the parent drains both and it
exits 0. Through grpc.aio and through the C++ front end (its own listener, SO_REUSEPORT too)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.soak import INPUT_SHAPE, MODEL, build_repository
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import to_tensor
from tests.support.promtool import promtool
from tests.support.servers import PINNED_FLAGS

ROOT = Path(__file__).resolve().parents[3]
ALL_READY = re.compile(r"serving on 127\.0\.0\.1:(\d+) with 2 workers")
# The parent's one endpoint, as a lone server logs its own; and each worker's, on loopback.
PARENT_METRICS = re.compile(r"snapserve\.server\.process\.workers: metrics on http://127\.0\.0\.1:(\d+)/")
WORKER_METRICS = re.compile(r"snapserve\.server\.observability\.metrics: worker \d+: its metrics for the parent "
                            r"on http://127\.0\.0\.1:(\d+)/")
ANSWERED = re.compile(r'snapserve_inference_requests_total\{[^}]*code="OK"[^}]*\} (\S+)')


class _Parent:
    def __init__(self, repo: Path, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapserve.server", "--model-repository", str(repo),
             "--port", "0", "--http-port", "0", "--metrics-port", "0", "--workers", "2",
             "--drain-window-s", "0", "--grace-s", "5", "--poll-interval", "0", *PINNED_FLAGS,
             *flags], cwd=ROOT, stderr=subprocess.PIPE, text=True)
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


def _predict_over_channels(port: int, channels: int, each: int) -> None:
    """`each` requests on each of `channels` channels open at once. A channel is one TCP
    connection (its own subchannel pool: not shared between channels), which the kernel hands to
    either worker (SO_REUSEPORT hashes the connection's addresses) and which stays there."""
    x = np.zeros((1, *INPUT_SHAPE), np.float32)
    opened = [grpc.insecure_channel(f"127.0.0.1:{port}",
                                    options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    try:
        for channel in opened:
            stub = pb_grpc.EnsembleServiceStub(channel)
            for _ in range(each):
                answer = stub.Predict(pb.PredictRequest(model=MODEL, input=to_tensor(x)), timeout=30)
                assert answer.probabilities.shape == [1, 10]
    finally:
        for channel in opened:
            channel.close()


def _exposition(metrics_port: int) -> str:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def _answered(text: str) -> float:
    return sum(float(v) for v in ANSWERED.findall(text))


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(name)


def _check_with_promtool(text: str) -> None:
    """`promtool check metrics` on the merged text; left out where promtool is missing, except in
    CI (tests/support/promtool.py fails there)."""
    if shutil.which("promtool") is None and os.environ.get("CI") != "true":
        return
    result = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_two_workers_answer_on_one_port_and_sigterm_drains_both(each_frontend: str,
                                                                 tmp_path: Path) -> None:
    parent = _Parent(build_repository(tmp_path / "models"), "--grpc-frontend", each_frontend)
    try:
        assert parent.ready.wait(120) and parent.proc.poll() is None, parent.log
        port = int(ALL_READY.search(parent.log).group(1))  # type: ignore[union-attr]
        served = [int(p) for p in PARENT_METRICS.findall(parent.log)]
        assert len(served) == 1, parent.log  # one endpoint for the whole server
        worker_ports = sorted({int(p) for p in WORKER_METRICS.findall(parent.log)})
        assert len(worker_ports) == 2, parent.log
        channels, each = 20, 2
        _predict_over_channels(port, channels, each)
        sent = channels * each
        merged = _exposition(served[0])
        per_worker = [_answered(_exposition(p)) for p in worker_ports]
        assert all(n > 0 for n in per_worker), per_worker  # both answered some
        assert _answered(merged) == sum(per_worker) == sent, merged
        assert _sample(merged, "snapserve_workers") == 2
        assert _sample(merged, "snapserve_models_loaded") == 1  # the same model in both: max
        for worker in ("0", "1"):
            assert _sample(merged, "snapserve_worker_scrape_errors_total", worker=worker) == 0
        _check_with_promtool(merged)
        began = time.monotonic()
        parent.proc.send_signal(signal.SIGTERM)
        assert parent.proc.wait(60) == 0, parent.log
        assert time.monotonic() - began < 30
    finally:
        if parent.proc.poll() is None:
            parent.proc.kill()
            parent.proc.wait(30)
    log = parent.log
    which = "the C++ front end" if each_frontend == "cpp" else "grpc.aio"
    assert log.count(f"gRPC port 127.0.0.1:{port}: {which}") == 2, log  # each worker's
    assert log.count("stopped serving on 127.0.0.1:") == 2, log  # both workers drained
    assert "all 2 workers stopped" in log
