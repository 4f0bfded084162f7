"""Ensemble scores: pure numpy functions of the members' probabilities, defined once.

The one definition both sides use (numpy only: no torch, no gRPC): the server computes its answers
with it, the trainer its metrics, and the fused ONNX graph's outputs carry `SCORE_NAMES`. Adding a
score means: its function here and in `ensemble_scores`, its field in the protos, its test.

`member_probs` is always [batch, members, classes], each row a probability vector. Logs are
natural; 0 * log 0 is taken as 0 (xlogy), so members that put exactly zero mass on a class are
fine. Sums run in float64 (mutual information is a small difference of two entropies, where
float32 rounding would show) and results come back as float32 / int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SCORE_NAMES",
    "EnsembleScores",
    "ensemble_scores",
    "entropy",
    "expected_entropy",
    "member_kl",
    "member_top_class",
    "mean_probabilities",
    "mutual_information",
    "predictive_entropy",
    "probabilities",
    "softmax",
    "top_class",
    "vote_disagreement",
    "xlogy",
]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along `axis`, shifted by the max so large logits do not overflow; keeps the dtype."""
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x * log(y), defined as 0 where x == 0 (even where y == 0)."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    out = np.zeros(x.shape, dtype=np.float64)
    np.multiply(x, np.log(y, where=x != 0, out=np.zeros_like(y)), out=out, where=x != 0)
    return out


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy -sum p log p along `axis` (float64)."""
    return -np.sum(xlogy(p, p), axis=axis)


def mean_probabilities(member_probs: np.ndarray) -> np.ndarray:
    """[B, M, C] -> [B, C]: p̄, the members' average, before any temperature."""
    return np.asarray(member_probs, dtype=np.float64).mean(axis=1)


def probabilities(member_probs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[B, M, C] -> [B, C] float32: the served probabilities softmax(log(p̄) / T); p̄ itself when T == 1.

    Temperature scaling is applied after pooling, as the trainer fitted it. Classes with p̄ == 0
    get log = -inf and stay at 0.
    """
    mean = mean_probabilities(member_probs)
    if temperature == 1.0:
        return mean.astype(np.float32)
    with np.errstate(divide="ignore"):
        log_mean = np.log(mean)
    return softmax(log_mean / temperature, axis=-1).astype(np.float32)


def top_class(probs: np.ndarray) -> np.ndarray:
    """[..., C] -> [...] int64: the most probable class (the first on ties)."""
    return np.argmax(probs, axis=-1).astype(np.int64)


def predictive_entropy(member_probs: np.ndarray) -> np.ndarray:
    """[B, M, C] -> [B] float32: H[p̄], the total uncertainty of the averaged prediction."""
    return entropy(mean_probabilities(member_probs)).astype(np.float32)


def expected_entropy(member_probs: np.ndarray) -> np.ndarray:
    """[B, M, C] -> [B] float32: mean_m H[p_m], the uncertainty members have on their own (aleatoric)."""
    return entropy(member_probs).mean(axis=1).astype(np.float32)


def mutual_information(member_probs: np.ndarray) -> np.ndarray:
    """[B, M, C] -> [B] float32: H[p̄] - mean_m H[p_m], the part of the uncertainty members disagree on.

    Equal to mean_m KL(p_m || p̄) and >= 0 in exact arithmetic; clipped at 0 against rounding.
    """
    mi = entropy(mean_probabilities(member_probs)) - entropy(member_probs).mean(axis=1)
    return np.maximum(mi, 0.0).astype(np.float32)


def vote_disagreement(member_probs: np.ndarray) -> np.ndarray:
    """[B, M, C] -> [B] float32 in [0, 1]: the fraction of members whose top class differs from p̄'s."""
    votes = member_top_class(member_probs)
    consensus = top_class(mean_probabilities(member_probs))
    return (votes != consensus[:, None]).mean(axis=1).astype(np.float32)


def member_kl(member_probs: np.ndarray) -> np.ndarray:
    """[B, M, C] -> [B, M] float32: KL(p_m || p̄) per member, how far each one is from the consensus.

    Finite: wherever p_m > 0, p̄ >= p_m / M > 0.
    """
    p = np.asarray(member_probs, dtype=np.float64)
    mean = p.mean(axis=1, keepdims=True)
    kl = np.sum(xlogy(p, p) - xlogy(p, mean), axis=-1)
    return np.maximum(kl, 0.0).astype(np.float32)


def member_top_class(member_probs: np.ndarray) -> np.ndarray:
    """[B, M, C] -> [B, M] int64: each member's own top class."""
    return top_class(member_probs)


@dataclass(frozen=True)
class EnsembleScores:
    """Every score for a batch; row i of each array belongs to example i."""

    probabilities: np.ndarray        # [B, C] float32 (temperature applied)
    top_class: np.ndarray            # [B] int64
    predictive_entropy: np.ndarray   # [B] float32
    expected_entropy: np.ndarray     # [B] float32
    mutual_information: np.ndarray   # [B] float32
    vote_disagreement: np.ndarray    # [B] float32
    member_kl: np.ndarray            # [B, M] float32
    member_top_class: np.ndarray     # [B, M] int64
    member_probabilities: np.ndarray  # [B, M, C] float32

    def __len__(self) -> int:
        return len(self.top_class)

    def rows(self, start: int, stop: int) -> EnsembleScores:
        """The scores of examples start..stop-1 (views, no copies)."""
        return EnsembleScores(**{name: getattr(self, name)[start:stop]
                                 for name in self.__dataclass_fields__})


# The served outputs, in this order everywhere: EnsembleScores' fields, the fused graph's outputs,
# the KServe output names.
SCORE_NAMES: tuple[str, ...] = tuple(EnsembleScores.__dataclass_fields__)


def ensemble_scores(member_probs: np.ndarray, temperature: float = 1.0) -> EnsembleScores:
    """All scores of a [B, M, C] batch. Only `probabilities` sees the temperature (see the contract)."""
    member_probs = np.asarray(member_probs, dtype=np.float32)
    probs = probabilities(member_probs, temperature)
    return EnsembleScores(
        probabilities=probs,
        top_class=top_class(probs),
        predictive_entropy=predictive_entropy(member_probs),
        expected_entropy=expected_entropy(member_probs),
        mutual_information=mutual_information(member_probs),
        vote_disagreement=vote_disagreement(member_probs),
        member_kl=member_kl(member_probs),
        member_top_class=member_top_class(member_probs),
        member_probabilities=member_probs,
    )
