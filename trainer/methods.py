"""A method is a (schedule, collector) pair handed to the one training loop.

    snapshot  cosine cycles with warm restarts, a member at the end of each    (Huang et al. 2017)
    fge       pre-training, then short linear cycles, a member at each minimum (Garipov et al. 2018)
    swa       pre-training, then a high constant/cyclic LR, one averaged member (Izmailov et al. 2018)
    swag      SWA plus a low-rank Gaussian over the weights, S sampled members (Maddox et al. 2019)
    swag-diag SWAG with the diagonal Gaussian alone (the paper's SWAG-Diag), S sampled members
    single    the ordinary baseline at the same budget, one member: step decay (the SSE paper's),
              linear decay to 1 % (the FGE/SWA reference's) or one cosine cycle (SSE's single cycle)

Budgets are whole epochs; every phase boundary falls at the end of an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from snapserve.trainer.collectors import AveragingCollector, StepCollector
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.loop import Collector, Schedule
from snapserve.trainer.schedules import (CyclicCosineSchedule, FGESchedule, LinearDecaySchedule, StepDecaySchedule,
                                         SWASchedule)

__all__ = ["METHODS", "Method", "MethodContext", "build_method", "fge_phase_epochs"]

BNBatches = Callable[[], Iterable[torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    schedule: Schedule
    collector: Collector


@dataclass(frozen=True)
class MethodContext:
    """What a builder needs beyond the config."""

    steps_per_epoch: int
    bn_batches: BNBatches | None = None  # training inputs for SWA/SWAG's BatchNorm pass
    distributed: bool = False
    keep_members: bool = True  # False on DDP processes other than 0: they never export
    pretrained_epochs: int | None = None  # FGE from a checkpoint: the epochs it already trained


def snapshot_method(config: TrainConfig, context: MethodContext) -> Method:
    """Snapshot Ensembles: M cosine cycles of floor(B/M) epochs (the last takes the rest)."""
    schedule = CyclicCosineSchedule(lr0=config.lr, total_steps=config.epochs * context.steps_per_epoch,
                                    cycles=_members(config), steps_per_epoch=context.steps_per_epoch)
    return Method("snapshot", schedule, StepCollector(schedule.member_steps(), keep=context.keep_members))


def fge_phase_epochs(config: TrainConfig, pretrained_epochs: int | None = None) -> tuple[int, int]:
    """(pre-training epochs, FGE epochs). The FGE phase is a whole number of cycles: epochs that
    do not fill a cycle go to pre-training. From a checkpoint, its epochs are the pre-training
    and count in the budget (ALGORITHMS.md: FGE's warm start is part of the budget)."""
    cycle = config.fge_cycle
    if pretrained_epochs is None:
        pretrain = round(config.fge_start * config.epochs)
        fge = (config.epochs - pretrain) // cycle * cycle
        pretrain = config.epochs - fge
    else:
        pretrain = pretrained_epochs
        fge = (config.epochs - pretrain) // cycle * cycle
        if pretrain + fge != config.epochs:
            raise ConfigError(f"epochs={config.epochs}: after the checkpoint's {pretrain} epochs, the FGE "
                              f"phase must be a whole number of fge_cycle={cycle}-epoch cycles; use "
                              f"epochs={pretrain + max(fge, cycle)}")
    if fge < cycle:
        raise ConfigError(f"fge: the budget of {config.epochs} epochs leaves {config.epochs - pretrain} "
                          f"for FGE, fewer than one cycle of fge_cycle={cycle}: train more epochs "
                          "or lower fge_start")
    return pretrain, fge


def fge_method(config: TrainConfig, context: MethodContext) -> Method:
    """FGE: the reference pre-training schedule, then cycles of fge_cycle epochs; members at
    the mid-cycle minima (LR exactly alpha2), taken without any BatchNorm update (as in fge.py)."""
    spe = context.steps_per_epoch
    pretrain, _ = fge_phase_epochs(config, context.pretrained_epochs)
    lr1, lr2 = config.fge_lrs()
    schedule = FGESchedule(lr0=config.lr, total_steps=config.epochs * spe, start_step=pretrain * spe,
                           cycle_steps=config.fge_cycle * spe, lr1=lr1, lr2=lr2)
    if config.members is not None and config.members != len(schedule.member_steps()):
        raise ConfigError(f"members={config.members}, but fge takes one member per {config.fge_cycle}-epoch "
                          f"cycle: {len(schedule.member_steps())} in this budget (set fge_start or "
                          "epochs instead, or keep_last)")
    return Method("fge", schedule, StepCollector(schedule.member_steps(), keep=context.keep_members))


def _swa_schedule(config: TrainConfig, context: MethodContext) -> SWASchedule:
    spe = context.steps_per_epoch
    start_epoch = max(1, round(config.swa_start * config.epochs))
    return SWASchedule(lr0=config.lr, total_steps=config.epochs * spe, start_step=start_epoch * spe,
                       swa_lr=config.swa_lr_value(), average_every=spe,
                       cycle_steps=config.swa_cycle * spe,
                       swa_lr_max=config.swa_lr_max if config.swa_lr_max is not None else config.lr)


def swa_method(config: TrainConfig, context: MethodContext) -> Method:
    """SWA: the reference schedule, an equal average once per epoch (or cycle) from swa_start."""
    if config.members not in (None, 1):
        raise ConfigError(f"members must be 1 for method 'swa' (one averaged model), got {config.members}")
    schedule = _swa_schedule(config, context)
    collector = AveragingCollector(schedule.member_steps(), context.bn_batches,
                                   distributed=context.distributed)
    return Method("swa", schedule, collector)


def swag_method(config: TrainConfig, context: MethodContext) -> Method:
    """SWAG: SWA's schedule and collection plus the variance and K deviations; S samples."""
    return _gaussian_method("swag", config, context, config.swag_rank)


def swag_diag_method(config: TrainConfig, context: MethodContext) -> Method:
    """SWAG-Diag: SWAG with the diagonal variance alone (no deviation columns), scale 1."""
    return _gaussian_method("swag-diag", config, context, 0)


def _gaussian_method(name: str, config: TrainConfig, context: MethodContext, rank: int) -> Method:
    schedule = _swa_schedule(config, context)
    assert config.swag_scale is not None  # TrainConfig fills it in for the SWAG methods
    collector = AveragingCollector(schedule.member_steps(), context.bn_batches,
                                   swag_rank=rank, samples=_members(config),
                                   scale=config.swag_scale, seed=config.seed,
                                   distributed=context.distributed)
    return Method(name, schedule, collector)


def single_method(config: TrainConfig, context: MethodContext) -> Method:
    """The baseline at the same budget, one member at the end: each paper's own schedule
    (`single_schedule`), so every method is compared with the baseline its paper used."""
    if config.members not in (None, 1):
        raise ConfigError(f"members must be 1 for method 'single', got {config.members}")
    total = config.epochs * context.steps_per_epoch
    schedule: StepDecaySchedule | LinearDecaySchedule | CyclicCosineSchedule
    if config.single_schedule == "linear":
        schedule = LinearDecaySchedule(lr0=config.lr, total_steps=total)
    elif config.single_schedule == "cosine":
        schedule = CyclicCosineSchedule(lr0=config.lr, total_steps=total, cycles=1,
                                        steps_per_epoch=context.steps_per_epoch)
    else:
        schedule = StepDecaySchedule(lr0=config.lr, total_steps=total)
    return Method("single", schedule, StepCollector(schedule.member_steps(), keep=context.keep_members))


# One builder per name in config.METHOD_NAMES, in its order (the config validated the name).
METHODS: dict[str, Callable[[TrainConfig, MethodContext], Method]] = {
    "snapshot": snapshot_method,
    "fge": fge_method,
    "swa": swa_method,
    "swag": swag_method,
    "swag-diag": swag_diag_method,
    "single": single_method,
}


def _members(config: TrainConfig) -> int:
    """The member count of snapshot and the SWAG methods, which TrainConfig always fills in."""
    assert config.members is not None
    return config.members


def build_method(config: TrainConfig, context: MethodContext) -> Method:
    return METHODS[config.method](config, context)
