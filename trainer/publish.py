"""Publishing a trained ensemble as a model version: evaluate, export, manifest, report.

    result = publish_version(config, dataset, train_ensemble(config, dataset, device))

The members are scored on the validation and test splits, exported to ONNX and checked against
PyTorch, fused into ensemble.onnx when they can be, and written with the manifest, metrics.json
and the plots into a version folder that appears only when complete (`VersionWriter`).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from snapserve.proto.scores import softmax
from snapserve.proto.spec import RAW
from snapserve.trainer.adaptive import adaptive_evaluation
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.datasets import OOD_DESCRIPTION, SPLIT_SEED, Dataset
from snapserve.trainer.errors import ConfigError, RepositoryError
from snapserve.trainer.export import ONNX_OPSET, check_parity, export_onnx, torch_logits
from snapserve.trainer.fuse import try_add_fused_graph
from snapserve.trainer.plots import write_plots
from snapserve.trainer.report import evaluate_ensemble, report_markdown
from snapserve.trainer.repository import VersionWriter, build_manifest
from snapserve.trainer.train import TrainedEnsemble

__all__ = ["TrainResult", "evaluate", "evaluation_inputs", "member_probabilities", "publish_version",
           "training_summary", "write_version"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a published run returns: the committed version folder, its manifest, metrics.json."""

    version_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]



def publish_version(config: TrainConfig, dataset: Dataset, ensemble: TrainedEnsemble) -> TrainResult:
    """Evaluates the ensemble, then writes it as the model's next version."""
    return write_version(config, dataset, ensemble, evaluate(config, dataset, ensemble))


def member_probabilities(models: list[nn.Module], dataset: Dataset, x: np.ndarray,
                         device: torch.device) -> np.ndarray:
    """[N, M, C] probabilities of every member on raw inputs `x` (float64 for the metrics)."""
    x = dataset.normalize(x)
    return np.stack([softmax(torch_logits(m, x, device).astype(np.float64)) for m in models], axis=1)


def evaluation_inputs(dataset: Dataset) -> dict[str, np.ndarray]:
    """The raw inputs every ensemble is scored on: validation, test, and out-of-distribution."""
    return {"val": dataset.val.x, "test": dataset.test.x, "ood": dataset.ood_inputs()}


def evaluate(config: TrainConfig, dataset: Dataset, ensemble: TrainedEnsemble) -> dict[str, Any]:
    """Every member and the ensemble on the validation and test splits; the members to serve
    (config.selection, on the validation split) and the temperature."""
    if not ensemble.members:
        raise ConfigError(f"{config.method}: the run collected no members")
    probs = {split: member_probabilities(ensemble.models, dataset, x, ensemble.device)
             for split, x in evaluation_inputs(dataset).items()}
    assert config.selection is not None  # TrainConfig fills it in
    k = min(config.keep_last, len(ensemble.members)) if config.keep_last is not None else None
    evaluation = evaluate_ensemble(probs["val"], dataset.val.y, probs["test"], dataset.test.y,
                                   selection=config.selection, k=k, calibrate=config.calibrate,
                                   ood_probs=probs["ood"])
    exported = list(evaluation["selection"].distinct)  # the manifest's members, in its order
    evaluation["adaptive"] = adaptive_evaluation(probs["val"][:, exported], dataset.val.y,
                                                 probs["test"][:, exported], dataset.test.y,
                                                 config.adaptive_tolerance, evaluation["temperature"],
                                                 fit_temperatures=config.calibrate)
    return evaluation


def write_version(config: TrainConfig, dataset: Dataset, ensemble: TrainedEnsemble,
                  evaluation: dict[str, Any]) -> TrainResult:
    """Exports and checks the members, then writes the version folder atomically."""
    began = time.perf_counter()
    x_test = dataset.test.x  # raw: the graphs normalise, as the manifest's input.kind says
    normalization = dataset.normalization()
    # Real inputs: the whole test split, a batch of one, and an odd size.
    parity_batches = [x_test, x_test[:1], x_test[:7]]
    test, selection = evaluation["test"], evaluation["selection"]
    schedule = ensemble.method.schedule
    try:
        with VersionWriter(config.out, config.name) as writer:
            entries = []
            # The distinct chosen members, once each; the manifest's selection lists them with
            # their repeats, and the server expands one run of each to that list.
            for position, index in enumerate(selection.distinct):
                member, model = ensemble.members[index], ensemble.models[index]
                path = writer.member_path(position)
                export_onnx(model, path, dataset.input_shape, normalization=normalization)
                diff = check_parity(model, path, parity_batches, threads=config.threads,
                                    normalize=dataset.normalize)
                logger.info("exported member %d (collected %d, step %d): parity max abs diff %.2e",
                            position, index, member.step, diff)
                entries.append({"file": writer.member_file(position), "index": index,
                                "epoch": math.ceil(member.step / ensemble.steps_per_epoch),
                                "step": member.step, "lr": schedule.lr(member.step),
                                "metrics": test["members"][index], **member.info})
            export_seconds = time.perf_counter() - began
            served, raw = test["ensemble_calibrated"], test["ensemble"]
            manifest = build_manifest(
                name=config.name, method=ensemble.method.name, input_shape=list(dataset.input_shape),
                normalization=normalization, classes=list(dataset.classes), members=entries,
                metrics={**served, **{f"{k}_uncalibrated": raw[k] for k in ("nll", "brier", "ece")},
                         "members_mean_accuracy": test["members_mean"]["accuracy"],
                         "members_mean_nll": test["members_mean"]["nll"]},
                training=training_summary(config, dataset, ensemble, export_seconds),
                opset=ONNX_OPSET, temperature=evaluation["temperature"],
            )
            manifest["input"]["kind"] = RAW  # the graphs apply input.normalization themselves
            manifest["selection"] = selection.to_manifest()
            manifest["adaptive"] = evaluation["adaptive"]["manifest"]  # from the validation split
            report = {"temperature": evaluation["temperature"], "calibrated": config.calibrate,
                      "test": test, "val": evaluation["val"], "history": asdict(ensemble.history),
                      "epoch_losses": ensemble.history.loss, "member_steps": list(ensemble.method.collector.steps),
                      "train_seconds": ensemble.train_seconds, "export_seconds": export_seconds,
                      "ood": OOD_DESCRIPTION, "selection": manifest["selection"],
                      "adaptive": {**manifest["adaptive"], "test": evaluation["adaptive"]["test"]}}
            if config.plots:
                _write_report_files(writer.directory / "report", manifest, report, ensemble, selection.distinct)
            try_add_fused_graph(writer.directory, manifest)  # ensemble.onnx: members + scores, one graph
            version_dir = writer.commit(manifest, report)
    except OSError as error:
        raise RepositoryError(f"cannot write the model version under {config.out}: "
                              f"{error.strerror or error} (a full disk?)") from error
    return TrainResult(version_dir=version_dir, manifest=manifest, report=report)


def _write_report_files(folder: Path, manifest: dict[str, Any], report: dict[str, Any],
                        ensemble: TrainedEnsemble, served: tuple[int, ...]) -> None:
    schedule = ensemble.method.schedule
    plots = write_plots(
        folder, lr=schedule.lr, total_steps=schedule.total_steps, steps_per_epoch=ensemble.steps_per_epoch,
        member_steps=list(ensemble.method.collector.steps),
        exported_steps=[ensemble.members[i].step for i in served],
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
