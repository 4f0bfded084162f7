"""Member selection: which collected members a version serves, chosen on the validation split.

    choice = select_members(val_probs, val_labels, "greedy")    # val_probs: [N, M, C]
    choice.members                                               # (3, 4, 4): indices, with repeats

Rules (the test split is never an argument, so it cannot leak into the choice):
- `all`: every collected member, in training order.
- `last-k`: the last k members (the Snapshot Ensembles paper's "last m of M": later snapshots
  are trained longer and are the better ones).
- `greedy`: forward selection with replacement (Caruana et al. 2004, "Ensemble selection from
  libraries of models"): start from the member of lowest validation NLL, then repeatedly add the
  member (any, again if it helps) whose addition most lowers the validation NLL of the averaged
  probabilities; stop when no addition lowers it. A member chosen twice weighs twice in the mean.

The served ensemble is the mean over the listed multiset, so every score (mean, MI, votes, KL)
of a greedy choice is that of the list with its repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapserve.trainer.config import SELECTION_RULES
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.metrics import accuracy, nll

__all__ = ["SELECTION_RULES", "Selection", "greedy_selection", "select_members"]


@dataclass(frozen=True)
class Selection:
    """The members chosen (indices into the collected members, repeats allowed), by which rule,
    and the validation numbers of the chosen ensemble and of all members."""

    rule: str
    members: tuple[int, ...]
    collected: int
    val_nll: float
    val_accuracy: float
    all_val_nll: float
    all_val_accuracy: float
    k: int | None = None

    @property
    def distinct(self) -> tuple[int, ...]:
        """The chosen members once each, in training order: what is exported."""
        return tuple(sorted(set(self.members)))

    def served_positions(self) -> list[int]:
        """The chosen members, sorted, as positions in `distinct` (the manifest's member list):
        a member's repeats sit together, and a choice without repeats is [0, 1, ..., n-1]."""
        position = {index: i for i, index in enumerate(self.distinct)}
        return [position[m] for m in sorted(self.members)]

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `selection`: `members` indexes the manifest's member list (what the
        server serves, repeats included); `collected` the same members among all collected;
        `order` the chosen members in the order the rule chose them (greedy: as added)."""
        return {"rule": self.rule, "k": self.k, "members": self.served_positions(),
                "collected": sorted(self.members), "order": list(self.members),
                "collected_count": self.collected,
                "validation": {"nll": self.val_nll, "accuracy": self.val_accuracy,
                               "all_members_nll": self.all_val_nll,
                               "all_members_accuracy": self.all_val_accuracy}}


def _mean(val_probs: np.ndarray, members: Sequence[int]) -> np.ndarray:
    return val_probs[:, list(members)].mean(axis=1)


def greedy_selection(val_probs: np.ndarray, val_labels: np.ndarray, max_size: int | None = None) -> tuple[int, ...]:
    """Forward selection with replacement on validation NLL; stops when nothing improves (or at
    `max_size` members, default 4 x the collected count: enough for any weighting that matters).
    Ties go to the earlier member."""
    count = val_probs.shape[1]
    limit = max_size or 4 * count
    losses = [nll(val_probs[:, m], val_labels) for m in range(count)]
    chosen = [int(np.argmin(losses))]
    total = val_probs[:, chosen[0]].astype(np.float64)
    best = losses[chosen[0]]
    while len(chosen) < limit:
        size = len(chosen) + 1
        # The mean after adding member m is (total + p_m) / size, for every m at once.
        candidates = (total[:, None, :] + val_probs) / size  # [N, M, C]
        trial = [nll(candidates[:, m], val_labels) for m in range(count)]
        m = int(np.argmin(trial))
        if not trial[m] < best:
            break
        chosen.append(m)
        total = total + val_probs[:, m]
        best = trial[m]
    return tuple(chosen)


def select_members(val_probs: np.ndarray, val_labels: np.ndarray, rule: str, k: int | None = None) -> Selection:
    """The members to serve by `rule`, from the members' validation probabilities [N, M, C]."""
    count = val_probs.shape[1]
    if rule == "all":
        members: tuple[int, ...] = tuple(range(count))
    elif rule == "last-k":
        if k is None or k < 1:
            raise ConfigError(f"selection last-k needs k >= 1 (--keep-last), got {k}")
        members = tuple(range(max(0, count - k), count))
    elif rule == "greedy":
        members = greedy_selection(val_probs, val_labels)
    else:
        raise ConfigError(f"selection must be one of {SELECTION_RULES}, got {rule!r}")
    chosen, every = _mean(val_probs, members), _mean(val_probs, range(count))
    return Selection(rule=rule, members=members, collected=count,
                     val_nll=nll(chosen, val_labels), val_accuracy=accuracy(chosen, val_labels),
                     all_val_nll=nll(every, val_labels), all_val_accuracy=accuracy(every, val_labels),
                     k=k if rule == "last-k" else None)
