"""Classification metrics on probabilities (ALGORITHMS.md section 5). Pure numpy, no I/O.

`probs` is [N, C] (rows sum to 1), `labels` is [N] class indices. Members' probabilities are
[N, M, C], the [batch, members, classes] order of `snapserve.proto.scores`, which holds the
ensemble math the server serves (softmax, mean_probabilities, entropy, mutual_information):
the trainer takes it from there. An ensemble's probabilities are the mean of its members'
probabilities, never of their logits or weights.
"""

from __future__ import annotations

import numpy as np

from snapserve.proto.scores import member_top_class, softmax

__all__ = [
    "ECE_BINS",
    "REJECT_FRACTIONS",
    "accuracy",
    "auroc",
    "brier",
    "classification_metrics",
    "ece",
    "fit_temperature",
    "log_probabilities",
    "nll",
    "pairwise_disagreement",
    "rejection_curve",
    "reliability_bins",
    "temperature_scaled",
]

# Fractions of the most uncertain examples refused in the accuracy-vs-rejection curve.
REJECT_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)

ECE_BINS = 15  # the convention since Guo et al. 2017

# log(0) guard: a confidently wrong member gives a large but finite NLL.
_TINY = np.finfo(np.float64).tiny


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """-(1/N) sum log p(y_n | x_n), natural log."""
    picked = probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.mean(np.log(np.maximum(picked, _TINY))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """(1/N) sum_n sum_c (p_nc - 1[y_n = c])^2 (the multi-class sum, range [0, 2])."""
    onehot = np.zeros_like(probs, dtype=np.float64)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def _binned(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct, bin index) per example: equal-width bins (lo, hi] on [0, 1],
    confidence = the top probability."""
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    return confidence, correct, index


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum_b |B_b|/N * |acc(B_b) - conf(B_b)| (see `_binned`)."""
    confidence, correct, index = _binned(probs, labels, bins)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics every report and manifest carries."""
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
            "brier": brier(probs, labels), "ece": ece(probs, labels)}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """The reliability diagram's data, in ece()'s bins: per bin the example count, mean
    confidence and accuracy (0 where a bin is empty)."""
    confidence, correct, index = _binned(probs, labels, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, np.bincount(index, confidence, bins) / count, 0.0)
        acc = np.where(count > 0, np.bincount(index, correct, bins) / count, 0.0)
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": count.tolist(),
            "confidence": conf.tolist(), "accuracy": acc.tolist()}


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """log p, with p = 0 clamped to the smallest float (a large, finite negative number)."""
    return np.log(np.maximum(probs.astype(np.float64), _TINY))


def temperature_scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): what the server serves for an ensemble mean p and the manifest's T."""
    if temperature == 1.0:
        return probs
    return softmax(log_probabilities(probs) / temperature)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0,
                    iterations: int = 100) -> float:
    """The T in [low, high] minimizing the NLL of softmax(log p / T) (Guo et al. 2017).

    For an ensemble, `probs` is the members' mean: pool, then calibrate (Rahaman & Thiery
    2020). The NLL is convex in 1/T, hence unimodal in log T: a golden-section search on log T
    finds the minimum without gradients or scipy.
    """
    log_p = log_probabilities(probs)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, labels]))

    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2))


def pairwise_disagreement(member_probs: np.ndarray) -> np.ndarray:
    """[N, M, C] -> [M, M]: the fraction of examples on which members i and j predict different
    classes (Fort et al. 2019). A measure of diversity: identical members give all zeros."""
    top = member_top_class(member_probs)  # [N, M]
    return (top[:, :, None] != top[:, None, :]).mean(axis=0)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for telling `positive` examples from the rest: the
    probability that a random positive scores higher than a random negative, ties counting
    half (the Mann-Whitney U with average ranks). 0.5 is chance; None without both classes.

    Ties matter here: vote disagreement takes M+1 values and is 0 for most examples, and every
    score of a one-member ensemble (single, swa) except the entropy is 0 everywhere (0.5).
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average rank of each tie group, from 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rejection_curve(scores: np.ndarray, correct: np.ndarray,
                    fractions: tuple[float, ...] = REJECT_FRACTIONS) -> dict[str, list[float]]:
    """Accuracy on the examples kept when those with the highest `scores` are refused.

    For a fraction f the threshold t is the largest kept score when the floor(f*N) highest are
    refused, and every example scoring above t is refused: the rule a server-side client
    applies ("refuse when score > t"), so `refused` can fall short of f where scores tie at t.
    """
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    ordered = np.sort(scores)
    out: dict[str, list[float]] = {"fraction": [], "threshold": [], "refused": [], "accuracy": []}
    for fraction in fractions:
        threshold = float(ordered[len(ordered) - 1 - int(fraction * len(ordered))])
        kept = scores <= threshold
        out["fraction"].append(float(fraction))
        out["threshold"].append(threshold)
        out["refused"].append(float(1 - kept.mean()))
        out["accuracy"].append(float(correct[kept].mean()))
    return out
