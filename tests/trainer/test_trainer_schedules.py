"""Schedules are pure functions of the step; the loop applies them per iteration and the
collector takes members at cycle ends."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.collectors import StepCollector
from trainer.data import Dataset
from trainer.errors import ConfigError
from trainer.loop import TensorBatches, train_loop
from trainer.models import build_model
from trainer.schedules import (CyclicCosineSchedule, StepDecaySchedule, cycle_end_steps,
                               cyclic_cosine_lr, step_decay_lr)


def paper_lr(t: int, lr0: float, T: int, M: int) -> float:
    """Huang et al. 2017, eq. (2), written out independently of trainer.schedules."""
    c = math.ceil(T / M)
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % c) / c) + 1)


@pytest.mark.parametrize(("T", "M"), [(680, 5), (100, 4), (101, 4), (37, 3), (5, 5), (7, 1)])
def test_cyclic_cosine_matches_the_formula_at_every_step(T: int, M: int) -> None:
    schedule = CyclicCosineSchedule(lr0=0.1, total_steps=T, cycles=M)
    for t in range(1, T + 1):
        assert schedule.lr(t) == pytest.approx(paper_lr(t, 0.1, T, M), abs=1e-15)


@pytest.mark.parametrize(("T", "M"), [(680, 5), (100, 4), (101, 4), (37, 3)])
def test_cycles_start_at_lr0_and_end_near_zero(T: int, M: int) -> None:
    c = math.ceil(T / M)
    ends = cycle_end_steps(T, M)
    assert ends == [k * c for k in range(1, M)] + [T]
    for start in [1] + [e + 1 for e in ends[:-1]]:
        assert cyclic_cosine_lr(start, 0.2, T, M) == 0.2
    for end in ends[:-1]:  # a full cycle ends one step short of lr = 0: lr0 * (1 - cos(pi/c)) / 2
        assert 0 < cyclic_cosine_lr(end, 0.2, T, M) < 0.2 * (math.pi / c) ** 2 / 4 + 1e-12


def test_too_many_cycles_for_the_budget_is_refused() -> None:
    # ceil(10/6) = 2 steps per cycle gives 5 cycles, not 6.
    with pytest.raises(ConfigError, match="members=6"):
        CyclicCosineSchedule(lr0=0.1, total_steps=10, cycles=6)
    with pytest.raises(ConfigError, match="lr"):
        CyclicCosineSchedule(lr0=0.0, total_steps=10, cycles=2)


def test_step_decay_is_the_paper_single_model_schedule() -> None:
    schedule = StepDecaySchedule(lr0=0.1, total_steps=100)
    assert [schedule.lr(t) for t in (1, 50, 51, 75, 76, 100)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert step_decay_lr(51, 1.0, 100, milestones=(0.5,), gamma=0.5) == 0.5


def _small_run(digits: Dataset, epochs: int, members: int, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.from_numpy(digits.normalize(digits.train.x[:300]))
    y = torch.from_numpy(digits.train.y[:300])
    batches = TensorBatches(x, y, batch_size=64, seed=seed)  # 300 = 4*64 + 44: 5 steps per epoch
    schedule = CyclicCosineSchedule(lr0=0.1, total_steps=epochs * len(batches), cycles=members)
    collector = StepCollector(schedule.cycle_ends())
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    seen_lrs: list[float] = []
    original_step = optimizer.step

    def recording_step(*args, **kwargs):  # what the optimizer actually used, step by step
        seen_lrs.append(optimizer.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    optimizer.step = recording_step
    result = train_loop(model, optimizer, batches, schedule, collector)
    return schedule, collector, model, result, seen_lrs


def test_loop_applies_the_schedule_per_iteration_and_collects_at_cycle_ends(digits: Dataset) -> None:
    schedule, collector, model, result, seen_lrs = _small_run(digits, epochs=5, members=3)
    T, M = 25, 3  # 5 epochs x 5 steps; cycles of ceil(25/3) = 9 steps: ends 9, 18, 25
    assert schedule.total_steps == T
    expected = [paper_lr(t, 0.1, T, M) for t in range(1, T + 1)]
    assert result.lrs == pytest.approx(expected, abs=1e-15)
    assert seen_lrs == pytest.approx(expected, abs=1e-15)
    members = collector.members()
    assert [m.step for m in members] == [9, 18, 25]
    assert len(result.epoch_losses) == 5
    # The last member is the final model; earlier ones are frozen copies, not references.
    final = model.state_dict()
    assert all(torch.equal(final[k], members[-1].state_dict[k]) for k in final)
    assert not all(torch.equal(final[k], members[0].state_dict[k]) for k in final)


def test_same_seed_same_members(digits: Dataset) -> None:
    _, first, *_ = _small_run(digits, epochs=2, members=2, seed=3)
    _, second, *_ = _small_run(digits, epochs=2, members=2, seed=3)
    for a, b in zip(first.members(), second.members()):
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_batches_resume_mid_epoch_in_the_same_order(digits: Dataset) -> None:
    x = torch.from_numpy(digits.normalize(digits.train.x[:129]))
    y = torch.from_numpy(digits.train.y[:129])
    batches = TensorBatches(x, y, batch_size=64, seed=7)
    assert len(batches) == 2  # 129 = 2*64 + 1: the lone example is left out (BatchNorm)
    whole = list(batches.epoch(4))
    tail = list(batches.epoch(4, start=1))
    assert torch.equal(whole[1][0], tail[0][0]) and torch.equal(whole[1][1], tail[0][1])
    assert not torch.equal(whole[0][1], list(batches.epoch(5))[0][1])
