"""The workers' metrics merged into one exposition (server/observability/metrics_merge.py): the rules on
hand-written text, then the collector fetching real HTTP endpoints, a silent one among them."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from snapserve.server.observability.metrics_merge import WorkerMetrics, merge_families, parse_exposition

# As prometheus_client writes them: worker 0 was asked for digits over both APIs, worker 1 for
# digits natively and for tiny, which worker 0 never saw.
WORKER_0 = """\
# HELP snapserve_inference_requests_total Inference requests answered
# TYPE snapserve_inference_requests_total counter
snapserve_inference_requests_total{model="digits",api="native",code="OK"} 3.0
snapserve_inference_requests_total{model="digits",api="kserve",code="OK"} 1.0
# HELP snapserve_inference_requests_created Inference requests answered
# TYPE snapserve_inference_requests_created gauge
snapserve_inference_requests_created{model="digits",api="native",code="OK"} 1700000020.0
snapserve_inference_requests_created{model="digits",api="kserve",code="OK"} 1700000021.0
# HELP snapserve_batch_size Examples per computed batch
# TYPE snapserve_batch_size histogram
snapserve_batch_size_bucket{le="1.0",model="digits",version="1"} 1.0
snapserve_batch_size_bucket{le="2.0",model="digits",version="1"} 2.0
snapserve_batch_size_bucket{le="+Inf",model="digits",version="1"} 3.0
snapserve_batch_size_count{model="digits",version="1"} 3.0
snapserve_batch_size_sum{model="digits",version="1"} 6.0
# HELP snapserve_load_seconds A summary
# TYPE snapserve_load_seconds summary
snapserve_load_seconds_count 2.0
snapserve_load_seconds_sum 0.5
# HELP snapserve_queue_depth Requests waiting for a batch
# TYPE snapserve_queue_depth gauge
snapserve_queue_depth{model="digits",version="1"} 4.0
# HELP snapserve_models_loaded Models with at least one version loaded
# TYPE snapserve_models_loaded gauge
snapserve_models_loaded 2.0
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1700000005.0
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 1024.0
"""

WORKER_1 = """\
# HELP snapserve_inference_requests_total Inference requests answered
# TYPE snapserve_inference_requests_total counter
snapserve_inference_requests_total{model="digits",api="native",code="OK"} 5.0
snapserve_inference_requests_total{model="tiny",api="native",code="OK"} 2.0
# HELP snapserve_inference_requests_created Inference requests answered
# TYPE snapserve_inference_requests_created gauge
snapserve_inference_requests_created{model="digits",api="native",code="OK"} 1700000010.0
snapserve_inference_requests_created{model="tiny",api="native",code="OK"} 1700000030.0
# HELP snapserve_batch_size Examples per computed batch
# TYPE snapserve_batch_size histogram
snapserve_batch_size_bucket{le="1.0",model="digits",version="1"} 0.0
snapserve_batch_size_bucket{le="2.0",model="digits",version="1"} 4.0
snapserve_batch_size_bucket{le="+Inf",model="digits",version="1"} 5.0
snapserve_batch_size_count{model="digits",version="1"} 5.0
snapserve_batch_size_sum{model="digits",version="1"} 11.0
# HELP snapserve_load_seconds A summary
# TYPE snapserve_load_seconds summary
snapserve_load_seconds_count 1.0
snapserve_load_seconds_sum 0.25
# HELP snapserve_queue_depth Requests waiting for a batch
# TYPE snapserve_queue_depth gauge
snapserve_queue_depth{model="digits",version="1"} 3.0
# HELP snapserve_models_loaded Models with at least one version loaded
# TYPE snapserve_models_loaded gauge
snapserve_models_loaded 2.0
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1700000001.0
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 4096.0
"""


def value(families: list[Metric], name: str, **labels: str) -> float:
    found = [s.value for family in families for s in family.samples
             if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
def merged() -> list[Metric]:
    return merge_families([parse_exposition(WORKER_0), parse_exposition(WORKER_1)])


def test_counters_sum_per_label_set(merged: list[Metric]) -> None:
    native = {"model": "digits", "api": "native", "code": "OK"}
    assert value(merged, "snapserve_inference_requests_total", **native) == 8
    # In one worker only: that worker's value, not dropped and not doubled.
    assert value(merged, "snapserve_inference_requests_total", model="digits", api="kserve",
                 code="OK") == 1
    assert value(merged, "snapserve_inference_requests_total", model="tiny", api="native",
                 code="OK") == 2
    # The series began when its first worker's did.
    assert value(merged, "snapserve_inference_requests_created", **native) == 1700000010


def test_histogram_buckets_count_and_sum_add_up(merged: list[Metric]) -> None:
    digits = {"model": "digits", "version": "1"}
    buckets = [(s.labels["le"], s.value) for family in merged for s in family.samples
               if s.name == "snapserve_batch_size_bucket"]
    assert buckets == [("1.0", 1), ("2.0", 6), ("+Inf", 8)]  # in order, each summed
    assert value(merged, "snapserve_batch_size_count", **digits) == 8
    assert value(merged, "snapserve_batch_size_sum", **digits) == 17


def test_summary_count_and_sum_add_up(merged: list[Metric]) -> None:
    assert value(merged, "snapserve_load_seconds_count") == 3
    assert value(merged, "snapserve_load_seconds_sum") == 0.75


def test_gauges_sum_unless_their_rule_says_max_or_min(merged: list[Metric]) -> None:
    assert value(merged, "snapserve_queue_depth", model="digits", version="1") == 7  # sum
    assert value(merged, "snapserve_models_loaded") == 2  # max: both load the same two
    assert value(merged, "process_max_fds") == 4096  # max
    assert value(merged, "process_start_time_seconds") == 1700000001  # min: the first start


class _Fixed:
    """A collector of given families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def test_merged_families_render_in_both_formats(merged: list[Metric]) -> None:
    """`_created` folded back into its counter: OpenMetrics has one family per name."""
    registry = CollectorRegistry()
    registry.register(_Fixed(merged))
    text = generate_latest(registry).decode()
    assert 'snapserve_inference_requests_total{api="native",code="OK",model="digits"} 8.0' in text
    assert "# TYPE snapserve_inference_requests_created gauge" in text
    names = [family.name for family in parse_openmetrics(generate_openmetrics(registry).decode())]
    assert len(names) == len(set(names))
    assert "snapserve_inference_requests" in names
    assert "snapserve_inference_requests_created" not in names


@pytest.fixture
def endpoints() -> Iterator[list[int]]:
    """Two real HTTP endpoints serving WORKER_0 and WORKER_1."""
    servers = [_serve_text(WORKER_0), _serve_text(WORKER_1)]
    yield [server.server_address[1] for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def _serve_text(text: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a stuck worker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_collector_merges_live_workers_and_counts_the_silent_one(
        endpoints: list[int], silent_port: int) -> None:
    ports = {0: endpoints[0], 1: endpoints[1], 2: silent_port}
    collector = WorkerMetrics(lambda: ports, 3, timeout_s=0.3)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        for scrape in (1, 2):
            families = list(text_for(registry))
            assert value(families, "snapserve_inference_requests_total", model="digits",
                         api="native", code="OK") == 8
            assert value(families, "snapserve_workers") == 3
            assert value(families, "snapserve_worker_scrape_errors_total", worker="2") == scrape
            assert value(families, "snapserve_worker_scrape_errors_total", worker="0") == 0
        del ports[2]  # exited: no longer asked, no longer counted
        assert value(list(text_for(registry)), "snapserve_worker_scrape_errors_total",
                     worker="2") == 2
    finally:
        collector.close()


def text_for(registry: CollectorRegistry) -> list[Metric]:
    return parse_exposition(generate_latest(registry).decode())
