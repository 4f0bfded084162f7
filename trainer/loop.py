"""The one training loop. Every method runs through it as a (schedule, collector) pair.

Steps count optimizer updates from 1. Before update t the loop sets the LR to `schedule.lr(t)`;
after it, it asks the collector whether to keep a member. The data order (and augmentation) of
epoch e depends only on (seed, e), so a run resumed at any step (`start_step`) sees the same
batches as an unbroken one. The loop never picks a device: the model and the batches arrive
where they should run.

Under DistributedDataParallel every process runs this same loop on its shard of each global
batch (`TensorBatches(rank=, world_size=)`); steps, schedules and collection are global, so a
run with N processes takes the same steps, at the same LRs, as a run with one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from snapserve.trainer.augment import random_crop_flip
from snapserve.trainer.collectors import Member
from snapserve.trainer.errors import TrainingDiverged
from snapserve.trainer.progress import Progress

__all__ = ["Batch", "Collector", "EpochEnd", "LoopResult", "Precision", "Schedule", "TensorBatches",
           "set_lr", "train_loop", "train_step", "unwrap"]

logger = logging.getLogger(__name__)


class Schedule(Protocol):
    """What the loop needs of a schedule: the budget and a pure LR per step (from 1)."""

    total_steps: int

    def lr(self, step: int) -> float: ...

    def member_steps(self) -> list[int]: ...


class Collector(Protocol):
    """What the loop needs of a collector: when to take weights, and the members after the loop.

    `members(model)` gets the trained (unwrapped) model, the template SWA/SWAG load their
    averages or samples into; `state_dict()` goes into every checkpoint.
    """

    steps: tuple[int, ...]

    @property
    def collected(self) -> int: ...

    def should_collect(self, step: int) -> bool: ...

    def collect(self, model: nn.Module, step: int) -> None: ...

    def members(self, model: nn.Module) -> list[Member]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    # This process's share of the global batch times the number of processes: DDP averages
    # gradients over processes, so weighting each local mean loss by it gives exactly the
    # gradient of the global batch's mean loss, even when the shards differ in size. 1 alone.
    loss_weight: float = 1.0


# The permutation stream of the BatchNorm pass: (seed, _BN_STREAM) is no (seed, epoch) of training
# (2**62 epochs never run).
_BN_STREAM = 2**62


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class TensorBatches:
    """Shuffled mini-batches of an in-memory dataset, already on the training device.

    `batch_size` is the GLOBAL batch: with `world_size` processes, process `rank` takes its
    part of every batch of the epoch's permutation (disjoint shards; together, the same batches
    one process would train on). A last batch smaller than 2 examples per process is left out
    of that epoch: BatchNorm cannot train on a batch of one (it has no batch variance).

    `augment_fill` ([C], normalized black) turns on the random crop + flip augmentation.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", *, rank: int = 0, world_size: int = 1,
                 augment_fill: torch.Tensor | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        if batch_size < 2 * world_size:
            raise ValueError(f"batch_size {batch_size} gives fewer than 2 examples to each of {world_size} processes")
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.augment_fill = None if augment_fill is None else augment_fill.to(device)
        remainder = len(y) % batch_size
        self._usable = len(y) - remainder if 0 < remainder < 2 * world_size else len(y)
        self.steps_per_epoch = math.ceil(self._usable / batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _shard(self, batch: torch.Tensor) -> torch.Tensor:
        n = len(batch)
        return batch[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]

    def _order(self, *stream: int) -> torch.Tensor:
        """A permutation of the usable examples, fixed by (seed, *stream), on the device."""
        order = np.random.default_rng([self.seed, *stream]).permutation(len(self.y))[: self._usable]
        return torch.from_numpy(order).to(self.x.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start`.. of epoch `epoch` (from 0), in an order fixed by (seed, epoch)."""
        index = self._order(epoch)
        for i in range(start, self.steps_per_epoch):
            batch = index[i * self.batch_size:(i + 1) * self.batch_size]
            local = self._shard(batch)
            x = self.x[local]
            if self.augment_fill is not None:
                generator = torch.Generator(device=x.device).manual_seed(_seed(self.seed, epoch, i, self.rank))
                x = random_crop_flip(x, generator, self.augment_fill)
            yield Batch(x, self.y[local], len(local) * self.world_size / len(batch))

    def inputs(self) -> Iterator[torch.Tensor]:
        """This process's share of each batch of the training inputs, without augmentation: for
        BatchNorm statistics (SWA/SWAG), which should describe what the served model sees.

        In a seeded permutation, never the stored order: with momentum=None each batch's own
        variance is averaged, so batches of one class each (a class-sorted .npz or image folder)
        would give running variances far below the data's. The reference passes a shuffled
        loader. The permutation is fixed (its own stream of the seed, not an epoch's), so a
        resumed run recomputes the same statistics, and it is the same on every process, whose
        shards of each batch are disjoint. Every process gets the same number of batches.
        """
        index = self._order(_BN_STREAM)
        for start in range(0, self._usable, self.batch_size):
            yield self.x[self._shard(index[start:start + self.batch_size])]


@dataclass(frozen=True)
class Precision:
    """Mixed precision and memory layout for a training step.

    `dtype` bf16/fp16 runs the forward pass under autocast (weights, gradients and the optimizer
    stay float32); fp16 needs `scaler` (a GradScaler) against gradient underflow. channels_last
    helps convolutions on tensor cores; inputs are converted per batch.
    """

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


@dataclass(frozen=True)
class EpochEnd:
    """What the loop hands to `on_epoch_end` after each epoch (1-based)."""

    epoch: int
    step: int
    loss: float
    accuracy: float
    lr: float
    seconds: float


@dataclass
class LoopResult:
    lrs: list[float] = field(default_factory=list)  # lrs[i]: the LR of step start_step + i + 1
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (collect and save this one)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               precision: Precision | None = None, loss_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One update; returns the detached loss and the number of correct predictions.

    Both stay on the device: reading them every step would sync a GPU each iteration.
    """
    precision = precision or Precision()
    if precision.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    scaled = loss * loss_weight if loss_weight != 1.0 else loss
    if precision.scaler is not None:
        precision.scaler.scale(scaled).backward()
        precision.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        precision.scaler.update()
    else:
        scaled.backward()
        optimizer.step()
    return loss.detach(), (logits.detach().argmax(dim=1) == y).sum()


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: TensorBatches,
               schedule: Schedule, collector: Collector, *, start_step: int = 0,
               precision: Precision | None = None, progress: Progress | None = None,
               on_epoch_end: Callable[[EpochEnd], None] | None = None) -> LoopResult:
    """Runs updates start_step+1 .. schedule.total_steps. The model is left in train mode.

    `on_epoch_end` observes each finished epoch (evaluation, checkpoints); it must not change
    the model or the optimizer. A NaN or infinite loss stops the run at the end of its epoch
    with TrainingDiverged, before anything of that epoch is checkpointed.
    """
    result = LoopResult()
    steps_per_epoch = len(batches)
    progress = progress or Progress(schedule.total_steps, steps_per_epoch, live=False)
    distributed = batches.world_size > 1 and dist.is_available() and dist.is_initialized()
    step = start_step
    began = time.perf_counter()
    while step < schedule.total_steps:
        model.train()
        epoch = step // steps_per_epoch
        epoch_began = time.perf_counter()
        losses, correct, seen = [], None, 0
        for x, y, weight in batches.epoch(epoch, start=step - epoch * steps_per_epoch):
            step += 1
            lr = schedule.lr(step)
            set_lr(optimizer, lr)
            result.lrs.append(lr)
            loss, hits = train_step(model, optimizer, x, y, precision, weight)
            losses.append(loss)
            correct = hits if correct is None else correct + hits
            seen += len(y)
            if collector.should_collect(step):
                collector.collect(unwrap(model), step)
            progress.step(step, loss, lr, collector.collected)
            if step == schedule.total_steps:
                break
        mean_loss, accuracy = _epoch_summary(losses, correct, seen, epoch + 1, step, distributed)
        result.epoch_losses.append(mean_loss)
        progress.epoch(epoch + 1, step, mean_loss, accuracy, lr, collector.collected)
        if on_epoch_end is not None:
            on_epoch_end(EpochEnd(epoch + 1, step, mean_loss, accuracy, lr, time.perf_counter() - epoch_began))
    result.seconds = time.perf_counter() - began
    return result


def _epoch_summary(losses: list[torch.Tensor], correct: torch.Tensor | None, seen: int, epoch: int,
                   last_step: int, distributed: bool) -> tuple[float, float]:
    """Mean loss and accuracy of the epoch (over all processes): one sync per epoch. Raises
    TrainingDiverged naming the first step whose loss was not finite."""
    stacked = torch.stack(losses).float()
    finite = torch.isfinite(stacked)
    totals = torch.stack([torch.where(finite, stacked, 0.0).sum(), correct.float(),
                          torch.tensor(float(seen), device=stacked.device),
                          (~finite).sum().float(), torch.tensor(float(len(losses)), device=stacked.device)])
    if distributed:
        dist.all_reduce(totals)
    loss_sum, hits, count, bad, steps = totals.tolist()
    if bad:
        first = int(torch.nonzero(~finite)[0, 0]) if not finite.all() else None
        where = f"step {last_step - len(losses) + 1 + first}" if first is not None else "a step on another process"
        raise TrainingDiverged(epoch, where, float(stacked[first]) if first is not None else math.nan)
    return loss_sum / steps, hits / count
