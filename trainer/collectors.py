"""Collectors decide which weights become ensemble members.

The training loop asks `should_collect(step)` after every update and calls `collect(model, step)`
when it says yes; after the loop, `members()` returns the members in order. Each collector has
`state_dict()`/`load_state_dict()` so a checkpoint can resume it.

`StepCollector` keeps a copy of the weights (and BatchNorm buffers) at fixed steps: the end of
each cycle for snapshot ensembles, the last step for `single`, mid-cycle minima for FGE. A
running-average collector for SWA/SWAG will take the training batches in its constructor so
that `members()` can recompute BatchNorm statistics before handing back its weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Member", "StepCollector"]


@dataclass(frozen=True)
class Member:
    """One ensemble member: the weights after update `step`, on the CPU."""

    step: int
    state_dict: dict[str, torch.Tensor]


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights and buffers, safe from later updates."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


class StepCollector:
    """Keeps a copy of the model after each of the given steps."""

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = tuple(sorted(set(steps)))
        self._members: list[Member] = []

    def should_collect(self, step: int) -> bool:
        return step in self.steps

    def collect(self, model: nn.Module, step: int) -> None:
        self._members.append(Member(step=step, state_dict=cpu_state_dict(model)))

    def members(self) -> list[Member]:
        return list(self._members)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps),
                "members": [{"step": m.step, "state_dict": m.state_dict} for m in self._members]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = tuple(state["steps"])
        self._members = [Member(step=m["step"], state_dict=m["state_dict"]) for m in state["members"]]
