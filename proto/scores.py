"""Ensemble scores: pure numpy functions of the members' probabilities, defined once.

The one definition both sides use (numpy only: no torch, no gRPC): the server computes its answers
with it, the trainer its metrics, and the fused ONNX graph's outputs carry `SCORE_NAMES` (a graph
exported before a score existed lacks it: `complete_scores` fills it in). `SCORES`,
one `ScoreSpec` row per score, drives the served dataclass, every encoder, the fused graph's
outputs and the client. Adding a score means: its function here, its row in `SCORES`, its field
in ensemble.proto (regenerated), its test.

`member_probs` is always [batch, members, classes], each row a probability vector. Logs are
natural; 0 * log 0 is taken as 0 (xlogy), so members that put exactly zero mass on a class are
fine. Sums run in float64 (mutual information is a small difference of two entropies, where
float32 rounding would show) and results come back as float32 / int64.
"""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "FUSED_REQUIRED_SCORES",
    "SCORES",
    "SCORE_NAMES",
    "SCORE_SPECS",
    "EnsembleScores",
    "ScoreSpec",
    "complete_scores",
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
    # A non-finite logit makes its row NaN (inf - inf), which the server refuses per request
    # (server/models/bisection.py): expected, so no RuntimeWarning for it.
    with np.errstate(invalid="ignore"):
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
class ScoreSpec:
    """One served score: what every encoder, the fused graph and the client need to know of it.

    `dims` name the axes (batch, members, classes); `compute` takes the members' probabilities
    [B, M, C], the scores computed before it in `SCORES` (so `top_class` reads the served
    `probabilities`) and the temperature.
    """

    name: str
    dtype: np.dtype
    dims: tuple[str, ...]
    compute: Callable[[np.ndarray, Mapping[str, np.ndarray], float], np.ndarray]
    description: str
    # Sent only when the request asks for it (its size grows with members x classes).
    on_request: bool = False
    # An output of the fused graph; False: always computed by the server (a fused graph runs
    # every member, so there is nothing for it to compute).
    fused: bool = True

    def shape(self, batch: int, members: int, classes: int) -> tuple[int, ...]:
        sizes = {"batch": batch, "members": members, "classes": classes}
        return tuple(sizes[dim] for dim in self.dims)


_F32, _I64, _I32 = np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32)

# The served outputs, in this order everywhere: the fields of EnsembleScores and of the native
# answer, the KServe output names, the fused graph's outputs. A new score is a row here, its
# function above, its field in ensemble.proto and a test.
SCORES: tuple[ScoreSpec, ...] = (
    ScoreSpec("probabilities", _F32, ("batch", "classes"),
              lambda m, done, t: probabilities(m, t),
              "the members' mean probabilities (after the manifest's temperature)"),
    ScoreSpec("top_class", _I64, ("batch",),
              lambda m, done, t: top_class(done["probabilities"]),
              "the most probable class of `probabilities`"),
    ScoreSpec("predictive_entropy", _F32, ("batch",),
              lambda m, done, t: predictive_entropy(m),
              "H[mean]: the total uncertainty of the averaged prediction"),
    ScoreSpec("expected_entropy", _F32, ("batch",),
              lambda m, done, t: expected_entropy(m),
              "mean of H[member]: the uncertainty members have on their own"),
    ScoreSpec("mutual_information", _F32, ("batch",),
              lambda m, done, t: mutual_information(m),
              "H[mean] - mean H[member]: the part of the uncertainty members disagree on"),
    ScoreSpec("vote_disagreement", _F32, ("batch",),
              lambda m, done, t: vote_disagreement(m),
              "fraction of members whose top class differs from the ensemble's"),
    ScoreSpec("member_kl", _F32, ("batch", "members"),
              lambda m, done, t: member_kl(m),
              "KL(member || mean) per member"),
    ScoreSpec("member_top_class", _I64, ("batch", "members"),
              lambda m, done, t: member_top_class(m),
              "each member's own top class"),
    ScoreSpec("member_probabilities", _F32, ("batch", "members", "classes"),
              lambda m, done, t: m,
              "each member's probabilities", on_request=True),
    # Adaptive evaluation (server/engine/adaptive.py) answers a row with its first k members;
    # the full ensemble evaluates them all, which is what this computes.
    ScoreSpec("members_evaluated", _I32, ("batch",),
              lambda m, done, t: np.full(len(m), m.shape[1], dtype=np.int32),
              "how many members the row's scores come from (M unless served adaptively)",
              fused=False),
)
SCORE_NAMES: tuple[str, ...] = tuple(spec.name for spec in SCORES)
# What every fused graph outputs, whatever else it lacks: `complete_scores` computes the scores a
# graph exported before them lacks from its member probabilities, next to its probabilities.
FUSED_REQUIRED_SCORES: tuple[str, ...] = ("member_probabilities", "probabilities")
SCORE_SPECS: dict[str, ScoreSpec] = {spec.name: spec for spec in SCORES}


def _len(self: Any) -> int:
    return len(self.top_class)


def _rows(self: Any, start: int, stop: int) -> Any:
    """The scores of examples start..stop-1 (views, no copies)."""
    return type(self)(**{name: getattr(self, name)[start:stop] for name in SCORE_NAMES})


# Every score for a batch, one field per row of SCORES; row i of each array belongs to example i.
EnsembleScores = make_dataclass(
    "EnsembleScores", [(spec.name, np.ndarray) for spec in SCORES], frozen=True,
    namespace={"__len__": _len, "rows": _rows, "__module__": __name__,
               "__doc__": "Every score for a batch (one field per row of SCORES); row i of "
                          "each array belongs to example i."})


def ensemble_scores(member_probs: np.ndarray, temperature: float = 1.0) -> Any:
    """All scores of a [B, M, C] batch. Only `probabilities` sees the temperature (see the contract)."""
    return complete_scores(np.asarray(member_probs, dtype=np.float32), {}, temperature)


def complete_scores(member_probs: np.ndarray, known: Mapping[str, np.ndarray],
                    temperature: float = 1.0) -> Any:
    """EnsembleScores from the scores already computed (`known`, for example a fused graph's
    outputs) and, for the rest, the members' probabilities [B, M, C] (float32)."""
    done: dict[str, np.ndarray] = {}
    for spec in SCORES:
        value = known.get(spec.name)
        done[spec.name] = spec.compute(member_probs, done, temperature) if value is None else value
    return EnsembleScores(**done)
