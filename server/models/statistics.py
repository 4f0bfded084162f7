"""Per model version inference statistics, as KServe's ModelStatistics (Triton's) reports them.

`ModelStatistics` is one of the observers a ServedEnsemble tells about every request and batch
(the Prometheus metrics are the other). It is cumulative, never reset, and lives as long as its
model version. Updated only on the event loop thread, so it needs no lock.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from snapserve.proto.scores import EnsembleScores

__all__ = ["Duration", "InferenceObserver", "ModelStatistics"]


class InferenceObserver(Protocol):
    """What a ServedEnsemble reports; called on the event loop thread."""

    def record_request(self, examples: int, ok: bool, total_ns: int, queue_ns: int) -> None:
        """A request finished: `total_ns` from predict() to its answer, `queue_ns` of it waiting
        for its batch to start (0 when it failed before reaching the queue)."""

    def record_batch(self, examples: int, compute_ns: int) -> None:
        """A batch of `examples` was computed (all members and the scores) in `compute_ns`."""

    def record_scores(self, scores: EnsembleScores) -> None:
        """Scores of answered examples, a batch at a time: the whole batch's when every request
        in it was answered, else each answered request's rows."""


@dataclass
class Duration:
    """How many times something happened and their total duration."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStatistics:
    success: Duration = field(default_factory=Duration)  # requests answered, end to end
    fail: Duration = field(default_factory=Duration)     # requests failed, end to end
    queue: Duration = field(default_factory=Duration)    # time successful requests waited
    compute: Duration = field(default_factory=Duration)  # batches computed (count = executions)
    examples: int = 0  # examples inferred (Triton's inference_count)
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))
    last_inference_ms: int = 0  # wall-clock milliseconds since the epoch; 0 before the first

    def record_request(self, examples: int, ok: bool, total_ns: int, queue_ns: int) -> None:
        if ok:
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.examples += examples
            self.last_inference_ms = time.time_ns() // 1_000_000
        else:
            self.fail.add(total_ns)

    def record_batch(self, examples: int, compute_ns: int) -> None:
        self.compute.add(compute_ns)
        self.batches[examples].add(compute_ns)

    def record_scores(self, scores: EnsembleScores) -> None:
        pass  # KServe's statistics count and time; the scores go to the Prometheus metrics
