"""The one training loop. Every method runs through it as a (schedule, collector) pair.

Steps count optimizer updates from 1. Before update t the loop sets the LR to `schedule.lr(t)`;
after it, it asks the collector whether to keep a member. The data order of epoch e depends only
on (seed, e), so a run resumed at any step (`start_step`) sees the same batches as an unbroken one.
The loop never picks a device: the model and the batches arrive where they should run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.collectors import StepCollector
from trainer.methods import Schedule

__all__ = ["LoopResult", "TensorBatches", "set_lr", "train_loop", "train_step"]

logger = logging.getLogger(__name__)


class TensorBatches:
    """Shuffled mini-batches of an in-memory dataset, already on the training device.

    When N mod batch_size == 1 the odd example is left out of that epoch: a batch of one
    cannot be trained with BatchNorm (it has no batch variance).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.seed = seed
        usable = len(y) - 1 if len(y) % batch_size == 1 and len(y) > 1 else len(y)
        self.steps_per_epoch = math.ceil(usable / batch_size)
        self._usable = usable

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`.. of epoch `epoch` (from 0), in an order fixed by (seed, epoch)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.y))[: self._usable]
        index = torch.from_numpy(order).to(self.x.device)
        for i in range(start, self.steps_per_epoch):
            batch = index[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[batch], self.y[batch]


@dataclass
class LoopResult:
    lrs: list[float] = field(default_factory=list)  # lrs[i]: the LR of step start_step + i + 1
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One update; returns the detached loss and the number of correct predictions.

    Both stay on the device: reading them every step would sync a GPU each iteration.
    """
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(dim=1) == y).sum()


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: TensorBatches,
               schedule: Schedule, collector: StepCollector, *, start_step: int = 0) -> LoopResult:
    """Runs updates start_step+1 .. schedule.total_steps. The model is left in train mode."""
    result = LoopResult()
    steps_per_epoch = len(batches)
    step = start_step
    began = time.perf_counter()
    model.train()
    while step < schedule.total_steps:
        epoch = step // steps_per_epoch
        loss_sum, correct, seen, steps = None, None, 0, 0
        for x, y in batches.epoch(epoch, start=step - epoch * steps_per_epoch):
            step += 1
            lr = schedule.lr(step)
            set_lr(optimizer, lr)
            result.lrs.append(lr)
            loss, hits = train_step(model, optimizer, x, y)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            correct = hits if correct is None else correct + hits
            seen, steps = seen + len(y), steps + 1
            if collector.should_collect(step):
                collector.collect(model, step)
            if step == schedule.total_steps:
                break
        mean_loss = float(loss_sum) / steps  # one sync per epoch
        result.epoch_losses.append(mean_loss)
        logger.info("epoch %d/%d  step %d  loss %.4f  train_acc %.4f  lr %.5f  members %d",
                    epoch + 1, math.ceil(schedule.total_steps / steps_per_epoch), step, mean_loss,
                    float(correct) / seen, lr, len(collector.members()))
    result.seconds = time.perf_counter() - began
    return result
