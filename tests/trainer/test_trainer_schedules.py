"""Schedules are pure functions of the step, pinned here against the papers' formulas written out
independently; the loop applies them per iteration and the collectors take members where the
papers take them."""

from __future__ import annotations

import math

import pytest
import torch

from snapserve.trainer.collectors import AveragingCollector
from snapserve.trainer.config import DEFAULT_MEMBERS, METHOD_NAMES, TrainConfig
from snapserve.trainer.datasets import Dataset
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.loop import TensorBatches, train_loop
from snapserve.trainer.methods import METHODS, MethodContext, build_method, fge_phase_epochs
from snapserve.trainer.models import build_model
from snapserve.trainer.schedules import (CyclicCosineSchedule, FGESchedule, StepDecaySchedule, SWASchedule,
                                         step_decay_lr)


def paper_lr(t: int, lr0: float, T: int, M: int) -> float:
    """Huang et al. 2017, eq. (2), written out independently of trainer.schedules."""
    c = math.ceil(T / M)
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % c) / c) + 1)


def reference_lua_lr(epoch: int, iteration: int, lr0: float, epochs: int, M: int, n_batches: int) -> float:
    """gaohuang/SnapshotEnsemble train.lua, learningRateCosine, transcribed line by line
    (epoch and iteration count from 1, as in Lua):

        nEpochs_sub  = floor(nEpochs / nCycles)
        nEpochs_last = nEpochs - (nCycles - 1) * nEpochs_sub
        nEpochs_cur  = (epoch > (nCycles - 1) * nEpochs_sub) and nEpochs_last or nEpochs_sub
        T_total = nEpochs_cur * nBatches
        T_cur   = ((epoch - 1) % nEpochs_cur) * nBatches + iter
        return 0.5 * LR * (1 + cos(pi * T_cur / T_total))
    """
    n_sub = math.floor(epochs / M)
    n_last = epochs - (M - 1) * n_sub
    n_cur = n_last if epoch > (M - 1) * n_sub else n_sub
    t_total = n_cur * n_batches
    t_cur = ((epoch - 1) % n_cur) * n_batches + iteration
    return 0.5 * lr0 * (1 + math.cos(math.pi * t_cur / t_total))


def reference_snapshot_lr(t: int, lr0: float, epochs: int, M: int, spe: int) -> float:
    """Our step t in the reference's terms: its epoch and iteration, with the reference's T_cur
    one lower (we keep the issue's (t-1): lr0 at a cycle's first step, not exactly 0 at its last)."""
    epoch, iteration = (t - 1) // spe + 1, (t - 1) % spe + 1
    return reference_lua_lr(epoch, iteration - 1, lr0, epochs, M, spe)


@pytest.mark.parametrize(("epochs", "M", "spe"), [(40, 5, 17), (20, 4, 5), (6, 3, 1), (5, 5, 7), (7, 1, 3)])
def test_snapshot_matches_the_paper_formula_when_cycles_divide_the_budget(epochs: int, M: int, spe: int) -> None:
    T = epochs * spe
    schedule = CyclicCosineSchedule(lr0=0.1, total_steps=T, cycles=M, steps_per_epoch=spe)
    for t in range(1, T + 1):
        assert schedule.lr(t) == pytest.approx(paper_lr(t, 0.1, T, M), abs=1e-15)
    assert schedule.member_steps() == [k * T // M for k in range(1, M + 1)]


# The reference's own cycle lengths (n_sub = floor(B/M), the last cycle absorbs the rest) where
# its formula is self-consistent: (M-1)*n_sub is a multiple of n_last, so (epoch-1) mod n_last
# counts from the last cycle's start. 8/3: cycles 2, 2, 4; 12/5: 2, 2, 2, 2, 4; 4/3: 1, 1, 2; 6/4: 1, 1, 1, 3.
@pytest.mark.parametrize(("epochs", "M", "spe"), [(8, 3, 4), (12, 5, 3), (4, 3, 7), (6, 4, 2)])
def test_snapshot_last_cycle_absorbs_the_leftover_epochs_as_the_reference_does(epochs: int, M: int,
                                                                                spe: int) -> None:
    T = epochs * spe
    schedule = CyclicCosineSchedule(lr0=0.2, total_steps=T, cycles=M, steps_per_epoch=spe)
    for t in range(1, T + 1):
        assert schedule.lr(t) == pytest.approx(reference_snapshot_lr(t, 0.2, epochs, M, spe), abs=1e-15)
    # the reference's snapshots: epochs c * n_sub for c < M, then the last epoch B
    n_sub = epochs // M
    assert schedule.member_steps() == [c * n_sub * spe for c in range(1, M)] + [T]
    assert T - schedule.member_steps()[-2] > n_sub * spe or epochs % M == 0  # the last cycle is the longer


@pytest.mark.parametrize(("epochs", "M", "spe"), [(10, 3, 4), (42, 5, 3), (7, 6, 2), (11, 4, 1)])
def test_snapshot_last_cycle_where_the_reference_restarts_mid_cycle(epochs: int, M: int, spe: int) -> None:
    """Elsewhere the reference's (epoch-1) mod n_last does not count from the last cycle's start:
    its LR jumps back up inside the last cycle (10/3: cycles 3, 3, 4 epochs, but the reference
    restarts at epoch 9, not 7). We keep its cycle lengths and snapshots and run the cosine over
    the last cycle from its start (docs/trainer.md)."""
    T = epochs * spe
    schedule = CyclicCosineSchedule(lr0=0.2, total_steps=T, cycles=M, steps_per_epoch=spe)
    n_sub, n_last = epochs // M, epochs - (M - 1) * (epochs // M)
    start = (M - 1) * n_sub * spe  # steps before the last cycle
    assert schedule.member_steps() == [c * n_sub * spe for c in range(1, M)] + [T]
    for t in range(1, start + 1):  # the full cycles: the reference, step for step
        assert schedule.lr(t) == pytest.approx(reference_snapshot_lr(t, 0.2, epochs, M, spe), abs=1e-15)
    last = [schedule.lr(t) for t in range(start + 1, T + 1)]
    assert last[0] == 0.2 and all(a > b for a, b in zip(last, last[1:]))  # one cosine from lr0 down
    assert last == pytest.approx([0.1 * (math.cos(math.pi * i / (n_last * spe)) + 1) for i in range(len(last))],
                                 abs=1e-15)
    reference = [reference_snapshot_lr(t, 0.2, epochs, M, spe) for t in range(start + 1, T + 1)]
    assert any(b > a for a, b in zip(reference, reference[1:]))  # the reference's restart inside the cycle


def test_snapshot_refuses_only_budgets_shorter_than_one_epoch_per_cycle() -> None:
    CyclicCosineSchedule(lr0=0.1, total_steps=6 * 17, cycles=6, steps_per_epoch=17)  # was refused before
    with pytest.raises(ConfigError, match="members=6 cycles need at least 6 epochs, the budget has 5"):
        CyclicCosineSchedule(lr0=0.1, total_steps=5 * 17, cycles=6, steps_per_epoch=17)
    with pytest.raises(ConfigError, match="lr"):
        CyclicCosineSchedule(lr0=0.0, total_steps=10, cycles=2)


def reference_linear(t: float, lr0: float, ratio: float) -> float:
    """timgaripov/swa train.py's schedule(t) for t = epoch / horizon."""
    if t <= 0.5:
        return lr0
    if t <= 0.9:
        return lr0 * (1.0 - (1.0 - ratio) * (t - 0.5) / 0.4)
    return lr0 * ratio


def fge_paper_lr(i: int, c: int, a1: float, a2: float) -> float:
    """Garipov et al. 2018, section 4: t(i) = (mod(i-1, c)+1)/c."""
    t = ((i - 1) % c + 1) / c
    return (1 - 2 * t) * a1 + 2 * t * a2 if t <= 0.5 else (2 - 2 * t) * a2 + (2 * t - 1) * a1


def test_fge_schedule_at_every_iteration() -> None:
    spe, epochs = 5, 20
    T, P, C = epochs * spe, 16 * spe, 2 * spe
    schedule = FGESchedule(lr0=0.1, total_steps=T, start_step=P, cycle_steps=C, lr1=0.05, lr2=0.01)
    for t in range(1, P + 1):  # pre-training: the reference decay over the WHOLE budget, cut at 80%
        assert schedule.lr(t) == pytest.approx(reference_linear((t - 1) / T, 0.1, 0.01), abs=1e-15)
    for t in range(P + 1, T + 1):
        assert schedule.lr(t) == pytest.approx(fge_paper_lr(t - P, C, 0.05, 0.01), abs=1e-15)
    members = schedule.member_steps()
    assert members == [P + 5, P + 15]  # the end of the first epoch of each 2-epoch cycle
    assert all(schedule.lr(m) == 0.01 for m in members)  # exactly alpha2 (ALGORITHMS.md 7.1)
    assert schedule.lr(P + C) == pytest.approx(0.05) and schedule.lr(T) == pytest.approx(0.05)
    assert max(schedule.lr(t) for t in range(P + 1, T + 1)) <= 0.05


def test_fge_phase_is_whole_cycles_and_counts_in_the_budget() -> None:
    config = TrainConfig(out="x", method="fge", epochs=23, fge_cycle=4)
    assert fge_phase_epochs(config) == (19, 4)  # round(0.8*23) = 18 leaves 5: one cycle, 1 epoch to pre-training
    assert fge_phase_epochs(TrainConfig(out="x", method="fge", epochs=20)) == (16, 4)
    assert fge_phase_epochs(config, pretrained_epochs=15) == (15, 8)
    with pytest.raises(ConfigError, match="whole number of fge_cycle=4-epoch cycles"):
        fge_phase_epochs(config, pretrained_epochs=16)
    with pytest.raises(ConfigError, match="fewer than one cycle"):
        fge_phase_epochs(TrainConfig(out="x", method="fge", epochs=3, fge_cycle=4))
    with pytest.raises(ConfigError, match="fge_cycle must be an even number"):
        TrainConfig(out="x", method="fge", fge_cycle=3)
    with pytest.raises(ConfigError, match="fge takes one member per 2-epoch cycle: 2"):
        build_method(TrainConfig(out="x", method="fge", epochs=20, members=3), MethodContext(5))


def test_swa_schedule_constant_and_cyclic() -> None:
    spe, T, S = 4, 80, 60
    constant = SWASchedule(lr0=0.1, total_steps=T, start_step=S, swa_lr=0.05, average_every=spe)
    for t in range(1, S + 1):  # the reference: t = epoch / swa_start, down to swa_lr by 90%
        assert constant.lr(t) == pytest.approx(reference_linear((t - 1) / S, 0.1, 0.5), abs=1e-15)
    assert all(constant.lr(t) == 0.05 for t in range(S + 1, T + 1))
    assert constant.member_steps() == list(range(S, T + 1, spe))  # from swa_start, once per epoch
    cyclic = SWASchedule(lr0=0.1, total_steps=T, start_step=S, swa_lr=0.01, average_every=spe,
                         cycle_steps=2 * spe, swa_lr_max=0.05)
    for t in range(S + 1, T + 1):  # Izmailov et al.: (1 - t) alpha1 + t alpha2 within each cycle
        u = ((t - S - 1) % 8 + 1) / 8
        assert cyclic.lr(t) == pytest.approx((1 - u) * 0.05 + u * 0.01, abs=1e-15)
    assert cyclic.member_steps() == [68, 76]
    assert all(cyclic.lr(m) == pytest.approx(0.01) for m in cyclic.member_steps())  # averaged at the minimum


def test_step_decay_is_the_paper_single_model_schedule() -> None:
    schedule = StepDecaySchedule(lr0=0.1, total_steps=100)
    assert [schedule.lr(t) for t in (1, 50, 51, 75, 76, 100)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert step_decay_lr(51, 1.0, 100, milestones=(0.5,), gamma=0.5) == 0.5
    assert schedule.member_steps() == [100]


def test_every_method_name_has_a_builder_whose_collector_follows_its_schedule() -> None:
    assert tuple(METHODS) == METHOD_NAMES == tuple(DEFAULT_MEMBERS)
    for name in METHOD_NAMES:
        config = TrainConfig(out="x", method=name, epochs=10)
        method = build_method(config, MethodContext(steps_per_epoch=3))
        assert method.name == name and method.collector.steps == tuple(method.schedule.member_steps())


def _small_run(digits: Dataset, config: TrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.from_numpy(digits.normalize(digits.train.x[:300]))
    y = torch.from_numpy(digits.train.y[:300])
    batches = TensorBatches(x, y, batch_size=64, seed=seed)  # 300 = 4*64 + 44: 5 steps per epoch
    method = build_method(config, MethodContext(len(batches), bn_batches=batches.inputs))
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    seen_lrs: list[float] = []
    original_step = optimizer.step

    def recording_step(*args, **kwargs):  # what the optimizer actually used, step by step
        seen_lrs.append(optimizer.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    optimizer.step = recording_step
    result = train_loop(model, optimizer, batches, method.schedule, method.collector)
    return method, model, result, seen_lrs


def test_loop_applies_the_snapshot_schedule_per_iteration_and_collects_at_cycle_ends(digits: Dataset) -> None:
    config = TrainConfig(out="x", method="snapshot", epochs=5, members=3)
    method, model, result, seen_lrs = _small_run(digits, config)
    assert method.schedule.total_steps == 25  # 5 epochs x 5 steps; cycles of 1, 1 and 3 epochs
    expected = [method.schedule.lr(t) for t in range(1, 26)]  # pinned to the reference above
    assert result.lrs == pytest.approx(expected, abs=1e-15)
    assert seen_lrs == pytest.approx(expected, abs=1e-15)
    members = method.collector.members()
    assert [m.step for m in members] == [5, 10, 25]
    assert len(result.epoch_losses) == 5
    # The last member is the final model; earlier ones are frozen copies, not references.
    final = model.state_dict()
    assert all(torch.equal(final[k], members[-1].state_dict[k]) for k in final)
    assert not all(torch.equal(final[k], members[0].state_dict[k]) for k in final)


def test_loop_takes_fge_members_at_mid_cycle_minima(digits: Dataset) -> None:
    config = TrainConfig(out="x", method="fge", epochs=10, fge_start=0.6, lr=0.05)
    method, _, result, seen_lrs = _small_run(digits, config)
    assert [m.step for m in method.collector.members()] == [35, 45]  # 6 epochs pre-training, 2 cycles
    assert seen_lrs[34] == seen_lrs[44] == pytest.approx(0.005) == min(seen_lrs[30:])
    assert seen_lrs == pytest.approx([method.schedule.lr(t) for t in range(1, 51)], abs=1e-15)


def test_loop_feeds_swa_the_weights_of_each_epoch_from_swa_start(digits: Dataset) -> None:
    config = TrainConfig(out="x", method="swa", epochs=8, swa_start=0.75, arch="mlp")
    method, model, result, seen_lrs = _small_run(digits, config)
    collector = method.collector
    assert isinstance(collector, AveragingCollector)
    assert collector.steps == (30, 35, 40) and collector.n == 3 and collector.last_step == 40
    assert seen_lrs[30:] == [0.05] * 10


def test_same_seed_same_members(digits: Dataset) -> None:
    config = TrainConfig(out="x", method="snapshot", epochs=2, members=2)
    first, *_ = _small_run(digits, config, seed=3)
    second, *_ = _small_run(digits, config, seed=3)
    for a, b in zip(first.collector.members(), second.collector.members()):
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


def test_distributed_shards_are_disjoint_and_make_up_the_global_batch(digits: Dataset) -> None:
    x = torch.from_numpy(digits.normalize(digits.train.x[:203]))
    y = torch.arange(203)  # labels = example ids, to see which examples each process gets
    one = TensorBatches(x, y, batch_size=64, seed=1)
    shards = [TensorBatches(x, y, batch_size=64, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(one) == len(shards[0]) == 4  # the same global steps: 203 = 3*64 + 11
    for whole, *parts in zip(one.epoch(3), *(s.epoch(3) for s in shards)):
        ids = [set(p.y.tolist()) for p in parts]
        assert not ids[0] & ids[1] and ids[0] | ids[1] == set(whole.y.tolist())
        # each process's mean loss is weighted by its share: together, the global batch's mean
        assert sum(p.loss_weight for p in parts) / 2 == pytest.approx(1.0)
    inputs = [torch.cat(list(s.inputs())) for s in shards]
    assert len(inputs[0]) + len(inputs[1]) == 203
