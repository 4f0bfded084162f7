"""Adaptive member evaluation at serving time (Inoue, AISTATS 2019; docs/protocol.md).

The first member of the calibrated order runs on the whole batch; the rows whose running mean
is confident enough (snapserve.proto.adaptive: its top probability >= tau_k) are answered, the
next member runs on the rest only, and so on; a row that never stops gets every member. So an
easy batch costs about one member, and the rows where members disagree still get all of them.

A row's scores are those of the members it evaluated (in the manifest's member order, so a row
that evaluates every member gets exactly the full ensemble's answer), its probabilities under
the temperature the trainer fitted for answers of that many members (the version's where it
fitted none). The per-member scores of members a row did not evaluate hold NaN (member_kl,
member_probabilities) and -1 (member_top_class); `members_evaluated` says how many it did.
Runs on the members' own sessions: the fused graph runs every member, so adaptive serving uses
the members graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from snapserve.proto.adaptive import confidence
from snapserve.proto.scores import SCORES, EnsembleScores, complete_scores

__all__ = ["AdaptiveMembers", "MemberRunner", "adaptive_scores"]


class MemberRunner(Protocol):
    """What adaptive evaluation needs of the members graph (runtime.MemberGraph)."""

    members: int
    temperature: float

    def run_member(self, index: int, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class AdaptiveMembers:
    """One version's stopping plan, from its manifest's `adaptive` object."""

    order: tuple[int, ...]  # member indices, evaluated in this order
    thresholds: tuple[float, ...]  # tau_1 .. tau_{M-1}; inf: no row stops there
    # T_1 .. T_{M-1}, the temperature of an answer from k members; None: the version's (as for
    # an answer from all M: the full ensemble's)
    temperatures: tuple[float | None, ...] | None = None

    def temperature(self, members: int, version_temperature: float) -> float:
        """The temperature of an answer from `members` members."""
        if self.temperatures is None or members > len(self.temperatures):
            return version_temperature
        fitted = self.temperatures[members - 1]
        return version_temperature if fitted is None else fitted

    def describe(self) -> str:
        taus = ",".join("never" if math.isinf(t) else f"{t:.4g}" for t in self.thresholds)
        temps = ("" if self.temperatures is None else ", temperatures " + ",".join(
            "version's" if t is None else f"{t:.4g}" for t in self.temperatures))
        return (f"on: members graph, order {','.join(map(str, self.order))}, "
                f"thresholds {taus or 'none'}{temps}")


def _stopping(runner: MemberRunner, x: np.ndarray, plan: AdaptiveMembers) -> tuple[np.ndarray, np.ndarray]:
    """Each row's member probabilities ([B, M, C] float32, NaN where not evaluated) and how
    many members it evaluated ([B] int32)."""
    rows = len(x)
    taken = np.full(rows, runner.members, dtype=np.int32)
    running = np.arange(rows)
    probs: np.ndarray | None = None
    total: np.ndarray | None = None  # float64 sum of the running rows' evaluated members
    for step, member in enumerate(plan.order):
        p = runner.run_member(member, x if step == 0 else x[running])
        if probs is None:
            probs = np.full((rows, runner.members, p.shape[-1]), np.nan, dtype=np.float32)
        probs[running, member] = p
        total = p.astype(np.float64) if total is None else total + p
        if step == len(plan.thresholds):
            break
        stop = confidence(total / (step + 1)) >= plan.thresholds[step]
        taken[running[stop]] = step + 1
        running, total = running[~stop], total[~stop]
        if not running.size:
            break
    assert probs is not None  # a plan has at least one member
    return probs, taken


def adaptive_scores(runner: MemberRunner, x: np.ndarray, plan: AdaptiveMembers) -> EnsembleScores:
    """Every score of the batch x, each row from the members it evaluated."""
    probs, taken = _stopping(runner, x, plan)
    rows, members, classes = probs.shape
    out = {spec.name: np.full(spec.shape(rows, members, classes),
                              np.nan if spec.dtype.kind == "f" else -1, dtype=spec.dtype)
           for spec in SCORES}
    for k in np.unique(taken).tolist():
        group = np.flatnonzero(taken == k)
        cols = np.sort(np.asarray(plan.order[:k]))  # manifest order: k = M is the full answer
        part = complete_scores(probs[group][:, cols], {}, plan.temperature(k, runner.temperature))
        for spec in SCORES:
            index = np.ix_(group, cols) if "members" in spec.dims else group
            out[spec.name][index] = getattr(part, spec.name)
    return EnsembleScores(**out)
