"""Adaptive member evaluation at export: calibrate on the validation split, report the test split.

The math (order, thresholds, the stopping rule) is `snapserve.proto.adaptive`, shared with the
server. Calibration reads the validation split only; the test split is evaluated with the
thresholds afterwards, so its numbers say how the calibration generalises.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from snapserve.proto.adaptive import calibrate, members_evaluated, running_means
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.metrics import auroc

__all__ = ["adaptive_evaluation", "adaptive_markdown", "adaptive_split_report"]


def adaptive_split_report(member_probs: np.ndarray, labels: np.ndarray, order: tuple[int, ...],
                          thresholds: tuple[float, ...]) -> dict[str, float | None]:
    """Full against adaptive on one split: accuracy, NLL, the entropy's error-flagging AUROC,
    mean members evaluated (before temperature, as the thresholds are)."""
    means = running_means(np.asarray(member_probs, dtype=np.float64)[:, list(order)])  # [N, M, C]
    taken = members_evaluated(member_probs[:, list(order)], thresholds)
    rows = np.arange(len(labels))
    report: dict[str, float | None] = {"examples": float(len(labels)),
                                "mean_members_evaluated": float(taken.mean())}
    for kind, mean in (("full", means[:, -1]), ("adaptive", means[rows, taken - 1])):
        correct = np.argmax(mean, axis=-1) == labels
        entropy = -np.sum(mean * np.log(np.clip(mean, 1e-12, None)), axis=-1)
        report[f"accuracy_{kind}"] = float(correct.mean())
        report[f"nll_{kind}"] = float(-np.log(np.clip(mean[rows, labels], 1e-12, None)).mean())
        report[f"entropy_error_auroc_{kind}"] = auroc(entropy, ~correct)
    return report


def adaptive_evaluation(val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                        test_labels: np.ndarray, tolerance: float) -> dict[str, Any]:
    """The manifest's `adaptive` object (from the validation split alone) and the test split's
    numbers under it. Probabilities are [N, M, C] of the exported members, in manifest order."""
    if not tolerance >= 0:
        raise ConfigError(f"adaptive_tolerance must be >= 0 accuracy points, got {tolerance!r}")
    calibration = calibrate(val_probs, val_labels, tolerance)
    return {"manifest": calibration.to_manifest(),
            "test": adaptive_split_report(test_probs, test_labels, calibration.order,
                                          calibration.thresholds)}


def adaptive_markdown(adaptive: dict[str, Any]) -> list[str]:
    """report.md's paragraph: the calibration and what it does on validation and test."""
    val, test = adaptive["validation"], adaptive["test"]
    taus = ", ".join("never" if t is None else f"{t:.4f}" for t in adaptive["thresholds"])
    return ["", f"Adaptive member evaluation (served with `adaptive_members: true`): members in the "
            f"order {adaptive['order']} (best validation NLL first), thresholds on the running mean's "
            f"top probability after 1..M-1 members: {taus}; tolerance {adaptive['tolerance']} points. "
            f"Validation: accuracy {val['accuracy_adaptive']:.4f} adaptive vs {val['accuracy_full']:.4f} "
            f"full, {val['mean_members_evaluated']:.2f} members per example. Test: accuracy "
            f"{test['accuracy_adaptive']:.4f} vs {test['accuracy_full']:.4f}, NLL {test['nll_adaptive']:.4f} "
            f"vs {test['nll_full']:.4f}, {test['mean_members_evaluated']:.2f} members per example "
            "(before temperature)."]
