"""The `trainer train` settings: one frozen dataclass, validated once, errors name the field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from snapserve.trainer.datasets import builtin_loader
from snapserve.trainer.errors import ConfigError, RepositoryError
from snapserve.trainer.models import check_arch
from snapserve.trainer.repository import validate_model_name

__all__ = ["AMP_MODES", "DEFAULT_LR", "DEFAULT_MEMBERS", "DEFAULT_SELECTION", "METHOD_NAMES", "SINGLE_SCHEDULES", "SWAG_SCALES",
           "TrainConfig", "default_threads"]

AMP_MODES = ("off", "bf16", "fp16")

# Members when --members is not given (fge: one per cycle, set by the budget). Its keys are the
# method names; methods.py gives each its (schedule, collector) builder.
DEFAULT_MEMBERS: dict[str, int | None] = {"snapshot": 5, "fge": None, "swa": 1, "swag": 10, "swag-diag": 10,
                                          "single": 1}
# SWAG's covariance scale when sampling: the paper's 1/2 for SWAG, 1 for SWAG-Diag (Maddox et al.).
SWAG_SCALES = {"swag": 0.5, "swag-diag": 1.0}
# lr0 when --lr is not given. Snapshot: the SSE paper's other alpha0, 0.2, which the recorded
# comparison measured better than 0.1 (docs/trainer.md, "When does a snapshot ensemble pay?");
# every other method: 0.1, its paper's.
DEFAULT_LR: dict[str, float] = {"snapshot": 0.2}
_LR = 0.1
METHOD_NAMES: tuple[str, ...] = tuple(DEFAULT_MEMBERS)
# Member selection when --selection is not given: (rule, k), chosen by measurement in the
# recorded comparison (docs/trainer.md, "When does a snapshot ensemble pay?"): all members; the
# last 2 of snapshot's 5 are within noise of all five, greedy on a small validation split worse.
DEFAULT_SELECTION: dict[str, tuple[str, int | None]] = {
    "snapshot": ("all", None), "fge": ("all", None), "swag": ("all", None), "swag-diag": ("all", None),
    "swa": ("all", None), "single": ("all", None)}
SELECTION_RULES = ("all", "last-k", "greedy")  # trainer/selection.py implements them
# The single model's schedule: the SSE paper's step decay, the FGE/SWA reference's linear decay
# to 1 %, or one cosine cycle over the whole budget (SSE's single-cycle baseline).
SINGLE_SCHEDULES = ("step", "linear", "cosine")

# Settings that do not change the trained weights: a run resumed with different values of these
# is the same run (same checkpoint folder). Everything else is part of the run's identity.
_NOT_IDENTITY = {"out", "name", "threads", "device", "resume", "checkpoint_dir", "plots", "calibrate",
                 "keep_last", "selection", "adaptive_tolerance"}


def default_threads() -> int:
    """Small models gain little beyond 2 threads, and more starve other work on a shared CPU."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class TrainConfig:
    out: str  # the model repository root
    method: str = "snapshot"
    dataset: str = "digits"  # a built-in name, a .npz, a CIFAR-10/100 folder or an image folder
    arch: str = "cnn"  # a built-in name or module:factory
    epochs: int = 40  # the whole budget, every phase and cycle together
    members: int | None = None  # None: the method's default (snapshot 5, swag 10, fge: one per cycle)
    lr: float | None = None  # lr0; None: DEFAULT_LR (snapshot 0.2), else 0.1
    momentum: float = 0.9
    nesterov: bool = True  # as in the Snapshot Ensembles reference code
    weight_decay: float = 5e-4
    batch_size: int = 64  # the paper's batch size for CIFAR/SVHN; global over DDP processes
    seed: int = 0
    name: str | None = None  # None: the dataset's name (the file stem for a .npz)
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int | None = None  # CPU threads for torch and ONNX Runtime; None: default_threads()
    depth: int | None = None  # resnet/preresnet/wrn; None: 20, 20, 16
    width: int | None = None  # mlp units, cnn/cnn1d channels, wrn widen factor; None: the arch's
    keep_last: int | None = None  # k of selection last-k (the paper's last-m ensemble); alone: last-k
    selection: str | None = None  # all, last-k or greedy, on the validation split; None: DEFAULT_SELECTION
    single_schedule: str = "step"  # single: step decay (SSE), linear to 1 % (FGE/SWA), or one cosine cycle
    # FGE (Garipov et al. 2018): 80% pre-training as in the reference README, 2-epoch cycles.
    fge_start: float = 0.8
    fge_cycle: int = 2  # epochs per cycle, even: the member is taken at its middle
    fge_lr1: float | None = None  # alpha1 (cycle boundaries); None: lr/2 (0.05 at lr 0.1, README)
    fge_lr2: float | None = None  # alpha2 (mid-cycle); None: lr/10 (0.01 at lr 0.1, README)
    from_checkpoint: str | None = None  # fge: start from this checkpoint's weights and optimizer
    # SWA (Izmailov et al. 2018) and SWAG (Maddox et al. 2019).
    swa_start: float = 0.75  # fraction of the budget (the PyTorch blog's 75%; the README ~80%)
    swa_lr: float | None = None  # None: lr/2 (0.05 at lr 0.1: the CIFAR-100 and WRN recipes)
    swa_cycle: int = 0  # epochs per cycle of the cyclical SWA LR; 0: constant swa_lr
    swa_lr_max: float | None = None  # alpha1 of the cyclical schedule; None: lr
    swag_rank: int = 20  # K, deviation columns kept (the paper's max_num_models); swag-diag keeps none
    swag_scale: float | None = None  # None: the paper's 1/2 for swag, 1 for swag-diag
    # Data, evaluation, output.
    augment: bool | None = None  # None: random crop + flip for natural images (CIFAR), else off
    calibrate: bool = True  # fit the temperature on the validation split (pool, then calibrate)
    # Accuracy points adaptive member evaluation may lose on the validation split (trainer/adaptive.py):
    # larger stops more rows early (cheaper serving), smaller keeps closer to the full ensemble.
    adaptive_tolerance: float = 0.1
    plots: bool = True  # PNG plots and report.md in the version's report/
    # Operations.
    checkpoint_dir: str | None = None  # None: <out>/.runs/<name>-<method>-<hash of the settings>
    resume: bool = False  # continue from checkpoint_dir's checkpoint, if there is one
    amp: str = "off"  # off, bf16 or fp16 (fp16 with a GradScaler); the averages stay float32
    channels_last: bool | None = None  # None: on for CUDA with image inputs
    sync_bn: bool = False  # SyncBatchNorm under DDP on CUDA

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"method must be one of {sorted(METHOD_NAMES)}, got {self.method!r}")
        check_arch(self.arch, self.depth, self.width)
        if self.members is None:
            object.__setattr__(self, "members", DEFAULT_MEMBERS[self.method])
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR.get(self.method, _LR))
        if self.name is None:
            object.__setattr__(self, "name", _default_name(self.dataset))
        if self.threads is None:
            object.__setattr__(self, "threads", default_threads())
        if self.selection is None:
            rule, k = ("last-k", self.keep_last) if self.keep_last is not None else DEFAULT_SELECTION[self.method]
            object.__setattr__(self, "selection", rule)
            if self.keep_last is None and k is not None:
                object.__setattr__(self, "keep_last", k)
        if self.swag_scale is None and self.method in SWAG_SCALES:
            object.__setattr__(self, "swag_scale", SWAG_SCALES[self.method])
        self._check_numbers()
        self._check_methods()
        try:
            validate_model_name(self.name)
        except RepositoryError as error:
            raise ConfigError(f"name: {error}") from None
        if not self.out:
            raise ConfigError("out must name the model repository folder")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")

    def _check_numbers(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "threads": self.threads}
        if self.members is not None:
            positive["members"] = self.members
        if self.keep_last is not None:
            positive["keep_last"] = self.keep_last
        for field, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be an integer >= 1, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (BatchNorm needs a batch variance), got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.adaptive_tolerance <= 100:
            raise ConfigError(f"adaptive_tolerance must be in [0, 100] accuracy points, got {self.adaptive_tolerance}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def _check_methods(self) -> None:
        if self.keep_last is not None and self.method not in ("snapshot", "fge"):
            raise ConfigError(f"keep_last applies to snapshot and fge, not {self.method!r}")
        if self.keep_last is not None and self.members is not None and self.keep_last > self.members:
            raise ConfigError(f"keep_last={self.keep_last} is more than members={self.members}")
        if self.selection not in SELECTION_RULES:
            raise ConfigError(f"selection must be one of {SELECTION_RULES}, got {self.selection!r}")
        if (self.selection == "last-k") != (self.keep_last is not None):
            raise ConfigError(f"selection last-k takes its k from keep_last (and keep_last means last-k): got "
                              f"selection={self.selection!r}, keep_last={self.keep_last}")
        if self.single_schedule not in SINGLE_SCHEDULES:
            raise ConfigError(f"single_schedule must be one of {SINGLE_SCHEDULES}, got {self.single_schedule!r}")
        if self.single_schedule != "step" and self.method != "single":
            raise ConfigError(f"single_schedule applies to method 'single', not {self.method!r}")
        for field in ("fge_start", "swa_start"):
            if not 0 < getattr(self, field) < 1:
                raise ConfigError(f"{field} must be a fraction of the budget in (0, 1), got {getattr(self, field)}")
        if not isinstance(self.fge_cycle, int) or self.fge_cycle < 2 or self.fge_cycle % 2:
            raise ConfigError(f"fge_cycle must be an even number of epochs >= 2 (members are taken "
                              f"mid-cycle), got {self.fge_cycle}")
        if not isinstance(self.swa_cycle, int) or self.swa_cycle < 0:
            raise ConfigError(f"swa_cycle must be an integer >= 0 epochs (0: constant swa_lr), got {self.swa_cycle}")
        for field in ("fge_lr1", "fge_lr2", "swa_lr", "swa_lr_max"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ConfigError(f"{field} must be > 0, got {value}")
        lr1, lr2 = self.fge_lrs()
        if lr1 < lr2:
            raise ConfigError(f"fge_lr1 (the cycle maximum) must be >= fge_lr2 (the minimum), got {lr1} < {lr2}")
        if not isinstance(self.swag_rank, int) or self.swag_rank < 1:
            raise ConfigError(f"swag_rank must be an integer >= 1, got {self.swag_rank}")
        if self.swag_scale is not None and not self.swag_scale > 0:
            raise ConfigError(f"swag_scale must be > 0, got {self.swag_scale}")
        if self.from_checkpoint is not None and self.method != "fge":
            raise ConfigError(f"from_checkpoint applies to method 'fge', not {self.method!r}")

    def fge_lrs(self) -> tuple[float, float]:
        """(alpha1, alpha2): the flags, or lr/2 and lr/10."""
        return (self.fge_lr1 if self.fge_lr1 is not None else self.lr / 2,
                self.fge_lr2 if self.fge_lr2 is not None else self.lr / 10)

    def swa_lr_value(self) -> float:
        return self.swa_lr if self.swa_lr is not None else self.lr / 2

    def summary(self) -> dict[str, object]:
        """The settings as plain values, for the manifest's `training` section."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "out"}

    def identity(self) -> dict[str, object]:
        """The settings that shape the trained weights: a run is resumable across the others."""
        return {k: v for k, v in self.summary().items() if k not in _NOT_IDENTITY}

    def fingerprint(self) -> str:
        """A short hash of `identity()` (names the run folder)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]

    def run_dir(self) -> Path:
        """Where this run's checkpoints go: checkpoint_dir, or <out>/.runs/<name>-<method>-<hash>.

        Inside the repository but in a dot-folder, which the server ignores; the same command
        finds the same folder again, so `--resume` needs no run id.
        """
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        return Path(self.out) / ".runs" / f"{self.name}-{self.method}-{self.fingerprint()}"


def _default_name(dataset: str) -> str:
    if builtin_loader(dataset) is not None:
        return dataset.partition(":")[0]  # mnist1d:train=...: "mnist1d"
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(dataset.rstrip("/")).stem).lstrip("._-")
    return stem or "model"
