"""`trainer train` end to end: data -> model -> the loop -> members -> metrics -> ONNX -> version.

    result = run_training(TrainConfig(out="models"))

Under torchrun every process trains its shard; the members are built on every process (SWA's
BatchNorm statistics are all-reduced), then process 0 alone evaluates, exports and writes the
version, and the others return None.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from snapserve.trainer.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from snapserve.trainer.collectors import Member, cpu_state_dict
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.data import SPLIT_SEED, Dataset, load_dataset
from snapserve.trainer.distributed import DistContext, any_failed, close_distributed, init_distributed
from snapserve.trainer.errors import CheckpointError, ConfigError, RepositoryError
from snapserve.trainer.export import ONNX_OPSET, check_parity, export_onnx, torch_logits
from snapserve.trainer.fuse import try_add_fused_graph
from snapserve.trainer.loop import EpochEnd, Precision, TensorBatches, train_loop
from snapserve.trainer.methods import Method, MethodContext, build_method
from snapserve.trainer.metrics import classification_metrics, softmax
from snapserve.trainer.models import build_model
from snapserve.trainer.plots import write_plots
from snapserve.trainer.progress import Progress
from snapserve.trainer.report import evaluate_ensemble, report_markdown
from snapserve.trainer.repository import VersionWriter, build_manifest

__all__ = ["History", "TrainResult", "TrainedEnsemble", "member_models", "member_probabilities",
           "resolve_device", "run_training", "seed_everything", "train_ensemble"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainResult:
    version_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]


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


def run_training(config: TrainConfig) -> TrainResult | None:
    context = init_distributed(config.device)
    try:
        torch.set_num_threads(config.threads)
        device = resolve_device(config.device, context)
        seed_everything(config.seed)
        if context.is_main:
            _check_writable(Path(config.out), "output folder (--out)", RepositoryError)
            _check_writable(config.run_dir(), "checkpoint folder", CheckpointError)
        dataset = load_dataset(config.dataset)
        logger.info("dataset %s: %d train, %d val, %d test, input %s, %d classes; device %s%s",
                    dataset.name, len(dataset.train), len(dataset.val), len(dataset.test),
                    list(dataset.input_shape), dataset.num_classes, device,
                    f", {context.world_size} processes" if context.enabled else "")
        ensemble = train_ensemble(config, dataset, device, context)
        if not context.is_main:
            return None
        evaluation = evaluate(config, dataset, ensemble)
        return write_version(config, dataset, ensemble, evaluation)
    finally:
        close_distributed(context)


def _check_writable(folder: Path, what: str, error: type[Exception]) -> None:
    """Fails before training, not after it, when results could not be saved."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise error(f"cannot write to the {what} {folder}: {exc.strerror or exc}") from exc


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
                   context: DistContext = DistContext()) -> TrainedEnsemble:
    """Builds the model and the method, runs (or resumes) the loop, returns the members."""
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
                              device, pretrained)
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


def member_probabilities(models: list[nn.Module], dataset: Dataset, split: str,
                         device: torch.device) -> np.ndarray:
    """[M, N, C] probabilities of every member on a split (float64 for the metrics)."""
    x = dataset.normalize(getattr(dataset, split).x)
    return np.stack([softmax(torch_logits(m, x, device).astype(np.float64)) for m in models])


def exported_count(config: TrainConfig, ensemble: TrainedEnsemble) -> int:
    """How many of the last members are exported (--keep-last, else all)."""
    return min(config.keep_last or len(ensemble.members), len(ensemble.members))


def evaluate(config: TrainConfig, dataset: Dataset, ensemble: TrainedEnsemble) -> dict[str, Any]:
    if not ensemble.members:
        raise ConfigError(f"{config.method}: the run collected no members")
    probs = {split: member_probabilities(ensemble.models, dataset, split, ensemble.device)
             for split in ("val", "test")}
    return evaluate_ensemble(probs["val"], dataset.val.y, probs["test"], dataset.test.y,
                             exported=exported_count(config, ensemble), calibrate=config.calibrate)


def write_version(config: TrainConfig, dataset: Dataset, ensemble: TrainedEnsemble,
                  evaluation: dict[str, Any]) -> TrainResult:
    """Exports and checks the members, then writes the version folder atomically."""
    began = time.perf_counter()
    x_test = dataset.normalize(dataset.test.x)
    # Real inputs: the whole test split, a batch of one, and an odd size.
    parity_batches = [x_test, x_test[:1], x_test[:7]]
    test, count = evaluation["test"], exported_count(config, ensemble)
    offset = len(ensemble.members) - count
    schedule = ensemble.method.schedule
    try:
        with VersionWriter(config.out, config.name) as writer:
            entries = []
            for index in range(count):
                member, model = ensemble.members[offset + index], ensemble.models[offset + index]
                path = writer.member_path(index)
                export_onnx(model, path, dataset.input_shape)
                diff = check_parity(model, path, parity_batches, threads=config.threads)
                logger.info("exported member %d (step %d): parity max abs diff %.2e", index, member.step, diff)
                entries.append({"file": writer.member_file(index),
                                "epoch": math.ceil(member.step / ensemble.steps_per_epoch),
                                "step": member.step, "lr": schedule.lr(member.step),
                                "metrics": test["members"][offset + index], **member.info})
            export_seconds = time.perf_counter() - began
            served, raw = test["ensemble_calibrated"], test["ensemble"]
            manifest = build_manifest(
                name=config.name, method=ensemble.method.name, input_shape=list(dataset.input_shape),
                normalization=dataset.normalization(), classes=list(dataset.classes), members=entries,
                metrics={**served, **{f"{k}_uncalibrated": raw[k] for k in ("nll", "brier", "ece")},
                         "members_mean_accuracy": test["members_mean"]["accuracy"],
                         "members_mean_nll": test["members_mean"]["nll"]},
                training=training_summary(config, dataset, ensemble, export_seconds),
                opset=ONNX_OPSET, temperature=evaluation["temperature"],
            )
            report = {"temperature": evaluation["temperature"], "calibrated": config.calibrate,
                      "test": test, "val": evaluation["val"], "history": asdict(ensemble.history),
                      "epoch_losses": ensemble.history.loss, "member_steps": list(ensemble.method.collector.steps),
                      "train_seconds": ensemble.train_seconds, "export_seconds": export_seconds}
            if config.plots:
                _write_report_files(writer.directory / "report", manifest, report, ensemble, count)
            try_add_fused_graph(writer.directory, manifest)  # ensemble.onnx: members + scores, one graph
            version_dir = writer.commit(manifest, report)
    except OSError as error:
        raise RepositoryError(f"cannot write the model version under {config.out}: "
                              f"{error.strerror or error} (a full disk?)") from error
    return TrainResult(version_dir=version_dir, manifest=manifest, report=report)


def _write_report_files(folder: Path, manifest: dict[str, Any], report: dict[str, Any],
                        ensemble: TrainedEnsemble, count: int) -> None:
    schedule = ensemble.method.schedule
    plots = write_plots(
        folder, lr=schedule.lr, total_steps=schedule.total_steps, steps_per_epoch=ensemble.steps_per_epoch,
        member_steps=list(ensemble.method.collector.steps),
        exported_steps=[m.step for m in ensemble.members[len(ensemble.members) - count:]],
        method=ensemble.method.name, history=report["history"], test_report=report["test"],
        temperature=report["temperature"])
    (folder / "report.md").write_text(report_markdown(manifest, report, plots) + "\n")


def training_summary(config: TrainConfig, dataset: Dataset, ensemble: TrainedEnsemble,
                     export_seconds: float) -> dict[str, Any]:
    schedule = ensemble.method.schedule
    return {
        **config.summary(),
        "dataset_name": dataset.name,
        "split_seed": SPLIT_SEED,
        "splits": {"train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test)},
        "schedule": {"type": type(schedule).__name__, **asdict(schedule)},
        "steps_per_epoch": ensemble.steps_per_epoch,
        "total_steps": schedule.total_steps,
        "collected_members": len(ensemble.members),
        "device": str(ensemble.device),
        "processes": ensemble.world_size,
        "resumed_from_step": ensemble.resumed_from_step,
        "train_seconds": round(ensemble.train_seconds, 3),
        "export_seconds": round(export_seconds, 3),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__},
    }
