"""Adaptive member evaluation's calibration (snapserve.proto.adaptive, trainer/adaptive.py):
constructed cases with known answers, the test split never read, a real `trainer train`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from snapserve.proto.adaptive import AdaptiveCalibration, calibrate, member_order, members_evaluated
from snapserve.trainer.adaptive import (adaptive_evaluation, adaptive_split_report,
                                       member_count_temperatures)
from tests.support.training import train_cli


def _onehot(classes: list[int], confidence: float, count: int = 3) -> np.ndarray:
    """Rows putting `confidence` on the given class and the rest evenly on the others."""
    p = np.full((len(classes), count), (1 - confidence) / (count - 1))
    p[np.arange(len(classes)), classes] = confidence
    return p


def test_confident_rows_stop_after_one_member_and_doubtful_ones_after_two() -> None:
    """The best member is right and sure (0.95) on rows 0-5; on rows 6-9 it leans wrong (0.5
    against 0.45 on the true class), where the others are right and sure (0.9): with the
    second member the running mean is right there (0.675). Expected: 6 rows x 1 + 4 x 2."""
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    sure, doubt = list(range(6)), list(range(6, 10))
    leaning = np.full((4, 3), 0.05)
    leaning[np.arange(4), [(c + 1) % 3 for c in y[doubt]]] = 0.5
    leaning[np.arange(4), y[doubt]] = 0.45
    best = np.concatenate([_onehot(list(y[sure]), 0.95), leaning])
    other = np.concatenate([_onehot(list(y[sure]), 0.5), _onehot(list(y[doubt]), 0.9)])
    probs = np.stack([other, best, other], axis=1)  # [N, M, C]
    result = calibrate(probs, y, tolerance=0.0)
    assert result.order == (1, 0, 2)
    assert result.thresholds[0] == pytest.approx(0.95)
    taken = members_evaluated(probs[:, list(result.order)], result.thresholds)
    assert taken.tolist() == [1] * 6 + [2] * 4
    assert result.validation["mean_members_evaluated"] == pytest.approx(1.4)
    assert result.validation["accuracy_adaptive"] == result.validation["accuracy_full"] == 1.0


def test_zero_tolerance_never_loses_validation_accuracy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(400, 5, 4)) * 2 + np.eye(4)[rng.integers(0, 4, 400)][:, None] * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    y = rng.integers(0, 4, 400)
    for tolerance in (0.0, 1.0, 5.0):
        result = calibrate(probs, y, tolerance)
        val = result.validation
        assert val["accuracy_adaptive"] >= val["accuracy_full"] - tolerance / 100 - 1e-12
        assert 1 <= val["mean_members_evaluated"] <= 5 and len(result.thresholds) == 4


def test_order_is_by_validation_nll_and_one_member_has_no_thresholds() -> None:
    y = np.array([0, 1])
    good, bad = _onehot([0, 1], 0.9, 2), _onehot([0, 1], 0.6, 2)
    assert member_order(np.stack([bad, good], axis=1), y) == (1, 0)
    single = calibrate(good[:, None], y)
    assert single.thresholds == () and single.validation["mean_members_evaluated"] == 1.0


def test_a_row_the_first_member_loses_at_top_confidence_closes_k1() -> None:
    """Row 0: the first member is surest of all and wrong, the ensemble right: with no
    tolerance nothing may stop after one member (tau_1 = inf, null in the manifest)."""
    y = np.array([0, 0, 0])
    first = np.array([[0.2, 0.8], [0.7, 0.3], [0.7, 0.3]])
    second = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    third = np.array([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    result = calibrate(np.stack([first, second, third], axis=1), y, tolerance=0.0)
    assert result.order[0] == 1 or math.isinf(result.thresholds[0]) or result.thresholds[0] > 0.8
    manifest = AdaptiveCalibration((0, 1), (math.inf,), 0.0, {}).to_manifest()
    assert manifest["thresholds"] == [None]


def test_thresholds_never_read_the_test_split() -> None:
    rng = np.random.default_rng(1)
    val = rng.dirichlet(np.ones(4), size=(200, 3))
    y_val = rng.integers(0, 4, 200)
    one = adaptive_evaluation(val, y_val, rng.dirichlet(np.ones(4), size=(50, 3)),
                              rng.integers(0, 4, 50), 0.5)
    other = adaptive_evaluation(val, y_val, rng.dirichlet(np.ones(4) * 9, size=(80, 3)),
                                rng.integers(0, 4, 80), 0.5)
    assert one["manifest"] == other["manifest"]
    assert one["test"] != other["test"]
    changed = adaptive_evaluation(val[::-1], y_val, val[:50], y_val[:50], 0.5)
    assert changed["manifest"] != one["manifest"]


def test_trainer_train_writes_the_calibration(tmp_path: Path) -> None:
    manifest = train_cli(tmp_path, "--dataset", "digits", "--arch", "cnn", "--width", "8",
                         "--method", "snapshot", "--epochs", "3", "--members", "3", "--no-plots",
                         "--adaptive-tolerance", "0.5")
    adaptive = manifest["adaptive"]
    assert sorted(adaptive["order"]) == list(range(len(manifest["members"])))
    assert len(adaptive["thresholds"]) == len(manifest["members"]) - 1
    assert adaptive["tolerance"] == 0.5
    val = adaptive["validation"]
    assert val["accuracy_adaptive"] >= val["accuracy_full"] - 0.005 - 1e-12


def test_each_member_count_gets_the_temperature_its_rows_call_for() -> None:
    """80 rows stop after one member at 0.99 on a class, right on 72 of them: the temperature
    that makes 0.99 read 0.9 is log(99) / log(9) = 2.09. No row stops at two members (tau_2
    unreachable): too few rows to fit, the version's serves; all M: the version's always."""
    y = np.array([0] * 72 + [1] * 8 + [0] * 20)
    confident = _onehot([0] * 80, 0.99, 2)  # wrong on the 8 rows labelled 1
    first = np.concatenate([confident, _onehot([0] * 20, 0.6, 2)])
    probs = np.stack([first, _onehot(list(y), 0.8, 2), _onehot(list(y), 0.8, 2)], axis=1)
    calibration = AdaptiveCalibration((0, 1, 2), (0.9, math.inf), 0.0, {})
    temperatures = member_count_temperatures(probs, y, calibration)
    assert len(temperatures) == 2 and temperatures[1] is None
    assert temperatures[0] == pytest.approx(math.log(99) / math.log(9), rel=1e-3)
    report = adaptive_split_report(probs, y, calibration.order, calibration.thresholds, 1.0,
                                   temperatures)
    assert report["nll_adaptive_served"] < report["nll_adaptive_one_temperature"]
    assert report["nll_full_served"] == pytest.approx(report["nll_full"])  # T = 1
    evaluation = adaptive_evaluation(probs, y, probs, y, 0.1)
    assert len(evaluation["manifest"]["temperatures"]) == 2
    assert "temperatures" not in adaptive_evaluation(probs, y, probs, y, 0.1,
                                                     fit_temperatures=False)["manifest"]
