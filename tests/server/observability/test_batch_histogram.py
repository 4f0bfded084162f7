"""The score histograms observed a batch at a time expose what prometheus_client's would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from snapserve.server.observability.metrics import MUTUAL_INFORMATION_BUCKETS, VOTE_DISAGREEMENT_BUCKETS, BatchHistogram


def _samples(registry: CollectorRegistry) -> list[str]:
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if line and not line.startswith("#") and "_created" not in line)


def test_batch_observations_expose_the_same_series_as_one_by_one() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.exponential(0.05, size=n).astype(np.float32) for n in (1, 7, 32)]
    batches.append(np.array(VOTE_DISAGREEMENT_BUCKETS, np.float32))  # exactly on the bounds
    for buckets in (MUTUAL_INFORMATION_BUCKETS, VOTE_DISAGREEMENT_BUCKETS):
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        batch = BatchHistogram("scores", "scores", buckets, registry=ours)
        plain = Histogram("scores", "scores", ["model", "version"], buckets=buckets,
                          registry=theirs)
        for values in batches:
            batch.labels("digits", "1").observe_many(values)
            for value in values.tolist():
                plain.labels("digits", "1").observe(value)
        assert _samples(ours) == _samples(theirs)


def test_non_finite_scores_are_left_out_and_removed_versions_go() -> None:
    registry = CollectorRegistry()
    batch = BatchHistogram("mi", "mi", MUTUAL_INFORMATION_BUCKETS, registry=registry)
    batch.labels("digits", "1").observe_many(np.array([0.002, np.nan, np.inf, 0.3]))
    text = generate_latest(registry).decode()
    assert 'mi_count{model="digits",version="1"} 2.0' in text
    assert 'mi_sum{model="digits",version="1"} 0.302' in text
    batch.remove("digits", "1")
    assert 'model="digits"' not in generate_latest(registry).decode()
