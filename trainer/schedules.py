"""Learning-rate schedules as closed-form functions of the iteration.

Steps count optimizer updates from 1 (the papers' t): step t is the t-th update, and its LR is
`lr(t)`. Being pure, a resumed run, a plot and a test all get the same number for a step.

A schedule object holds its settings and answers `lr(step)`; the training loop needs nothing
else. Budgets are whole epochs: cycles start and members are taken at epoch boundaries, so a
checkpoint (written at the end of every epoch) always holds a consistent set of members.

- `CyclicCosineSchedule` (snapshot): Huang et al. 2017, per iteration, M cycles.
- `FGESchedule`: the reference linear-decay schedule for pre-training, then Garipov et al.'s
  piecewise-linear cycles between alpha1 (cycle boundaries) and alpha2 (mid-cycle).
- `SWASchedule`: the SWA reference schedule (constant, linear decay to swa_lr by 90% of
  swa_start), then a constant swa_lr or linear cycles from swa_lr_max down to swa_lr.
- `StepDecaySchedule` (single): 0.1 -> 0.01 at 50% -> 0.001 at 75%, the SSE paper's baseline.
- `LinearDecaySchedule` (single): the FGE/SWA reference schedule over the whole budget, the
  baseline of those papers (FGE's pre-training is this schedule cut off where FGE starts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from snapserve.trainer.errors import ConfigError

__all__ = [
    "CyclicCosineSchedule",
    "FGESchedule",
    "LinearDecaySchedule",
    "SWASchedule",
    "StepDecaySchedule",
    "cycle_end_steps",
    "cyclic_cosine_lr",
    "fge_cyclic_lr",
    "linear_decay_lr",
    "snapshot_cycle_steps",
    "step_decay_lr",
    "swa_cyclic_lr",
    "swa_lr_before_start",
]


# ---- Snapshot Ensembles ---------------------------------------------------------------------

def snapshot_cycle_steps(total_steps: int, cycles: int, steps_per_epoch: int = 1) -> tuple[int, int]:
    """(L, L_last): iterations in each of the first M-1 cycles, and in the last one.

    As in the paper's reference code (gaohuang/SnapshotEnsemble train.lua): n_sub = floor(B/M)
    epochs per cycle and the last cycle absorbs the leftover epochs, so it is the LONGER one.
    With steps_per_epoch=1 the same rule applies to raw iterations.
    """
    epochs = total_steps // steps_per_epoch
    full = (epochs // cycles) * steps_per_epoch
    return full, total_steps - (cycles - 1) * full


def cyclic_cosine_lr(step: int, lr0: float, total_steps: int, cycles: int, steps_per_epoch: int = 1) -> float:
    """Snapshot Ensembles (Huang et al. 2017), per iteration, step t from 1. Within a full cycle
    of L = floor(B/M) epochs:

        lr(t) = lr0/2 * (cos(pi * ((t-1) mod L) / L) + 1)

    which is the paper's formula with ceil(T/M) = L whenever M divides the budget. The last
    cycle runs the same cosine over its own length L_last >= L (the leftover epochs), so it too
    starts at lr0 and ends close to 0. lr0 at each cycle's first step, lr0*(1-cos(pi/L))/2 ~ 0 at
    its last (the reference code's T_cur, counted from 1, would put that step at exactly 0 and
    the first one a step below lr0; the issue's formula is kept).
    """
    full, last = snapshot_cycle_steps(total_steps, cycles, steps_per_epoch)
    last_start = (cycles - 1) * full  # steps before the last cycle
    if step > last_start:
        return lr0 / 2 * (math.cos(math.pi * (step - 1 - last_start) / last) + 1)
    return lr0 / 2 * (math.cos(math.pi * ((step - 1) % full) / full) + 1)


def cycle_end_steps(total_steps: int, cycles: int, steps_per_epoch: int = 1) -> list[int]:
    """Last step of each cycle: k*L for k < M, then T (the end of the longer last cycle)."""
    full, _ = snapshot_cycle_steps(total_steps, cycles, steps_per_epoch)
    return [k * full for k in range(1, cycles)] + [total_steps]


@dataclass(frozen=True)
class CyclicCosineSchedule:
    """Cosine annealing with warm restarts, M cycles over T iterations (snapshot ensembles)."""

    lr0: float
    total_steps: int
    cycles: int
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        _check_common(self.lr0, self.total_steps)
        if self.cycles < 1:
            raise ConfigError(f"members (cycles) must be >= 1, got {self.cycles}")
        epochs = self.total_steps // self.steps_per_epoch
        if epochs < self.cycles:
            unit = "epochs" if self.steps_per_epoch > 1 else "iterations"
            raise ConfigError(f"members={self.cycles} cycles need at least {self.cycles} {unit}, "
                              f"the budget has {epochs}: train more epochs or take fewer members")

    def lr(self, step: int) -> float:
        return cyclic_cosine_lr(step, self.lr0, self.total_steps, self.cycles, self.steps_per_epoch)

    def member_steps(self) -> list[int]:
        return cycle_end_steps(self.total_steps, self.cycles, self.steps_per_epoch)


# ---- The "normal" schedules of the FGE and SWA reference code -------------------------------

def linear_decay_lr(step: int, lr0: float, steps: int, final_ratio: float = 0.01) -> float:
    """The SWA/FGE reference schedule (timgaripov/swa and dnn-mode-connectivity train.py), per
    iteration: with t = (step-1)/steps, lr0 while t <= 0.5, then linear down to
    final_ratio*lr0 at t = 0.9, then constant."""
    t = (step - 1) / steps
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - final_ratio) * (t - 0.5) / 0.4
    else:
        factor = final_ratio
    return lr0 * factor


@dataclass(frozen=True)
class LinearDecaySchedule:
    """`linear_decay_lr` over the whole budget, one member at the end (the `single-linear` baseline)."""

    lr0: float
    total_steps: int

    def __post_init__(self) -> None:
        _check_common(self.lr0, self.total_steps)

    def lr(self, step: int) -> float:
        return linear_decay_lr(step, self.lr0, self.total_steps)

    def member_steps(self) -> list[int]:
        return [self.total_steps]


def _cycle_position(i: int, cycle_steps: int) -> float:
    """t(i) = (mod(i-1, c) + 1) / c for the i-th step of a cyclic phase: in (0, 1], 1 at a cycle's end."""
    return (((i - 1) % cycle_steps) + 1) / cycle_steps


def fge_cyclic_lr(i: int, cycle_steps: int, lr1: float, lr2: float) -> float:
    """Garipov et al. 2018: step i of the FGE phase, t = t(i):
    (1-2t)*alpha1 + 2t*alpha2 for t <= 1/2, else (2-2t)*alpha2 + (2t-1)*alpha1.
    alpha1 (the maximum) at cycle boundaries, alpha2 (the minimum) exactly at mid-cycle."""
    t = _cycle_position(i, cycle_steps)
    if t <= 0.5:
        return (1 - 2 * t) * lr1 + 2 * t * lr2
    return (2 - 2 * t) * lr2 + (2 * t - 1) * lr1


@dataclass(frozen=True)
class FGESchedule:
    """Pre-training for `start_step` iterations, then cycles of `cycle_steps` (an even number of
    epochs). The pre-training LR is the reference's linear decay computed over the WHOLE budget
    and cut off where FGE starts, as when FGE runs from the 80% checkpoint of a full run."""

    lr0: float
    total_steps: int
    start_step: int  # the last pre-training step (0: none, e.g. from a checkpoint at step 0)
    cycle_steps: int
    lr1: float  # alpha1, the maximum, at cycle boundaries
    lr2: float  # alpha2, the minimum, at mid-cycle: where members are taken

    def __post_init__(self) -> None:
        _check_common(self.lr0, self.total_steps)
        if self.cycle_steps < 2 or self.cycle_steps % 2:
            raise ConfigError(f"fge_cycle must give an even number of steps per cycle, got {self.cycle_steps}")
        if not 0 <= self.start_step <= self.total_steps - self.cycle_steps:
            raise ConfigError(f"the FGE phase needs at least one cycle ({self.cycle_steps} steps) after "
                              f"step {self.start_step} of {self.total_steps}: lower fge_start or train longer")
        if not self.lr1 >= self.lr2 > 0:
            raise ConfigError(f"fge_lr1 (the maximum) must be >= fge_lr2 (the minimum) > 0, "
                              f"got {self.lr1} and {self.lr2}")

    def lr(self, step: int) -> float:
        if step <= self.start_step:
            return linear_decay_lr(step, self.lr0, self.total_steps)
        return fge_cyclic_lr(step - self.start_step, self.cycle_steps, self.lr1, self.lr2)

    def member_steps(self) -> list[int]:
        """Mid-cycle minima: start + c/2, start + 3c/2, ... up to the budget."""
        half = self.cycle_steps // 2
        return list(range(self.start_step + half, self.total_steps + 1, self.cycle_steps))


def swa_lr_before_start(step: int, lr0: float, swa_start: int, swa_lr: float) -> float:
    """timgaripov/swa train.py, per iteration: t = (step-1)/swa_start; lr0 while t <= 0.5, linear
    to swa_lr at t = 0.9, then swa_lr."""
    return linear_decay_lr(step, lr0, swa_start, final_ratio=swa_lr / lr0)


def swa_cyclic_lr(i: int, cycle_steps: int, lr_max: float, lr_min: float) -> float:
    """Izmailov et al. 2018's cyclical SWA LR: (1-t)*alpha1 + t*alpha2, t = t(i), so each cycle
    falls linearly from ~alpha1 to exactly alpha2 at its end, where the weights are averaged."""
    t = _cycle_position(i, cycle_steps)
    return (1 - t) * lr_max + t * lr_min


@dataclass(frozen=True)
class SWASchedule:
    """SWA (and SWAG): the reference decay until `start_step`, then a constant `swa_lr`
    (cycle_steps = 0) or cycles from `swa_lr_max` down to `swa_lr`.

    The running average takes the weights every `average_every` steps (one epoch by default)
    from `start_step` on, as the reference does (its first model is the one at swa_start), or
    at every cycle end for the cyclical schedule.
    """

    lr0: float
    total_steps: int
    start_step: int
    swa_lr: float
    average_every: int  # steps between averaged models (one epoch) with a constant LR
    cycle_steps: int = 0  # 0: constant swa_lr
    swa_lr_max: float | None = None  # alpha1 of the cyclical schedule

    def __post_init__(self) -> None:
        _check_common(self.lr0, self.total_steps)
        if not 1 <= self.start_step <= self.total_steps:
            raise ConfigError(f"swa_start must fall inside the budget: step {self.start_step} of {self.total_steps}")
        if not self.swa_lr > 0:
            raise ConfigError(f"swa_lr must be > 0, got {self.swa_lr}")
        if self.cycle_steps < 0 or self.average_every < 1:
            raise ConfigError("swa_cycle must be >= 0 epochs")
        if self.cycle_steps and (self.swa_lr_max is None or not self.swa_lr_max >= self.swa_lr):
            raise ConfigError(f"swa_lr_max must be >= swa_lr for a cyclical SWA schedule, got {self.swa_lr_max}")
        if self.cycle_steps and self.start_step + self.cycle_steps > self.total_steps:
            raise ConfigError("the cyclical SWA phase needs at least one whole cycle after swa_start")

    def lr(self, step: int) -> float:
        if step <= self.start_step:
            return swa_lr_before_start(step, self.lr0, self.start_step, self.swa_lr)
        if not self.cycle_steps:
            return self.swa_lr
        assert self.swa_lr_max is not None
        return swa_cyclic_lr(step - self.start_step, self.cycle_steps, self.swa_lr_max, self.swa_lr)

    def member_steps(self) -> list[int]:
        """The steps whose weights enter the average."""
        if self.cycle_steps:
            return list(range(self.start_step + self.cycle_steps, self.total_steps + 1, self.cycle_steps))
        return list(range(self.start_step, self.total_steps + 1, self.average_every))


# ---- The single-model baseline --------------------------------------------------------------

def step_decay_lr(step: int, lr0: float, total_steps: int,
                  milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """The ordinary baseline: lr0, times gamma after each milestone (a fraction of T).

    The defaults are the Snapshot Ensembles paper's single-model schedule
    (0.1 -> 0.01 at 50% -> 0.001 at 75% of the budget).
    """
    passed = sum(1 for fraction in milestones if step > fraction * total_steps)
    return lr0 * gamma**passed


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

    def member_steps(self) -> list[int]:
        return [self.total_steps]


def _check_common(lr0: float, total_steps: int) -> None:
    if not lr0 > 0:
        raise ConfigError(f"lr must be > 0, got {lr0}")
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
