"""`ensemble-client bench --api http`: the load generator over the REST API, JSON and binary."""

from __future__ import annotations

import pytest

from snapserve.client.bench import BenchConfig, BenchError, run_bench
from snapserve.client.errors import ClientError
from snapserve.server import RunningServer


@pytest.mark.parametrize("http_data", ["json", "binary"])
async def test_bench_drives_the_rest_api(rest: RunningServer, http_data: str) -> None:
    config = BenchConfig(target=f"127.0.0.1:{rest.http_port}", model="digits", api="http",
                         http_data=http_data, concurrency=(4,), duration_s=0.5, warmup_s=0.1,
                         batch_size=2)
    (level,) = await run_bench(config)
    assert level.requests > 0 and level.errors == {}
    assert level.examples_per_s == 2 * level.throughput_rps
    # The server's own batch counts, read from GET /v2/models/digits/stats.
    assert level.server_batches and all(size % 2 == 0 for size in level.server_batches)
    assert rest.metrics.registry.get_sample_value(
        "snapserve_inference_requests_total", {"model": "digits", "api": "http", "code": "OK"}) > 0


async def test_bench_over_rest_refuses_a_bad_target(rest: RunningServer) -> None:
    config = BenchConfig(target=f"127.0.0.1:{rest.http_port}", model="digits", api="http",
                         version=7, duration_s=0.2, warmup_s=0)
    with pytest.raises(ClientError, match="HTTP 404: model 'digits' has no version 7"):
        await run_bench(config)
    with pytest.raises(BenchError, match="http_data must be one of json, binary"):
        BenchConfig(target="x", model="digits", api="http", http_data="xml")
