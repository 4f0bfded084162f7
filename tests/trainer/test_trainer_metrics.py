"""Metrics against values worked out by hand (ALGORITHMS.md section 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from snapserve.proto.scores import entropy, mean_probabilities, mutual_information, softmax
from snapserve.trainer.metrics import (accuracy, auroc, brier, classification_metrics, ece, fit_temperature, nll,
                                       pairwise_disagreement, rejection_curve, reliability_bins,
                                       temperature_scaled)

PROBS = np.array([[0.7, 0.2, 0.1],   # right, confidence 0.7
                  [0.1, 0.6, 0.3],   # wrong (label 2), confidence 0.6
                  [0.05, 0.05, 0.9],  # right, confidence 0.9
                  [0.5, 0.4, 0.1]])  # wrong (label 1), confidence 0.5
LABELS = np.array([0, 2, 2, 1])


def test_accuracy_nll_brier_by_hand() -> None:
    assert accuracy(PROBS, LABELS) == 0.5
    assert nll(PROBS, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.9) + math.log(0.4)) / 4)
    per_example = [0.3**2 + 0.2**2 + 0.1**2, 0.1**2 + 0.6**2 + 0.7**2,
                   0.05**2 + 0.05**2 + 0.1**2, 0.5**2 + 0.6**2 + 0.1**2]
    assert brier(PROBS, LABELS) == pytest.approx(np.mean(per_example))


def test_ece_uses_15_equal_width_bins() -> None:
    # Bins of width 1/15: 0.5 -> (7/15, 8/15], 0.6 -> (8/15, 9/15], 0.7 -> (10/15, 11/15],
    # 0.9 -> (13/15, 14/15]: one example per bin, so ECE = mean |correct - confidence|.
    expected = (abs(1 - 0.7) + abs(0 - 0.6) + abs(1 - 0.9) + abs(0 - 0.5)) / 4
    assert ece(PROBS, LABELS) == pytest.approx(expected)
    # One bin holding everything: |accuracy - mean confidence|.
    assert ece(PROBS, LABELS, bins=1) == pytest.approx(abs(0.5 - (0.7 + 0.6 + 0.9 + 0.5) / 4))


def test_perfect_confident_predictions_score_zero() -> None:
    probs = np.eye(3)
    labels = np.array([0, 1, 2])
    assert classification_metrics(probs, labels) == pytest.approx(
        {"accuracy": 1.0, "nll": 0.0, "brier": 0.0, "ece": 0.0})


def test_nll_of_a_zero_probability_is_large_but_finite() -> None:
    assert math.isfinite(nll(np.array([[1.0, 0.0]]), np.array([1])))


def test_ensemble_averages_probabilities_not_logits() -> None:
    logits = np.array([[[10.0, 0.0], [0.0, 1.0]]])  # one example, two members: [B, M, C]
    probs = softmax(logits)
    mean = mean_probabilities(probs)
    assert mean == pytest.approx((probs[:, 0] + probs[:, 1]) / 2)
    assert not np.allclose(mean, softmax(logits.mean(axis=1)))
    assert softmax(np.array([1000.0, 0.0])) == pytest.approx([1.0, 0.0])


def test_diversity_scores_by_hand() -> None:
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    b = np.array([[0.1, 0.9], [0.3, 0.7], [0.7, 0.3]])  # disagrees with a on the first example only
    members = np.stack([a, b, a], axis=1)  # [N, M, C]
    d = pairwise_disagreement(members)
    np.testing.assert_allclose(d, [[0, 1 / 3, 0], [1 / 3, 0, 1 / 3], [0, 1 / 3, 0]])
    mi = mutual_information(members)
    mean = (2 * a + b) / 3
    expected = entropy(mean) - (2 * entropy(a) + entropy(b)) / 3
    assert mi == pytest.approx(expected) and np.all(mi >= 0)
    assert entropy(np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert mutual_information(np.stack([a, a], axis=1)) == pytest.approx(np.zeros(3), abs=1e-12)


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20000, 5))
    true_t = 2.5
    p_true = softmax(logits / true_t)
    labels = np.array([rng.choice(5, p=p) for p in p_true])
    overconfident = softmax(logits)  # the model's probabilities: too sharp by a factor 2.5
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    assert nll(temperature_scaled(overconfident, t), labels) < nll(overconfident, labels)
    np.testing.assert_allclose(temperature_scaled(overconfident, t), softmax(logits / t), atol=1e-9)
    assert temperature_scaled(overconfident, 1.0) is overconfident


def test_reliability_bins_are_the_bins_of_ece() -> None:
    bins = reliability_bins(PROBS, LABELS)
    assert len(bins["edges"]) == 16 and sum(bins["count"]) == 4
    gaps = sum(c / 4 * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"]))
    assert gaps == pytest.approx(ece(PROBS, LABELS))


def test_auroc_by_hand_with_ties() -> None:
    # positives 3, 2, 2 against negatives 2, 1: pairs (3>2, 3>1, 2=2 half, 2>1, 2=2 half, 2>1) = 5 of 6
    assert auroc(np.array([3, 2, 2, 2, 1]), np.array([1, 1, 1, 0, 0], bool)) == pytest.approx(5 / 6)
    assert auroc(np.zeros(4), np.array([1, 0, 1, 0], bool)) == 0.5  # a constant score: chance
    assert auroc(np.arange(4.0), np.array([0, 0, 1, 1], bool)) == 1.0
    assert auroc(np.arange(3.0), np.zeros(3, bool)) is None


def test_rejection_curve_refuses_above_the_threshold() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.3, 0.0, 0.05, 0.15, 0.25])
    correct = np.array([0, 0, 1, 1, 1, 0, 1, 1, 1, 1], bool)
    curve = rejection_curve(scores, correct, fractions=(0.0, 0.2, 0.3))
    assert curve["threshold"] == [0.9, 0.3, 0.3]  # 30%: the third-highest ties with the fourth
    assert curve["refused"] == pytest.approx([0.0, 0.2, 0.2])
    assert curve["accuracy"] == pytest.approx([0.7, 7 / 8, 7 / 8])
