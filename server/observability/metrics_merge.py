"""One /metrics for `--workers N`: the parent scrapes every worker's and serves their merge.

Each worker serves its own registry on a loopback port (0: a free one) and tells the parent which
(server/process/workers.py). On every scrape of the parent, `WorkerMetrics.collect` fetches each live
worker's exposition (concurrently, `timeout_s` each), parses it and merges it per family and
label set: counters, histograms (buckets, _sum, _count) and summaries are summed; gauges by
GAUGE_RULES (sum unless listed: queue depth, threads and memory add up; a version loaded in
every worker is still 1). `_created` takes the earliest worker's. To these the parent adds its
own `snapserve_workers` and `snapserve_worker_scrape_errors_total{worker}`.

Why not prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR): every observation
writes an mmap-backed file, dearer on the hot path; custom collectors (our loaded-models gauges,
ProcessCollector) are not aggregated at all; and a worker that dies leaves its files behind.
Here a worker keeps its plain in-memory registry and the merge costs one fetch per scrape.
"""

from __future__ import annotations

import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["GAUGE_RULES", "WORKER_SCRAPE_TIMEOUT_S", "WorkerMetrics", "merge_families",
           "parse_exposition"]

logger = logging.getLogger(__name__)

Rule = Callable[[Iterable[float]], float]
SampleKey = tuple[str, frozenset[tuple[str, str]]]  # sample name, label set

# How gauges other than a plain sum combine over workers. Every worker loads the same
# repository, so "is loaded" and "how many models" are the same number in each, not N times it.
GAUGE_RULES: dict[str, Rule] = {
    "snapserve_models_loaded": max,
    "snapserve_model_version_loaded": max,
    "python_info": max,
    "process_max_fds": max,  # a limit per process, not a total
    "process_start_time_seconds": min,  # the server has run since its first worker started
}
SUMMED_TYPES = ("counter", "histogram", "summary")
# Below the endpoint's own 5 s (metrics_timeout_s), so a stuck worker costs its series, not the
# whole scrape: workers are fetched at once, so a scrape takes at most this long.
WORKER_SCRAPE_TIMEOUT_S = 2.0
CREATED = "_created"


def parse_exposition(text: str) -> list[Metric]:
    """Prometheus text (0.0.4) as metric families, each counter's, histogram's and summary's
    `_created` back in its own family: the text format writes it as a gauge family of its own,
    a name OpenMetrics keeps for the counter's own `_created` samples."""
    families = list(text_string_to_metric_families(text))
    by_name = {family.name: family for family in families}
    kept = []
    for family in families:
        owner = by_name.get(family.name[:-len(CREATED)]) if family.name.endswith(CREATED) else None
        if family.type == "gauge" and owner is not None and owner.type in SUMMED_TYPES:
            owner.samples.extend(family.samples)
        else:
            kept.append(family)
    return kept


def _rule(family: Metric, sample_name: str) -> Rule:
    if family.type in SUMMED_TYPES:
        return min if sample_name == family.name + CREATED else sum
    if family.type == "gauge":
        return GAUGE_RULES.get(family.name, sum)
    return sum  # unknown, info: none of ours


def merge_families(scrapes: Iterable[Sequence[Metric]]) -> list[Metric]:
    """Several workers' families as one set: each (sample name, label set) combined by its
    family's rule over the workers that have it. A label set only one worker has (a model only
    it was asked for) keeps that worker's value. Families and samples stay in the order first
    seen, so a histogram's buckets stay in order."""
    merged: dict[str, Metric] = {}
    # family -> sample -> (its labels as first seen, its value in each worker that has it)
    values: dict[str, dict[SampleKey, tuple[dict[str, str], list[float]]]] = {}
    for families in scrapes:
        for family in families:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type,
                                             family.unit)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                samples.setdefault(key, (sample.labels, []))[1].append(sample.value)
    for name, family in merged.items():
        for (sample_name, _), (labels, seen) in values[name].items():
            family.add_sample(sample_name, labels, float(_rule(family, sample_name)(seen)))
        family.samples = _grouped(family.samples)
    return list(merged.values())


def _grouped(samples: list[Sample]) -> list[Sample]:
    """Each series' samples together (a histogram's buckets, _count, _sum, _created), series in
    the order first seen: OpenMetrics wants a series' samples in one run, and `_created` was
    parsed apart from the rest."""
    series: dict[frozenset[tuple[str, str]], list[Sample]] = {}
    for sample in samples:
        key = frozenset((k, v) for k, v in sample.labels.items() if k not in ("le", "quantile"))
        series.setdefault(key, []).append(sample)
    return [sample for run in series.values() for sample in run]


class WorkerMetrics(Collector):
    """The workers' metrics, fetched and merged at each collect(), and the parent's own two.

    `ports()` gives index -> metrics port of the workers alive now. A worker that does not answer
    within `timeout_s` (or answers garbage) is left out of that scrape and counted in
    `snapserve_worker_scrape_errors_total{worker}`: its counters are then missing from the sums,
    so they dip for that scrape (and rate() reads the dip back as a reset).
    """

    def __init__(self, ports: Callable[[], Mapping[int, int]], count: int,
                 timeout_s: float = WORKER_SCRAPE_TIMEOUT_S) -> None:
        self._ports = ports
        self.count = count
        self.timeout_s = timeout_s
        self.scrape_errors = [0] * count  # per worker index
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="worker-metrics")
        # Loopback only: an http_proxy in the environment must not see these requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _fetch(self, index: int, port: int) -> list[Metric] | None:
        try:
            with self._opener.open(f"http://127.0.0.1:{port}/metrics",
                                   timeout=self.timeout_s) as answer:
                return parse_exposition(answer.read().decode("utf-8"))
        except (OSError, HTTPException, ValueError) as exc:  # refused, timed out, unparsable
            logger.warning("worker %d's metrics (port %d) left out of this scrape: %s", index, port,
                           exc)
            return None

    def collect(self) -> Iterator[Metric]:
        ports = dict(self._ports())
        scrapes = list(self._pool.map(self._fetch, ports, ports.values()))
        for index, families in zip(ports, scrapes):
            if families is None:
                self.scrape_errors[index] += 1
        yield from merge_families(families for families in scrapes if families is not None)
        yield GaugeMetricFamily("snapserve_workers", "Server processes configured (--workers)",
                                value=self.count)
        errors = CounterMetricFamily("snapserve_worker_scrape_errors",
                                     "Scrapes a worker did not answer; its series were left out",
                                     labels=["worker"])
        for index, count in enumerate(self.scrape_errors):
            errors.add_metric([str(index)], count)
        yield errors

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
