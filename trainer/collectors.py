"""Collectors decide which weights become ensemble members.

The training loop asks `should_collect(step)` after every update and calls `collect(model, step)`
when it says yes; after the loop, `members(model)` returns the members in order. Each collector
has `state_dict()`/`load_state_dict()` so a checkpoint can resume it, and `collected` (how many
weight sets it has taken so far) for progress lines.

- `StepCollector` keeps a copy of the weights (and BatchNorm buffers) at fixed steps: the end of
  each cycle for snapshot ensembles, mid-cycle minima for FGE, the last step for `single`.
- `AveragingCollector` keeps an equal running average of the weights (SWA) and, for SWAG, the
  running variance (Welford's) and the last K deviations. Its `members(model)` recomputes BatchNorm
  statistics on the training data for the average (SWA) and for every sample (SWAG): averaged
  or sampled weights were never used in a forward pass, so the running statistics the training
  kept do not belong to them (Izmailov et al. 2018; the SWAG code runs bn_update per sample).

Everything a collector keeps lives on the CPU in float32, whatever the training device and
precision: the average is never taken in reduced precision, and GPU memory is left to training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["AveragingCollector", "Member", "StepCollector", "cpu_state_dict", "update_bn"]

logger = logging.getLogger(__name__)

# SWAG's variance floor (wjmaddox/swa_gaussian var_clamp): E[w^2] - E[w]^2 can round below 0.
VAR_CLAMP = 1e-30


@dataclass(frozen=True)
class Member:
    """One ensemble member: its weights on the CPU, the step they belong to, and extra manifest
    fields (`averaged_models` for SWA/SWAG, `sample` for SWAG)."""

    step: int
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of the weights and buffers, safe from later updates."""
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in model.state_dict().items()}


class StepCollector:
    """Keeps a copy of the model after each of the given steps.

    `keep=False` (DDP processes other than 0, which never export) only counts: holding M copies
    of a large model on every process would multiply the memory by the number of processes.
    """

    def __init__(self, steps: Iterable[int], keep: bool = True) -> None:
        self.steps = tuple(sorted(set(steps)))
        self.keep = keep
        self._members: list[Member] = []
        self._count = 0

    @property
    def collected(self) -> int:
        return self._count

    def should_collect(self, step: int) -> bool:
        return step in self.steps

    def collect(self, model: nn.Module, step: int) -> None:
        self._count += 1
        if self.keep:
            self._members.append(Member(step=step, state_dict=cpu_state_dict(model)))

    def members(self, model: nn.Module | None = None) -> list[Member]:
        """The copies in step order; `model` is not needed (the copies are whole)."""
        return list(self._members)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps),
                "members": [{"step": m.step, "state_dict": m.state_dict} for m in self._members]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = tuple(state["steps"])
        self._count = len(state["members"])
        self._members = [Member(step=m["step"], state_dict=m["state_dict"])
                         for m in state["members"]] if self.keep else []


@torch.no_grad()
def update_bn(model: nn.Module, batches: Iterable[torch.Tensor], *, distributed: bool = False) -> int:
    """Recomputes every BatchNorm layer's running statistics with one pass over `batches`.

    The same recipe as torch.optim.swa_utils.update_bn and the reference bn_update: reset,
    momentum=None (an exact cumulative mean over batches), train mode, then the momenta and the
    mode are restored. It runs in float32 without autocast, as the exported graphs do.

    With `distributed`, each process has passed over its own shard; the per-process means are
    then all-reduced, weighted by batch count, which gives what one process would have computed
    over all the batches (and needs no SyncBatchNorm, which has no CPU implementation).
    Returns the number of batches seen (over all processes).
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    count = 0
    try:
        for x in batches:
            model(x)
            count += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    if distributed and dist.is_available() and dist.is_initialized():
        count = _all_reduce_bn(norms, count)
    return count


def _all_reduce_bn(norms: list[nn.modules.batchnorm._BatchNorm], count: int) -> int:
    device = norms[0].running_mean.device
    total = torch.tensor([float(count)], device=device, dtype=torch.float64)
    dist.all_reduce(total)
    for norm in norms:
        for name in ("running_mean", "running_var"):
            buffer = getattr(norm, name)
            weighted = buffer.double() * count
            dist.all_reduce(weighted)
            buffer.copy_((weighted / total).to(buffer.dtype))
        norm.num_batches_tracked.fill_(int(total.item()))
    return int(total.item())


def _flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one float32 CPU vector (reshape, not view: channels_last weights)."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


@torch.no_grad()
def _load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset:offset + n].reshape(p.shape))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"the model has {offset} parameters, the stored vector {flat.numel()}")


class AveragingCollector:
    """SWA's equal running average of the weights at the given steps; with `swag_rank` set,
    SWAG's second moment too (0: SWAG-Diag; K > 0: and the last K deviations), and `samples`
    members drawn from the Gaussian.

    The update is the reference's w_SWA <- (n*w_SWA + w)/(n+1) (an exact mean of the collected
    weights). SWAG (Maddox et al. 2019, wjmaddox/swa_gaussian swag.py) keeps E[w], the spread
    around it and the last K columns D_i = w_i - E[w] (the mean after adding w_i) and samples

        w = E[w] + sqrt(scale) * (sigma * z1 + D^T z2 / sqrt(K-1)),  sigma^2 = max(Var[w], 1e-30)

    with K the number of columns held (the reference divides by its maximum K-1 even before it
    has K columns; the two agree once K columns are stored). With fewer than two columns, or
    K = 0 (SWAG-Diag), there is no low-rank part. Only parameters are averaged; BatchNorm
    statistics are recomputed (`update_bn` on `bn_batches()`), and any other buffers come from
    the final model.

    The variance is Welford's running sum of squared deviations, not the reference's
    E[w^2] - E[w]^2: late in training the weights move by ~1e-4 around values ~1, a variance of
    ~1e-8, which the float32 difference of two numbers ~1 (resolution ~1e-7) rounds to noise.
    """

    def __init__(self, steps: Iterable[int], bn_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
                 *, swag_rank: int | None = None, samples: int = 0, scale: float = 0.5, seed: int = 0,
                 distributed: bool = False) -> None:
        self.steps = tuple(sorted(set(steps)))
        self.bn_batches = bn_batches
        self.swag_rank = swag_rank
        self.samples = samples
        self.scale = scale
        self.seed = seed
        self.distributed = distributed
        self.n = 0
        self.last_step = 0
        self.mean: torch.Tensor | None = None
        self.sq_dev: torch.Tensor | None = None  # sum of (w_i - mean_i-1)(w_i - mean_i): Welford's M2
        self.deviations: list[torch.Tensor] = []

    @property
    def collected(self) -> int:
        return self.n

    def should_collect(self, step: int) -> bool:
        return step in self.steps

    def collect(self, model: nn.Module, step: int) -> None:
        w = _flat_parameters(model)
        if self.mean is None:
            self.mean = torch.zeros_like(w)
        self.n += 1
        delta = w - self.mean
        self.mean += delta / self.n
        if self.swag_rank is not None:
            if self.sq_dev is None:
                self.sq_dev = torch.zeros_like(w)
            self.sq_dev += delta * (w - self.mean)
            if self.swag_rank:
                self.deviations.append(w - self.mean)
                del self.deviations[:-self.swag_rank]
        self.last_step = step

    def variance(self) -> torch.Tensor:
        """SWAG's diagonal: the population variance of the collected weights, floored at 1e-30."""
        assert self.mean is not None and self.sq_dev is not None
        return torch.clamp(self.sq_dev / self.n, min=VAR_CLAMP)

    def sample_parameters(self, generator: torch.Generator, scale: float | None = None,
                          low_rank: bool = True) -> torch.Tensor:
        """One SWAG draw of the flat parameter vector (`low_rank=False`: SWAG-Diag's)."""
        if self.mean is None or self.sq_dev is None:
            raise RuntimeError("sampling needs a SWAG collector (swag_rank set) with collected weights")
        noise = self.variance().sqrt() * torch.randn(self.mean.shape, generator=generator)
        k = len(self.deviations)
        if low_rank and k > 1:
            z = torch.randn(k, generator=generator)
            noise += torch.stack(self.deviations).T @ z / math.sqrt(k - 1)
        return self.mean + math.sqrt(self.scale if scale is None else scale) * noise

    def members(self, model: nn.Module) -> list[Member]:
        """SWA: one member, the average. SWAG: `samples` draws, each with its own BatchNorm pass."""
        if self.swag_rank is None or not self.samples:
            return self.average(model)
        return self.draw(model, self.samples, self.scale, low_rank=self.swag_rank > 0)

    def average(self, model: nn.Module) -> list[Member]:
        """[the SWA member]: the mean, with its BatchNorm statistics ([] before any collection)."""
        return self._members(model, [(self.mean, {})] if self.mean is not None else [])

    def draw(self, model: nn.Module, samples: int, scale: float, *, low_rank: bool = True) -> list[Member]:
        """`samples` seeded SWAG draws (SWAG-Diag's without `low_rank`), each with its own
        BatchNorm pass. The seeds depend only on (seed, i), so every process, and SWAG and
        SWAG-Diag of one run, draw with the same noise."""
        if self.mean is None:
            return []
        return self._members(model, [
            (self.sample_parameters(torch.Generator().manual_seed(self.seed * 100_003 + i), scale, low_rank),
             {"sample": i}) for i in range(samples)])

    def _members(self, model: nn.Module, vectors: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[Member]:
        """`model` (the trained model, unwrapped) is the template: each set of weights is loaded
        into it, its BatchNorm statistics recomputed and a copy taken; its own weights are
        restored afterwards. Under DDP every process must call this (the statistics are
        all-reduced)."""
        original = cpu_state_dict(model)
        members = []
        try:
            for flat, info in vectors:
                _load_flat_parameters(model, flat)
                if self.bn_batches is not None:
                    update_bn(model, self.bn_batches(), distributed=self.distributed)
                members.append(Member(step=self.last_step, state_dict=cpu_state_dict(model),
                                      info={"averaged_models": self.n, **info}))
        finally:
            model.load_state_dict(original)
        return members

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "n": self.n, "last_step": self.last_step,
                "mean": self.mean, "sq_dev": self.sq_dev, "deviations": list(self.deviations)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = tuple(state["steps"])
        self.n, self.last_step = state["n"], state["last_step"]
        self.mean = state["mean"]
        self.sq_dev = state.get("sq_dev")
        if state.get("sq_mean") is not None:  # a checkpoint of the E[w^2] form, before Welford
            self.sq_dev = (state["sq_mean"] - self.mean**2).clamp(min=0) * self.n
        if self.sq_dev is None and self.swag_rank is not None and self.mean is not None:
            self.sq_dev = torch.zeros_like(self.mean)
        self.deviations = list(state["deviations"])
