"""The exposition as Prometheus itself reads it (`promtool check metrics`), and the process and
score metrics, scraped from a real server after real requests."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from prometheus_client.parser import text_string_to_metric_families

from snapserve.server import RunningServer
from tests.support.calls import digits_input, native_predict, native_stub
from tests.support.promtool import promtool


async def exposition(running: RunningServer) -> str:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())


async def traffic(running: RunningServer, client: triton.InferenceServerClient) -> list[dict]:
    """Requests through both APIs, one refused, so every family has series."""
    async with native_stub(running) as stub:
        answers = [await native_predict(stub, digits_input(3, seed=seed)) for seed in range(2)]
    x = digits_input(1)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    await client.infer("digits", [tensor])
    with pytest.raises(Exception):
        await client.infer("made-up", [tensor])
    return answers


async def test_promtool_finds_nothing_to_lint(running: RunningServer,
                                              client: triton.InferenceServerClient) -> None:
    tool = promtool()
    await traffic(running, client)
    text = await exposition(running)
    result = await asyncio.to_thread(subprocess.run, [tool, "check", "metrics"], input=text,
                                     capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    assert "# HELP snapserve_served_mutual_information_nats " in text
    assert "# HELP snapserve_http_connections_closed_total " in text


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


async def test_process_and_disagreement_metrics(running: RunningServer,
                                                client: triton.InferenceServerClient) -> None:
    answers = await traffic(running, client)
    text = await exposition(running)
    assert sample(text, "process_resident_memory_bytes") > 10 * 2**20
    assert sample(text, "process_open_fds") > 3
    assert sample(text, "process_cpu_seconds_total") > 0
    assert sample(text, "snapserve_process_threads") > 2  # gRPC's and ONNX Runtime's too
    digits = {"model": "digits", "version": "1"}
    # One observation per answered example (3 + 3 native, 1 KServe), the sum theirs.
    assert sample(text, "snapserve_served_mutual_information_nats_count", **digits) == 7
    native_sum = sum(float(a["mutual_information"].sum()) for a in answers)
    assert sample(text, "snapserve_served_mutual_information_nats_sum", **digits) >= native_sum
    votes = np.concatenate([a["vote_disagreement"] for a in answers])
    assert sample(text, "snapserve_served_vote_disagreement_ratio_bucket", le="0.0",
                  **digits) >= int((votes == 0).sum())
    assert sample(text, "snapserve_served_vote_disagreement_ratio_count", **digits) == 7
