"""The ensembles the benchmarks serve, written to a benchmark model repository.

- `digits`: the project's digits ensemble (5 snapshot members of the small CNN, input
  [B, 1, 8, 8]). Taken from models/digits when it has been trained (members re-imported so the
  version has a fused graph), else trained here with
  `trainer train --dataset digits --arch cnn --epochs 40 --members 5`.
- `resnet20`: 5 randomly initialised CIFAR ResNet-20s (input [B, 3, 32, 32] FP32, 10 classes),
  exported to ONNX with torch and imported with `trainer import`. Random weights serve as well as
  trained ones for timing: the arithmetic is the same.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from snapserve.trainer.importer import import_members

__all__ = ["DIGITS", "RESNET20", "digits_version", "latest_version", "resnet20_version"]

logger = logging.getLogger("benchmarks.ensembles")

DIGITS, RESNET20 = "digits", "resnet20"
ROOT = Path(__file__).resolve().parent.parent


def latest_version(model_dir: Path) -> Path | None:
    versions = [p for p in model_dir.glob("[0-9]*") if p.is_dir() and p.name.isdecimal()]
    return max(versions, key=lambda p: int(p.name), default=None)


def _reimport(version_dir: Path, repository: Path, name: str) -> Path:
    """The same member files as a new version of `name` in `repository`, with a fused graph."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        classes = Path(tmp) / "classes.txt"
        classes.write_text("\n".join(manifest["classes"]) + "\n")
        return import_members([version_dir / m["file"] for m in manifest["members"]], repository,
                              name, classes, manifest.get("temperature", 1.0),
                              # Members that normalise in-graph (kind raw) need no client normalisation.
                              None if manifest["input"].get("kind") == "raw"
                              else manifest["input"].get("normalization"))


def digits_version(repository: Path, source: Path = ROOT / "models" / DIGITS) -> Path:
    """The digits ensemble in `repository` (reused when already there)."""
    existing = latest_version(repository / DIGITS)
    if existing is not None and (existing / "ensemble.onnx").is_file():
        return existing
    trained = latest_version(source)
    if trained is None:
        logger.info("training the digits ensemble (trainer train, 40 epochs, 5 members)")
        subprocess.run([sys.executable, "-m", "snapserve.trainer", "-q", "train", "--dataset", "digits",
                        "--arch", "cnn", "--epochs", "40", "--members", "5",
                        "--out", str(repository), "--name", DIGITS], check=True)
        trained = latest_version(repository / DIGITS)
        assert trained is not None
        if (trained / "ensemble.onnx").is_file():
            return trained
    return _reimport(trained, repository, DIGITS)


def resnet20_version(repository: Path, members: int = 5, seed: int = 0) -> Path:
    """5 random CIFAR ResNet-20s as `resnet20` in `repository` (reused when already there)."""
    existing = latest_version(repository / RESNET20)
    if existing is not None and (existing / "ensemble.onnx").is_file():
        return existing
    import torch  # only here: importing the members needs no torch, exporting them does

    from snapserve.trainer.export import export_onnx
    from snapserve.trainer.models import resnet

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for index in range(members):
            torch.manual_seed(seed + index)
            path = Path(tmp) / f"resnet20-{index}.onnx"
            export_onnx(resnet((3, 32, 32), 10, depth=20), path, (3, 32, 32))
            files.append(path)
        return import_members(files, repository, RESNET20)
