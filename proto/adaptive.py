"""Adaptive member evaluation (Inoue, AISTATS 2019): the stopping rule and its calibration.

Members are evaluated one at a time in a calibrated `order`; after k of them a row stops when the
confidence of the running mean, max_c (1/k) sum_{j<=k} p_j[c] (before any temperature), is at
least the threshold tau_k (k = 1..M-1); a row that never stops gets all M members. The same rule
runs here (the trainer's calibration and its validation numbers) and in the server
(server/engine/adaptive.py), so what was calibrated is what is served. Numpy only.

`member_probs` is [N, M, C] in the manifest's member order, as in `snapserve.proto.scores`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_TOLERANCE", "AdaptiveCalibration", "calibrate", "confidence", "member_order",
           "members_evaluated", "running_means"]

DEFAULT_TOLERANCE = 0.1  # accuracy points the adaptive answers may lose against the full ensemble


@dataclass(frozen=True)
class AdaptiveCalibration:
    """What the manifest's `adaptive` object holds (docs/model-repository.md)."""

    order: tuple[int, ...]  # member indices (manifest order), best validation NLL first
    thresholds: tuple[float, ...]  # tau_1 .. tau_{M-1}; inf: no row stops after that many
    tolerance: float  # accuracy points
    validation: dict[str, float]  # examples, accuracy_full, accuracy_adaptive, mean_members_evaluated

    def to_manifest(self) -> dict[str, Any]:
        return {"order": list(self.order),
                # JSON has no infinity: null is "never stop here".
                "thresholds": [None if math.isinf(t) else float(t) for t in self.thresholds],
                "tolerance": self.tolerance,
                "confidence": "max over classes of the running mean of the members' "
                              "probabilities, before temperature",
                "validation": dict(self.validation)}


def confidence(mean_probs: np.ndarray) -> np.ndarray:
    """[N, C] -> [N]: the top probability of a (running) mean: what is compared with tau_k."""
    return np.max(mean_probs, axis=-1)


def running_means(ordered_probs: np.ndarray) -> np.ndarray:
    """[N, M, C] in evaluation order -> [N, M, C] float64: entry k-1 is the mean of the first k."""
    p = np.asarray(ordered_probs, dtype=np.float64)
    return np.cumsum(p, axis=1) / np.arange(1, p.shape[1] + 1)[None, :, None]


def member_order(member_probs: np.ndarray, labels: np.ndarray) -> tuple[int, ...]:
    """Members by validation NLL, best first (ties keep the manifest order)."""
    p = np.asarray(member_probs, dtype=np.float64)
    picked = p[np.arange(len(labels)), :, labels]  # [N, M]: each member's p(true class)
    nll = -np.log(np.clip(picked, 1e-12, None)).mean(axis=0)
    return tuple(int(i) for i in np.argsort(nll, kind="stable"))


def members_evaluated(ordered_probs: np.ndarray, thresholds: tuple[float, ...]) -> np.ndarray:
    """[N, M, C] in evaluation order -> [N] int: how many members each row evaluates."""
    members = ordered_probs.shape[1]
    if len(thresholds) != members - 1:
        raise ValueError(f"{members} members need {members - 1} thresholds, got {len(thresholds)}")
    conf = confidence(running_means(ordered_probs))  # [N, M]
    stopped = conf[:, :-1] >= np.asarray(thresholds, dtype=np.float64)[None, :]
    stopped = np.concatenate([stopped, np.ones((len(conf), 1), dtype=bool)], axis=1)
    return np.argmax(stopped, axis=1) + 1  # the first k whose test passes (M always does)


def _threshold(conf: np.ndarray, loss: np.ndarray, budget: int) -> tuple[float, np.ndarray, int]:
    """tau for one k over the rows still running: the smallest confidence such that stopping
    every row at or above it, and at or above any higher candidate, loses at most `budget`
    correct answers. Rows of equal confidence stop together. (tau, rows stopped, loss used)."""
    if not len(conf):  # every row stopped earlier: nothing to calibrate on
        return math.inf, np.arange(0), 0
    ranked = np.argsort(-conf, kind="stable")
    c, cumulative = conf[ranked], np.cumsum(loss[ranked])
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # last row of each confidence level
    within = cumulative[ends] <= budget
    levels = len(ends) if within.all() else int(np.argmin(within))
    if levels == 0:
        return math.inf, ranked[:0], 0
    last = int(ends[levels - 1])
    return float(c[last]), ranked[:last + 1], int(cumulative[last])


def calibrate(member_probs: np.ndarray, labels: np.ndarray,
              tolerance: float = DEFAULT_TOLERANCE) -> AdaptiveCalibration:
    """The order and thresholds from validation data: [N, M, C] probabilities, [N] labels.

    With budget B = floor(tolerance / 100 * N) answers, for k = 1..M-1 in turn over the rows
    that have not stopped: a row's loss is 1 when the full ensemble answers it correctly and the
    first k members do not, -1 the other way round, 0 otherwise; tau_k is the smallest threshold
    whose stopped rows (and those of every higher candidate) add at most what is left of B.
    So the adaptive validation accuracy is at most `tolerance` points below the full one.
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    labels = np.asarray(labels)
    n, members = probs.shape[0], probs.shape[1]
    if n == 0 or len(labels) != n:
        raise ValueError(f"calibration needs validation rows with one label each; got {n} rows "
                         f"and {len(labels)} labels")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 accuracy points, got {tolerance!r}")
    order = member_order(probs, labels)
    means = running_means(probs[:, list(order)])
    conf, correct = confidence(means), np.argmax(means, axis=-1) == labels[:, None]  # [N, M]
    full = correct[:, -1].astype(np.int64)
    budget = math.floor(tolerance / 100 * n + 1e-9)
    running, thresholds = np.arange(n), []
    for k in range(members - 1):
        tau, stopped, used = _threshold(conf[running, k], full[running] - correct[running, k], budget)
        thresholds.append(tau)
        budget -= used
        running = np.delete(running, stopped)
    taken = members_evaluated(probs[:, list(order)], tuple(thresholds))
    adaptive_correct = correct[np.arange(n), taken - 1]
    validation = {"examples": float(n), "accuracy_full": float(full.mean()),
                  "accuracy_adaptive": float(adaptive_correct.mean()),
                  "mean_members_evaluated": float(taken.mean())}
    return AdaptiveCalibration(order, tuple(thresholds), float(tolerance), validation)
