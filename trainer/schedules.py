"""Learning-rate schedules as closed-form functions of the iteration.

Steps count optimizer updates from 1 (the papers' t): step t is the t-th update, and its LR is
`lr(t)`. Being pure, a resumed run, a plot and a test all get the same number for a step.

A schedule object holds its settings and answers `lr(step)`; the training loop needs nothing
else. New methods (FGE's triangle, SWA's constant tail) add a function and a small class here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.errors import ConfigError

__all__ = [
    "CyclicCosineSchedule",
    "StepDecaySchedule",
    "cycle_end_steps",
    "cycle_length",
    "cyclic_cosine_lr",
    "step_decay_lr",
]


def cycle_length(total_steps: int, cycles: int) -> int:
    """Iterations per cycle, ceil(T/M), as in the Snapshot Ensembles schedule."""
    return -(-total_steps // cycles)


def cyclic_cosine_lr(step: int, lr0: float, total_steps: int, cycles: int) -> float:
    """Snapshot Ensembles (Huang et al. 2017), per iteration, step t from 1:

    lr(t) = lr0/2 * (cos(pi * ((t-1) mod ceil(T/M)) / ceil(T/M)) + 1)

    lr0 at each cycle's first step, close to 0 (not exactly 0) at its last.
    """
    length = cycle_length(total_steps, cycles)
    position = (step - 1) % length
    return lr0 / 2 * (math.cos(math.pi * position / length) + 1)


def cycle_end_steps(total_steps: int, cycles: int) -> list[int]:
    """Last step of each cycle: k*ceil(T/M) while below T, then T (a shorter final cycle)."""
    length = cycle_length(total_steps, cycles)
    ends = list(range(length, total_steps, length))
    return [*ends, total_steps]


def step_decay_lr(step: int, lr0: float, total_steps: int,
                  milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """The ordinary baseline: lr0, times gamma after each milestone (a fraction of T).

    The defaults are the Snapshot Ensembles paper's single-model schedule
    (0.1 -> 0.01 at 50% -> 0.001 at 75% of the budget).
    """
    passed = sum(1 for fraction in milestones if step > fraction * total_steps)
    return lr0 * gamma**passed


@dataclass(frozen=True)
class CyclicCosineSchedule:
    """Cosine annealing with warm restarts, M cycles over T iterations (snapshot ensembles)."""

    lr0: float
    total_steps: int
    cycles: int

    def __post_init__(self) -> None:
        _check_common(self.lr0, self.total_steps)
        if self.cycles < 1:
            raise ConfigError(f"members (cycles) must be >= 1, got {self.cycles}")
        # ceil(T/M) iterations per cycle can give fewer than M cycles when T is small
        # (T=10, M=6: cycles of 2 -> 5 cycles). Refuse rather than return fewer members.
        if len(cycle_end_steps(self.total_steps, self.cycles)) != self.cycles:
            raise ConfigError(
                f"members={self.cycles} cycles do not fit in {self.total_steps} iterations "
                f"(cycles of ceil(T/M)={cycle_length(self.total_steps, self.cycles)}); "
                "train more epochs or take fewer members"
            )

    @property
    def steps_per_cycle(self) -> int:
        return cycle_length(self.total_steps, self.cycles)

    def lr(self, step: int) -> float:
        return cyclic_cosine_lr(step, self.lr0, self.total_steps, self.cycles)

    def cycle_ends(self) -> list[int]:
        return cycle_end_steps(self.total_steps, self.cycles)


@dataclass(frozen=True)
class StepDecaySchedule:
    """Piecewise-constant decay at fractions of the budget (the `single` baseline)."""

    lr0: float
    total_steps: int
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check_common(self.lr0, self.total_steps)
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError(f"milestones must be fractions in (0, 1), got {self.milestones}")

    def lr(self, step: int) -> float:
        return step_decay_lr(step, self.lr0, self.total_steps, self.milestones, self.gamma)


def _check_common(lr0: float, total_steps: int) -> None:
    if not lr0 > 0:
        raise ConfigError(f"lr must be > 0, got {lr0}")
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
