"""The `trainer train` settings: one frozen dataclass, validated once, errors name the field."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.data import BUILTIN_DATASETS
from trainer.errors import ConfigError, RepositoryError
from trainer.methods import DEFAULT_MEMBERS, METHODS
from trainer.models import ARCHITECTURES
from trainer.repository import validate_model_name

__all__ = ["TrainConfig", "default_threads"]


def default_threads() -> int:
    """Small models gain little beyond 2 threads, and more starve other work on a shared CPU."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class TrainConfig:
    out: str  # the model repository root
    method: str = "snapshot"
    dataset: str = "digits"  # a built-in name or a path to a .npz
    arch: str = "cnn"
    epochs: int = 40
    members: int | None = None  # None: the method's default (snapshot 5, single 1)
    lr: float = 0.1  # lr0: the paper uses 0.1 or 0.2
    momentum: float = 0.9
    nesterov: bool = True  # as in the Snapshot Ensembles reference code
    weight_decay: float = 5e-4
    batch_size: int = 64  # the paper's batch size for CIFAR/SVHN
    seed: int = 0
    name: str | None = None  # None: the dataset's name (the file stem for a .npz)
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int | None = None  # CPU threads for torch and ONNX Runtime; None: default_threads()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.members is None:
            object.__setattr__(self, "members", DEFAULT_MEMBERS[self.method])
        if self.name is None:
            object.__setattr__(self, "name", _default_name(self.dataset))
        if self.threads is None:
            object.__setattr__(self, "threads", default_threads())
        self._check_numbers()
        try:
            validate_model_name(self.name)
        except RepositoryError as error:
            raise ConfigError(f"name: {error}") from None
        if not self.out:
            raise ConfigError("out must name the model repository folder")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")

    def _check_numbers(self) -> None:
        positive = {"epochs": self.epochs, "members": self.members, "batch_size": self.batch_size,
                    "threads": self.threads}
        for field, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def summary(self) -> dict[str, object]:
        """The settings as plain values, for the manifest's `training` section."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "out"}


def _default_name(dataset: str) -> str:
    if dataset in BUILTIN_DATASETS:
        return dataset
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(dataset).stem).lstrip("._-")
    return stem or "model"
