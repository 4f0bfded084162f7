"""Prometheus metrics, one CollectorRegistry per server, served over HTTP when a port is given.

A registry per server, not prometheus_client's global one, so several servers in one process
(tests, an embedding application) each count their own requests.

| metric | type | labels |
|---|---|---|
| snapserve_inference_requests_total | counter | model, api (native, kserve, http), code (OK, NOT_FOUND, ...) |
| snapserve_request_duration_seconds | histogram | model, api: end to end in the gRPC handler |
| snapserve_queue_duration_seconds | histogram | model, version: waiting for a batch |
| snapserve_compute_duration_seconds | histogram | model, version: one batch, members and scores |
| snapserve_batch_size | histogram | model, version: examples per computed batch |
| snapserve_queue_depth | gauge | model, version: requests waiting for a batch |
| snapserve_models_loaded | gauge | (none): models with at least one version loaded |
| snapserve_model_version_loaded | gauge | model, version, method, members: 1 per loaded version |
| snapserve_model_load_failures_total | counter | model, reason (checksum, manifest, missing_file, invalid_onnx, graph_mismatch, load_error, unexpected): versions refused at load |
| snapserve_served_mutual_information_nats | histogram | model, version: per answered example, the members' disagreement (epistemic uncertainty) |
| snapserve_served_vote_disagreement_ratio | histogram | model, version: per answered example, the fraction of members outvoted |
| snapserve_members_evaluated | histogram | model, version: per answered example, the members its answer came from (fewer than all only when served adaptively) |
| snapserve_process_threads | gauge | (none): OS threads of the server (ONNX Runtime's included) |
| snapserve_http_connections | gauge | place (full, reserve, over_cap, lobby): REST connections open now (server/listeners.py) |
| snapserve_http_connections_closed_total | counter | reason (evicted, refused, header_timeout): REST connections closed for the listener's bounds |
| snapserve_cpp_calls_refused_total | counter | reason (queue_full, closed): calls the C++ front end refused before Python saw them (server/api/cpp.py; only where the C++ front end serves: grpc_frontend, --cpp-grpc-port) |
| snapserve_cpp_connections_refused_total | counter | connections the C++ front end closed as they arrived, grpc_max_connections being open (plaintext port; only where the C++ front end serves: grpc_frontend, --cpp-grpc-port) |
| process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, process_max_fds, process_virtual_memory_bytes, process_start_time_seconds | (ProcessCollector) | (none) |
| python_info | gauge | version, implementation: the interpreter |

The two score histograms are the drift signal: their mean over time (`rate(_sum) / rate(_count)`)
rises when the traffic moves away from what the members were trained on, before any label says so.

Requests for a model that is not loaded are counted under model="_other" (a name no model can
have), so made-up names cannot grow the number of series without bound.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
from typing import Any, Callable, Iterator

import grpc
import numpy as np
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               PlatformCollector, ProcessCollector)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   Metric)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from snapserve.proto.scores import EnsembleScores
from snapserve.server.listeners import BoundedServer
from snapserve.server.observability.metrics_endpoint import MetricsEndpoint, MetricsEndpointConfig
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.registry import ModelRegistry
from snapserve.server.models.statistics import InferenceObserver
from snapserve.server.process.workers import worker_index

__all__ = ["API_HTTP", "API_KSERVE", "API_NATIVE", "OTHER_MODEL", "BatchHistogram", "ServerMetrics"]

logger = logging.getLogger(__name__)

API_NATIVE = "native"
API_KSERVE = "kserve"
API_HTTP = "http"  # KServe v2 over REST (api/http.py); its codes are the gRPC names too
OTHER_MODEL = "_other"  # model names start with a letter or digit (models.manifest.MODEL_NAME)

# Seconds: from a fraction of a millisecond (small models on CPU) to a slow, queued request.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Nats: near 0 when the members agree; ln(2) ~ 0.69 is already the most two classes allow.
MUTUAL_INFORMATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Fractions of members; 0: all vote with the ensemble (the usual case, so its own bucket).
VOTE_DISAGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Members: every count up to 10 (the usual ensemble sizes), then coarser.
MEMBERS_EVALUATED_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 32, 64)


class ServerMetrics:
    def __init__(self, models: ModelRegistry) -> None:
        self.registry = CollectorRegistry()
        self._models = models
        self._request_children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        self._http: MetricsEndpoint | None = None
        r = self.registry
        self.requests = Counter("snapserve_inference_requests", "Inference requests answered",
                                ["model", "api", "code"], registry=r)
        self.request_seconds = Histogram(
            "snapserve_request_duration_seconds", "End-to-end inference request time in the server",
            ["model", "api"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "snapserve_queue_duration_seconds", "Time a request waited for its batch to start",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(
            "snapserve_compute_duration_seconds", "Time to compute one batch (members and scores)",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("snapserve_batch_size", "Examples per computed batch",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.load_failures = Counter("snapserve_model_load_failures",
                                     "Model versions refused at load", ["model", "reason"],
                                     registry=r)
        self.mutual_information = BatchHistogram(
            "snapserve_served_mutual_information_nats",
            "Mutual information of each answered example: how much the members disagree",
            MUTUAL_INFORMATION_BUCKETS, registry=r)
        self.vote_disagreement = BatchHistogram(
            "snapserve_served_vote_disagreement_ratio",
            "Fraction of members whose top class differs from the ensemble's, per answered example",
            VOTE_DISAGREEMENT_BUCKETS, registry=r)
        self.members_evaluated = BatchHistogram(
            "snapserve_members_evaluated",
            "Members each answered example's scores came from (all, unless served adaptively)",
            MEMBERS_EVALUATED_BUCKETS, registry=r)
        r.register(_LoadedModelsCollector(models))
        # The process itself (CPU, RSS, open fds) on this registry, so one scrape has it all.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("snapserve_process_threads", "OS threads of the server process",
              registry=r).set_function(_thread_count)

    def observe_request(self, model: str, api: str, code: grpc.StatusCode, seconds: float) -> None:
        label = model if model in self._models else OTHER_MODEL
        # The labelled children, looked up once per (model, api, code) instead of per request.
        key = (label, api, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(label, api, code.name), self.request_seconds.labels(label, api))
        children[0].inc()
        children[1].observe(seconds)

    def observer(self, model: str, version: int) -> InferenceObserver:
        """What a loaded model version reports its queue and compute times to."""
        return _VersionObserver(self, model, str(version))

    def watch(self, served: ServedEnsemble) -> None:
        """Observe a version that just loaded, before it takes requests."""
        served.observers.append(self.observer(served.name, served.version))

    def count_load_failure(self, model: str, reason: str) -> None:
        self.load_failures.labels(model, reason).inc()

    def forget(self, model: str, version: int) -> None:
        """Drop an unloaded version's series, so hot reloads do not pile them up."""
        for histogram in (self.queue_seconds, self.compute_seconds, self.batch_size,
                          self.mutual_information, self.vote_disagreement, self.members_evaluated):
            try:
                histogram.remove(model, str(version))
            except KeyError:  # never observed
                pass

    def watch_listener(self, listener: Callable[[], BoundedServer | None]) -> None:
        """Report the REST listener's connections (`listener()`: its BoundedServer, None until
        it listens)."""
        self.registry.register(_ListenerCollector(listener))

    def watch_cpp(self, refused: Callable[[], tuple[int, int, int]]) -> None:
        """Report the C++ front end's refusals (`refused()`: calls with its queue full, calls
        while closing, connections over the cap), which no request observation sees: they
        never reach Python."""
        self.registry.register(_CppCollector(refused))

    async def serve(self, config: MetricsEndpointConfig, port: int) -> int:
        """Serve /metrics on config.host:port from the event loop (server/observability/metrics_endpoint.py:
        no thread per connection, timeouts, a bound on connections); the bound port (for 0)."""
        self._http = MetricsEndpoint(self.registry, config)
        bound = await self._http.start(port)
        worker = worker_index()
        if worker is None:
            logger.info("metrics on http://%s:%d/metrics", config.host, bound)
        else:  # the parent serves the sum and logs its own address (server/process/workers.py)
            logger.info("worker %d: its metrics for the parent on http://%s:%d/metrics", worker,
                        config.host, bound)
        return bound

    async def close(self) -> None:
        if self._http is not None:
            await self._http.stop()
            self._http = None


class _VersionObserver:
    """Feeds one model version's requests and batches into the server's histograms."""

    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        self._queue = metrics.queue_seconds.labels(model, version)
        self._compute = metrics.compute_seconds.labels(model, version)
        self._batch = metrics.batch_size.labels(model, version)
        self._mutual_information = metrics.mutual_information.labels(model, version)
        self._vote_disagreement = metrics.vote_disagreement.labels(model, version)
        self._members_evaluated = metrics.members_evaluated.labels(model, version)

    def record_request(self, examples: int, ok: bool, total_ns: int, queue_ns: int) -> None:
        if ok:
            self._queue.observe(queue_ns / 1e9)

    def record_batch(self, examples: int, compute_ns: int) -> None:
        self._compute.observe(compute_ns / 1e9)
        self._batch.observe(examples)

    def record_scores(self, scores: EnsembleScores) -> None:
        # Every example counts (the mean over examples is what the dashboard plots), observed a
        # batch at a time in numpy.
        self._mutual_information.observe_many(scores.mutual_information)
        self._vote_disagreement.observe_many(scores.vote_disagreement)
        self._members_evaluated.observe_many(scores.members_evaluated)


_FEW = 4  # examples below which BatchHistogram observes them one by one


class BatchHistogram(Collector):
    """A Prometheus histogram labelled by model and version, observed an array at a time: one
    `searchsorted` and `bincount` per batch instead of a Python call per example. Touched on
    the event loop thread (observations and scrapes alike)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._labels = [*(floatToGoString(b) for b in buckets), "+Inf"]  # as Histogram's
        self._children: dict[tuple[str, str], _BatchHistogramChild] = {}
        registry.register(self)

    def labels(self, model: str, version: str) -> _BatchHistogramChild:
        child = self._children.get((model, version))
        if child is None:
            child = self._children[model, version] = _BatchHistogramChild(self._bounds)
        return child

    def remove(self, model: str, version: str) -> None:
        del self._children[model, version]

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=["model", "version"])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model", "version"])
        for (model, version), child in list(self._children.items()):
            cumulative = np.cumsum(child.counts).tolist()
            family.add_metric([model, version], list(zip(self._labels, cumulative)),
                              sum_value=child.total)
        yield family


class _BatchHistogramChild:
    def __init__(self, bounds: np.ndarray) -> None:
        self._bounds = bounds
        self._bound_list = bounds.tolist()
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last: above every bound
        self.total = 0.0

    def observe_many(self, values: np.ndarray) -> None:
        if len(values) <= _FEW:  # a few examples: plain Python is cheaper than five numpy calls
            for value in values.tolist():
                if math.isfinite(value):
                    self.counts[bisect.bisect_left(self._bound_list, value)] += 1
                    self.total += value
            return
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]  # a NaN would poison the sum for good
        if values.size:
            # A value equal to a bound belongs to that bucket (le: less than or equal).
            self.counts += np.bincount(np.searchsorted(self._bounds, values, side="left"),
                                       minlength=len(self.counts))
            self.total += float(values.sum())


def _thread_count() -> float:
    """Every OS thread (ONNX Runtime's and gRPC's too) where /proc has them; else Python's."""
    try:
        return float(len(os.listdir("/proc/self/task")))
    except OSError:
        return float(threading.active_count())


class _ListenerCollector(Collector):
    """The REST listener's connections (server/listeners.py), read at scrape time: the scrape
    runs on the event loop that owns them."""

    def __init__(self, listener: Callable[[], BoundedServer | None]) -> None:
        self._listener = listener

    def collect(self) -> Iterator[Metric]:
        server = self._listener()
        if server is None:  # not started yet
            return
        places = GaugeMetricFamily(
            "snapserve_http_connections", "REST connections open now, by the place they hold "
            "(over_cap: health probes admitted beyond the reserve; lobby: newcomers with no "
            "place, awaiting their request line)", labels=["place"])
        places.add_metric(["full"], server.full)
        places.add_metric(["reserve"], len(server.open) - server.full - server.over)
        places.add_metric(["over_cap"], server.over)
        places.add_metric(["lobby"], len(server.lobby))
        yield places
        closed = CounterMetricFamily(
            "snapserve_http_connections_closed", "REST connections closed for the listener's "
            "bounds (evicted: idle, for room; refused: no place; header_timeout: headers too "
            "slow)", labels=["reason"])
        closed.add_metric(["evicted"], server.evicted)
        closed.add_metric(["refused"], server.refused)
        closed.add_metric(["header_timeout"], server.timed_out)
        yield closed


class _CppCollector(Collector):
    """The C++ front end's refusal counts, read from its library at scrape time."""

    def __init__(self, refused: Callable[[], tuple[int, int, int]]) -> None:
        self._refused = refused

    def collect(self) -> Iterator[Metric]:
        full, closed, connections = self._refused()
        family = CounterMetricFamily(
            "snapserve_cpp_calls_refused", "Calls the C++ gRPC front end refused before Python "
            "saw them (queue_full: RESOURCE_EXHAUSTED, its queue at max_pending_calls; closed: "
            "UNAVAILABLE, the server stopping)", labels=["reason"])
        family.add_metric(["queue_full"], full)
        family.add_metric(["closed"], closed)
        yield family
        yield CounterMetricFamily(
            "snapserve_cpp_connections_refused", "Connections the C++ gRPC front end closed as "
            "they arrived, grpc_max_connections being open (a plaintext port; a TLS one is not "
            "capped)", value=connections)


class _LoadedModelsCollector(Collector):
    """Gauges read from the registry at scrape time (in the HTTP thread): never stale."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        loaded = self._models.loaded()
        depth = GaugeMetricFamily("snapserve_queue_depth", "Requests waiting for a batch",
                                  labels=["model", "version"])
        versions = GaugeMetricFamily(
            "snapserve_model_version_loaded", "1 for every model version loaded",
            labels=["model", "version", "method", "members"])
        for served in loaded:
            version = str(served.version)
            depth.add_metric([served.name, version], served.batcher.queued)
            versions.add_metric([served.name, version, served.manifest.method,
                                 str(served.runtime.members)], 1)
        yield depth
        yield versions
        yield GaugeMetricFamily("snapserve_models_loaded",
                                "Models with at least one version loaded",
                                value=len({served.name for served in loaded}))
