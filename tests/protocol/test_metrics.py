"""Prometheus metrics: scraped over HTTP after real requests through both APIs."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc.aio as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from snapserve.server import RunningServer

from tests.support.calls import digits_input, native_predict, native_stub, triton_client
from tests.support.models import write_model_version
from tests.support.servers import serving

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(running: RunningServer) -> Samples:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_requests_latency_batches_and_models_after_real_requests(
        running: RunningServer) -> None:
    async with native_stub(running) as stub:
        for seed in range(3):
            await native_predict(stub, digits_input(2, seed=seed))
    async with triton_client(running) as client:
        x = digits_input(1)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        await client.infer("digits", [tensor])
        with pytest.raises(InferenceServerException):
            await client.infer("made-up", [tensor])
    samples = await scrape(running)

    requests = "snapserve_inference_requests_total"
    assert value(samples, requests, model="digits", api="native", code="OK") == 3
    assert value(samples, requests, model="digits", api="kserve", code="OK") == 1
    # Unknown names share one series, so made-up names cannot grow the number of series.
    assert value(samples, requests, model="_other", api="kserve", code="NOT_FOUND") == 1
    assert value(samples, "snapserve_request_duration_seconds_count",
                 model="digits", api="native") == 3
    assert value(samples, "snapserve_request_duration_seconds_sum",
                 model="digits", api="native") > 0
    assert value(samples, "snapserve_queue_duration_seconds_count", model="digits", version="1") == 4
    batches = value(samples, "snapserve_compute_duration_seconds_count", model="digits", version="1")
    assert 1 <= batches <= 4
    assert value(samples, "snapserve_batch_size_count", model="digits", version="1") == batches
    assert value(samples, "snapserve_batch_size_sum", model="digits", version="1") == 7  # examples
    assert value(samples, "snapserve_queue_depth", model="digits", version="1") == 0
    assert value(samples, "snapserve_models_loaded") == 2
    assert value(samples, "snapserve_model_version_loaded", model="tiny", version="1",
                 method="fge", members="2") == 1


async def test_each_server_counts_its_own_and_load_failures_count(model_repo: Path) -> None:
    write_model_version(model_repo, "digits", [], (1, 4, 4), [str(i) for i in range(5)],
                        manifest_overrides={"members": []})  # digits/2: refused at load
    async with serving(model_repo, metrics_port=0) as first, \
            serving(model_repo, metrics_port=0) as second:
        async with native_stub(first) as stub:
            await native_predict(stub, digits_input(1))
        one, two = await scrape(first), await scrape(second)
    ok = {"model": "digits", "api": "native", "code": "OK"}
    assert value(one, "snapserve_inference_requests_total", **ok) == 1
    assert value(two, "snapserve_inference_requests_total", **ok) == 0
    assert value(one, "snapserve_model_load_failures_total", model="digits",
                 reason="manifest") == 1
    assert value(one, "snapserve_model_version_loaded", model="digits", version="1",
                 method="snapshot", members="3") == 1


async def test_metrics_are_off_unless_a_port_is_given(model_repo: Path) -> None:
    async with serving(model_repo) as running:
        assert running.metrics_port is None
