"""A method is a (schedule, collector) pair handed to the one training loop.

Adding a method (fge, swa, swag) means a builder here plus, where needed, a schedule in
schedules.py and a collector in collectors.py; the loop does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from trainer.collectors import StepCollector
from trainer.errors import ConfigError
from trainer.schedules import CyclicCosineSchedule, StepDecaySchedule

if TYPE_CHECKING:
    from trainer.config import TrainConfig

__all__ = ["DEFAULT_MEMBERS", "METHODS", "Method", "Schedule", "build_method"]


class Schedule(Protocol):
    """What the loop needs of a schedule: the budget and a pure LR per step (from 1)."""

    total_steps: int

    def lr(self, step: int) -> float: ...


@dataclass(frozen=True)
class Method:
    name: str
    schedule: Schedule
    collector: StepCollector


def snapshot_method(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> Method:
    """Snapshot Ensembles: M cosine cycles, a member at the end of each."""
    schedule = CyclicCosineSchedule(lr0=config.lr, total_steps=total_steps, cycles=config.members)
    return Method("snapshot", schedule, StepCollector(schedule.cycle_ends()))


def single_method(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> Method:
    """The baseline at the same budget: step decay, one member at the end."""
    if config.members != 1:
        raise ConfigError(f"members must be 1 for method 'single', got {config.members}")
    schedule = StepDecaySchedule(lr0=config.lr, total_steps=total_steps)
    return Method("single", schedule, StepCollector([total_steps]))


METHODS: dict[str, Callable[[TrainConfig, int, int], Method]] = {
    "snapshot": snapshot_method,
    "single": single_method,
}

# Members when --members is not given.
DEFAULT_MEMBERS = {"snapshot": 5, "single": 1}


def build_method(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> Method:
    try:
        builder = METHODS[config.method]
    except KeyError:
        raise ConfigError(f"method must be one of {sorted(METHODS)}, got {config.method!r}") from None
    return builder(config, total_steps, steps_per_epoch)
