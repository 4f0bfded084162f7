"""Training an ensemble: data -> model -> the one loop -> members, a `TrainedEnsemble`.

    ensemble = train_ensemble(config, load_dataset(config.dataset), resolve_device(config.device))

Under torchrun every process trains its shard; the members are built on every process (SWA's
BatchNorm statistics are all-reduced), and process 0 alone keeps eval-mode models of them.
Evaluating and writing the version come after, in `publish.py`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from snapserve.proto.scores import softmax
from snapserve.trainer.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from snapserve.trainer.collectors import Member, cpu_state_dict
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.datasets import Dataset
from snapserve.trainer.distributed import DistContext, any_failed
from snapserve.trainer.errors import CheckpointError, ConfigError
from snapserve.trainer.export import torch_logits
from snapserve.trainer.loop import EpochEnd, Precision, TensorBatches, train_loop
from snapserve.trainer.methods import Method, MethodContext, build_method
from snapserve.trainer.metrics import classification_metrics
from snapserve.trainer.models import build_model
from snapserve.trainer.progress import Progress

__all__ = ["History", "TrainedEnsemble", "member_models", "resolve_device", "seed_everything",
           "train_ensemble"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str, context: DistContext = DistContext()) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r} requested but MPS is not available")
    if device.type == "cuda" and context.enabled:
        device = torch.device("cuda", context.local_rank)  # one GPU per process
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class History:
    """Per-epoch numbers for the report and the plots; saved in every checkpoint."""

    loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)  # of the current weights, not the ensemble
    test_nll: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)  # at the epoch's last step
    seconds: list[float] = field(default_factory=list)  # training only, without evaluation

    def add(self, end: EpochEnd, test: dict[str, float] | None) -> None:
        self.loss.append(end.loss)
        self.train_accuracy.append(end.accuracy)
        self.lr.append(end.lr)
        self.seconds.append(end.seconds)
        if test is not None:
            self.test_error.append(1.0 - test["accuracy"])
            self.test_nll.append(test["nll"])


@dataclass(frozen=True)
class TrainedEnsemble:
    """What one training run produced, before export."""

    method: Method
    members: list[Member]  # every collected (or sampled) member, in order
    models: list[nn.Module]  # one eval-mode model per member, on the training device (process 0)
    history: History
    steps_per_epoch: int
    device: torch.device
    resumed_from_step: int = 0
    world_size: int = 1

    @property
    def train_seconds(self) -> float:
        return float(sum(self.history.seconds))


def _precision(config: TrainConfig, device: torch.device, image_inputs: bool) -> Precision:
    dtype = _AMP_DTYPES[config.amp]
    if config.amp == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"amp fp16 needs a CUDA device (or the CPU), not {device}")
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    channels_last = config.channels_last if config.channels_last is not None else (
        device.type == "cuda" and image_inputs)
    return Precision(device_type=device.type, dtype=dtype, scaler=scaler, channels_last=channels_last)


def _batches(config: TrainConfig, dataset: Dataset, device: torch.device, context: DistContext) -> TensorBatches:
    augment = config.augment if config.augment is not None else dataset.natural_images
    fill = None
    if augment:
        if len(dataset.input_shape) != 3:
            raise ConfigError(f"augment (random crop + flip) needs images [N, C, H, W]; {dataset.name} "
                              f"has examples shaped {list(dataset.input_shape)}")
        fill = torch.from_numpy(dataset.normalize(np.zeros((1, *dataset.input_shape), np.float32))[0, :, 0, 0])
    if config.batch_size < 2 * context.world_size:
        raise ConfigError(f"batch_size {config.batch_size} is global: it needs at least 2 examples for each "
                          f"of the {context.world_size} processes")
    return TensorBatches(torch.from_numpy(dataset.normalize(dataset.train.x)), torch.from_numpy(dataset.train.y),
                         config.batch_size, config.seed, device, rank=context.rank,
                         world_size=context.world_size, augment_fill=fill)


def _starting_state(config: TrainConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(this run's checkpoint to resume, another run's checkpoint to start FGE from)."""
    run_dir = config.run_dir()
    if config.resume:
        if (run_dir / "checkpoint.pt").is_file():
            state = load_checkpoint(run_dir)
            if state["fingerprint"] != config.fingerprint():
                differ = sorted(k for k, v in config.identity().items() if state["config"].get(k) != v)
                raise CheckpointError(f"{run_dir}: the checkpoint belongs to a run with other settings "
                                      f"(differing: {differ}); use another --checkpoint-dir")
            return state, None
        logger.warning("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
    if config.from_checkpoint is not None:
        return None, load_checkpoint(Path(config.from_checkpoint))
    return None, None


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: its weights do not fit this model: {str(error).splitlines()[0]}") from error


def train_ensemble(config: TrainConfig, dataset: Dataset, device: torch.device,
                   context: DistContext = DistContext(), *, record_epochs: bool = True) -> TrainedEnsemble:
    """Builds the model and the method, runs (or resumes) the loop, returns the members.

    `record_epochs=False` (trainer compare) skips the per-epoch test error and checkpoint: on a
    10,000-example test split they cost more than training a small model does.
    """
    batches = _batches(config, dataset, device, context)
    spe = len(batches)
    model = build_model(config.arch, dataset.input_shape, dataset.num_classes,
                        depth=config.depth, width=config.width).to(device)
    precision = _precision(config, device, len(dataset.input_shape) == 3)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn and context.enabled:
        if device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA (SyncBatchNorm has no CPU implementation); on the CPU, "
                              "SWA/SWAG's BatchNorm statistics are all-reduced instead")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    resume, base = _starting_state(config)
    pretrained = resume.get("pretrained_epochs") if resume else (base["epoch"] if base else None)
    method = build_method(config, MethodContext(spe, bn_batches=batches.inputs, distributed=context.enabled,
                                                keep_members=context.is_main, pretrained_epochs=pretrained))
    history, start_step = _restore(config, model, optimizer, precision, method, resume, base, spe)
    train_model: nn.Module = model
    if context.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    logger.info("%s: %d epochs x %d steps = %d steps; members at steps %s", method.name, config.epochs, spe,
                method.schedule.total_steps, _abbreviate(method.collector.steps))
    on_epoch_end = _epoch_end(config, dataset, model, optimizer, precision, method, history, context,
                              device, pretrained) if record_epochs else lambda end: history.add(end, None)
    progress = Progress(method.schedule.total_steps, spe, enabled=context.is_main)
    train_loop(train_model, optimizer, batches, method.schedule, method.collector, start_step=start_step,
               precision=precision, progress=progress, on_epoch_end=on_epoch_end)
    members = method.collector.members(model)  # every process: SWA/SWAG all-reduce BN statistics
    models = member_models(config, dataset, members, device) if context.is_main else []
    return TrainedEnsemble(method, members, models, history, spe, device, start_step, context.world_size)


def _restore(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
             method: Method, resume: dict[str, Any] | None, base: dict[str, Any] | None,
             spe: int) -> tuple[History, int]:
    """Loads this run's checkpoint (everything) or, for FGE, another run's (weights and optimizer
    state); returns the history so far and the step to start after."""
    if resume is not None:
        _load_model_state(model, resume["model"], str(config.run_dir()))
        optimizer.load_state_dict(resume["optimizer"])
        if precision.scaler is not None and resume.get("scaler"):
            precision.scaler.load_state_dict(resume["scaler"])
        method.collector.load_state_dict(resume["collector"])
        restore_rng_state(resume["rng"])
        logger.info("resumed %s at epoch %d (step %d) with %d member(s) so far", config.run_dir(),
                    resume["epoch"], resume["step"], method.collector.collected)
        return History(**resume["history"]), resume["step"]
    if base is not None:
        _load_model_state(model, base["model"], config.from_checkpoint or "")
        optimizer.load_state_dict(base["optimizer"])
        for group in optimizer.param_groups:  # momentum buffers carry over; settings are this run's
            group.update(momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay)
        logger.info("fge from %s: %d pre-trained epochs (weights and optimizer state)", config.from_checkpoint,
                    base["epoch"])
        return History(), base["epoch"] * spe
    return History(), 0


def _epoch_end(config: TrainConfig, dataset: Dataset, model: nn.Module, optimizer: torch.optim.Optimizer,
               precision: Precision, method: Method, history: History, context: DistContext,
               device: torch.device, pretrained: int | None) -> Callable[[EpochEnd], None]:
    """What happens after every epoch: the test error of the current weights (for the report)
    and the checkpoint, both on process 0."""
    x_test = dataset.normalize(dataset.test.x)

    def on_epoch_end(end: EpochEnd) -> None:
        test = None
        if context.is_main:
            probs = softmax(torch_logits(model, x_test, device).astype(np.float64))
            test = classification_metrics(probs, dataset.test.y)
        history.add(end, test)
        error: CheckpointError | None = None
        if context.is_main:
            try:
                save_checkpoint(config.run_dir(), {
                    "fingerprint": config.fingerprint(), "config": config.summary(), "step": end.step,
                    "epoch": end.epoch, "pretrained_epochs": pretrained, "model": cpu_state_dict(model),
                    "optimizer": optimizer.state_dict(),
                    "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
                    "collector": method.collector.state_dict(), "rng": rng_state(), "history": asdict(history)})
            except CheckpointError as exc:
                error = exc
        if any_failed(context, error is not None, device):
            raise error or CheckpointError("process 0 could not write the checkpoint; see its log")

    return on_epoch_end


def _abbreviate(steps: tuple[int, ...]) -> str:
    return str(list(steps)) if len(steps) <= 12 else f"[{steps[0]}, {steps[1]}, ..., {steps[-1]}] ({len(steps)})"


def member_models(config: TrainConfig, dataset: Dataset, members: list[Member],
                  device: torch.device) -> list[nn.Module]:
    """A fresh model per member (plain BatchNorm, default memory layout), in eval mode."""
    models = []
    for member in members:
        model = build_model(config.arch, dataset.input_shape, dataset.num_classes,
                            depth=config.depth, width=config.width)
        model.load_state_dict(member.state_dict)
        models.append(model.to(device).eval())
    return models


