"""`trainer train` end to end: data -> model -> the loop -> members -> metrics -> ONNX -> version.

    result = run_training(TrainConfig(out="models"))
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from trainer.collectors import Member
from trainer.config import TrainConfig
from trainer.data import SPLIT_SEED, Dataset, load_dataset
from trainer.errors import ConfigError
from trainer.export import ONNX_OPSET, check_parity, export_onnx, torch_logits
from trainer.loop import LoopResult, TensorBatches, train_loop
from trainer.methods import Method, build_method
from trainer.metrics import (classification_metrics, ensemble_probabilities, mutual_information,
                             pairwise_disagreement, softmax)
from trainer.models import build_model
from trainer.repository import VersionWriter, build_manifest

__all__ = ["TrainResult", "TrainedEnsemble", "member_models", "member_probabilities", "resolve_device",
           "run_training", "seed_everything", "split_report", "train_ensemble"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    version_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r} requested but MPS is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass(frozen=True)
class TrainedEnsemble:
    """What one training run produced, before export."""

    method: Method
    members: list[Member]
    models: list[nn.Module]  # one eval-mode model per member, on the training device
    loop: LoopResult
    steps_per_epoch: int
    device: torch.device


def run_training(config: TrainConfig) -> TrainResult:
    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    dataset = load_dataset(config.dataset)
    logger.info("dataset %s: %d train, %d val, %d test, input %s, %d classes; device %s",
                dataset.name, len(dataset.train), len(dataset.val), len(dataset.test),
                list(dataset.input_shape), dataset.num_classes, device)
    ensemble = train_ensemble(config, dataset, device)
    evaluation = {name: split_report(member_probabilities(ensemble.models, dataset, name, device),
                                     getattr(dataset, name).y)
                  for name in ("val", "test")}
    return write_version(config, dataset, ensemble, evaluation)


def train_ensemble(config: TrainConfig, dataset: Dataset, device: torch.device) -> TrainedEnsemble:
    """Builds the model and the method, runs the loop, returns the members."""
    batches = TensorBatches(torch.from_numpy(dataset.normalize(dataset.train.x)),
                            torch.from_numpy(dataset.train.y), config.batch_size, config.seed, device)
    method = build_method(config, config.epochs * len(batches), len(batches))
    model = build_model(config.arch, dataset.input_shape, dataset.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    logger.info("%s: %d epochs x %d steps = %d steps, %d members at steps %s",
                method.name, config.epochs, len(batches), method.schedule.total_steps,
                config.members, list(method.collector.steps))
    loop = train_loop(model, optimizer, batches, method.schedule, method.collector)
    members = method.collector.members()
    return TrainedEnsemble(method, members, member_models(model, members), loop, len(batches), device)


def member_models(model: nn.Module, members: list[Member]) -> list[nn.Module]:
    """A copy of `model` per member, with the member's weights, in eval mode, on the model's device."""
    models = []
    for member in members:
        clone = copy.deepcopy(model)
        clone.load_state_dict(member.state_dict)
        models.append(clone.eval())
    return models


def member_probabilities(models: list[nn.Module], dataset: Dataset, split: str,
                         device: torch.device) -> np.ndarray:
    """[M, N, C] probabilities of every member on a split (float64 for the metrics)."""
    x = dataset.normalize(getattr(dataset, split).x)
    return np.stack([softmax(torch_logits(m, x, device).astype(np.float64)) for m in models])


def split_report(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Metrics of each member, of the ensemble, and of the ensemble grown one member at a time.

    "forward" adds members in training order; "backward" takes the last m (the paper's choice:
    later snapshots are usually better).
    """
    members = [classification_metrics(p, labels) for p in member_probs]
    count = len(member_probs)
    disagreement = pairwise_disagreement(member_probs)
    return {
        "members": members,
        "ensemble": classification_metrics(ensemble_probabilities(member_probs), labels),
        "members_mean": {k: float(np.mean([m[k] for m in members])) for k in members[0]},
        # Diversity: without it an ensemble is one model served M times.
        "mean_pairwise_disagreement": float(disagreement[~np.eye(count, dtype=bool)].mean()) if count > 1 else 0.0,
        "pairwise_disagreement": disagreement.tolist(),
        "mean_mutual_information": float(mutual_information(member_probs).mean()),
        "ensemble_by_size": {
            "forward": [classification_metrics(ensemble_probabilities(member_probs[:m]), labels)
                        for m in range(1, count + 1)],
            "backward": [classification_metrics(ensemble_probabilities(member_probs[count - m:]), labels)
                         for m in range(1, count + 1)],
        },
    }


def write_version(config: TrainConfig, dataset: Dataset, ensemble: TrainedEnsemble,
                  evaluation: dict[str, Any]) -> TrainResult:
    """Exports and checks every member, then writes the version folder atomically."""
    began = time.perf_counter()
    x_test = dataset.normalize(dataset.test.x)
    # Real inputs: the whole test split, a batch of one, and an odd size.
    parity_batches = [x_test, x_test[:1], x_test[:7]]
    test = evaluation["test"]
    with VersionWriter(config.out, config.name) as writer:
        entries = []
        for index, (member, model) in enumerate(zip(ensemble.members, ensemble.models)):
            path = writer.member_path(index)
            export_onnx(model, path, dataset.input_shape)
            diff = check_parity(model, path, parity_batches, threads=config.threads)
            logger.info("exported member %d (step %d): parity max abs diff %.2e", index, member.step, diff)
            entries.append({"file": writer.member_file(index),
                            "epoch": math.ceil(member.step / ensemble.steps_per_epoch),
                            "step": member.step, "lr": ensemble.method.schedule.lr(member.step),
                            "metrics": test["members"][index]})
        export_seconds = time.perf_counter() - began
        manifest = build_manifest(
            name=config.name, method=ensemble.method.name, input_shape=list(dataset.input_shape),
            normalization=dataset.normalization(), classes=list(dataset.classes), members=entries,
            metrics={**test["ensemble"], "members_mean_accuracy": test["members_mean"]["accuracy"],
                     "members_mean_nll": test["members_mean"]["nll"]},
            training=training_summary(config, dataset, ensemble, export_seconds),
            opset=ONNX_OPSET,
        )
        report = {"test": test, "val": evaluation["val"], "epoch_losses": ensemble.loop.epoch_losses,
                  "train_seconds": ensemble.loop.seconds, "export_seconds": export_seconds}
        version_dir = writer.commit(manifest, report)
    return TrainResult(version_dir=version_dir, manifest=manifest, report=report)


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
        "device": str(ensemble.device),
        "train_seconds": round(ensemble.loop.seconds, 3),
        "export_seconds": round(export_seconds, 3),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__},
    }
