"""Adaptive member evaluation at export: calibrate on the validation split, report the test split.

The math (order, thresholds, the stopping rule) is `snapserve.proto.adaptive`, shared with the
server. Calibration reads the validation split only; the test split is evaluated with the
thresholds afterwards, so its numbers say how the calibration generalises.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from snapserve.proto.adaptive import (AdaptiveCalibration, calibrate, members_evaluated,
                                     running_means)
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.metrics import auroc, fit_temperature, nll, temperature_scaled

__all__ = ["MIN_TEMPERATURE_ROWS", "adaptive_evaluation", "adaptive_markdown",
           "adaptive_split_report", "member_count_temperatures"]

# A temperature fitted on fewer validation rows follows their noise: the version's own is kept.
MIN_TEMPERATURE_ROWS = 30


def _scaled_by_count(means: np.ndarray, taken: np.ndarray, temperatures: Sequence[float]
                     ) -> np.ndarray:
    """Each row's answer ([N, C]: the running mean of the members it took) under the
    temperature of its member count (`temperatures[k - 1]`)."""
    out = np.empty_like(means[:, 0])
    for k in np.unique(taken).tolist():
        rows = np.flatnonzero(taken == k)
        out[rows] = temperature_scaled(means[rows, k - 1], temperatures[k - 1])
    return out


def member_count_temperatures(member_probs: np.ndarray, labels: np.ndarray,
                              calibration: AdaptiveCalibration) -> tuple[float | None, ...]:
    """T_k for k = 1..M-1: fitted on the validation rows the calibration answers with k members
    (their running mean), as the version's temperature is on the full ensemble's answers; None
    where fewer than MIN_TEMPERATURE_ROWS rows stop at k (the version's temperature serves).
    One member's answer is sharper than the mean of several, and the rows that stop early are
    the confident ones: a temperature of their own keeps their NLL near the full ensemble's.
    An answer from all M members is the full ensemble's, under the version's temperature."""
    ordered = np.asarray(member_probs, dtype=np.float64)[:, list(calibration.order)]
    means, taken = running_means(ordered), members_evaluated(ordered, calibration.thresholds)
    temperatures: list[float | None] = []
    for k in range(1, ordered.shape[1]):
        rows = np.flatnonzero(taken == k)
        temperatures.append(fit_temperature(means[rows, k - 1], labels[rows])
                            if len(rows) >= MIN_TEMPERATURE_ROWS else None)
    return tuple(temperatures)


def adaptive_split_report(member_probs: np.ndarray, labels: np.ndarray, order: tuple[int, ...],
                          thresholds: tuple[float, ...], temperature: float = 1.0,
                          temperatures: Sequence[float | None] | None = None
                          ) -> dict[str, float | None]:
    """Full against adaptive on one split: accuracy, NLL, the entropy's error-flagging AUROC,
    mean members evaluated (before temperature, as the thresholds are); and the NLL as served:
    the full ensemble under `temperature`, the adaptive answers under their member count's
    (`temperatures`, None for the version's) and, to compare, under `temperature` alone."""
    means = running_means(np.asarray(member_probs, dtype=np.float64)[:, list(order)])  # [N, M, C]
    taken = members_evaluated(member_probs[:, list(order)], thresholds)
    rows = np.arange(len(labels))
    report: dict[str, float | None] = {"examples": float(len(labels)),
                                "mean_members_evaluated": float(taken.mean())}
    for kind, mean in (("full", means[:, -1]), ("adaptive", means[rows, taken - 1])):
        correct = np.argmax(mean, axis=-1) == labels
        entropy = -np.sum(mean * np.log(np.clip(mean, 1e-12, None)), axis=-1)
        report[f"accuracy_{kind}"] = float(correct.mean())
        report[f"nll_{kind}"] = nll(mean, labels)
        report[f"entropy_error_auroc_{kind}"] = auroc(entropy, ~correct)
    members = means.shape[1]
    fitted = list(temperatures or [])
    per_count = [temperature if t is None else t for t in fitted + [None] * (members - len(fitted))]
    report["nll_full_served"] = nll(temperature_scaled(means[:, -1], temperature), labels)
    report["nll_adaptive_served"] = nll(_scaled_by_count(means, taken, per_count), labels)
    report["nll_adaptive_one_temperature"] = nll(
        _scaled_by_count(means, taken, [temperature] * members), labels)
    return report


def adaptive_evaluation(val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                        test_labels: np.ndarray, tolerance: float,
                        temperature: float = 1.0, fit_temperatures: bool = True
                        ) -> dict[str, Any]:
    """The manifest's `adaptive` object (from the validation split alone) and the test split's
    numbers under it. Probabilities are [N, M, C] of the exported members, in manifest order;
    `temperature` is the version's. `fit_temperatures`: a temperature per member count, as the
    version's is fitted (off, with the trainer's calibration, every answer has the version's)."""
    if not tolerance >= 0:
        raise ConfigError(f"adaptive_tolerance must be >= 0 accuracy points, got {tolerance!r}")
    calibration = calibrate(val_probs, val_labels, tolerance)
    temperatures = (member_count_temperatures(val_probs, np.asarray(val_labels), calibration)
                    if fit_temperatures else None)
    manifest = calibration.to_manifest()
    if temperatures is not None:
        manifest["temperatures"] = list(temperatures)
    return {"manifest": manifest,
            "test": adaptive_split_report(test_probs, test_labels, calibration.order,
                                          calibration.thresholds, temperature, temperatures)}


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
            "(before temperature)."] + _served_nll_markdown(adaptive)


def _served_nll_markdown(adaptive: dict[str, Any]) -> list[str]:
    """The NLL as served: each member count's temperature (where one was fitted)."""
    test, temperatures = adaptive["test"], adaptive.get("temperatures")
    if temperatures is None or "nll_adaptive_served" not in test:
        return []
    fitted = ", ".join(f"k={k}: {t:.3f}" for k, t in enumerate(temperatures, 1) if t is not None)
    return [f"As served, with a temperature per member count ({fitted or 'none fitted'}; the "
            f"version's elsewhere): test NLL {test['nll_adaptive_served']:.4f} adaptive "
            f"({test['nll_adaptive_one_temperature']:.4f} under the version's temperature alone) "
            f"vs {test['nll_full_served']:.4f} full."]
