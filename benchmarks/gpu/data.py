"""What the run writes and reads on disk: the generated CIFAR-sized data set, and the model
repository the trainer writes (docs/model-repository.md: the trainer/server contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.gpu.config import StepFailed


def write_dataset(path: Path, train: int, test: int, size: int = 32, seed: int = 0) -> None:
    """CIFAR-sized [N, 3, size, size] float32 pixels in 0..255, 10 classes. A class is a grating
    of its own frequency and orientation (a colour phase per channel); each example has a random
    phase (a shift: no linear model can average it out), contrast and noise, so a CNN learns it
    in a few epochs, not perfectly: FP16 parity then has close calls to disagree on."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frequency = rng.uniform(1.5, 6.0, 10)  # cycles per image
    angle = rng.uniform(0.0, np.pi, 10)
    colour = rng.uniform(0.0, 2 * np.pi, (10, 3, 1, 1))
    grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")

    def split(n: int) -> tuple[Any, Any]:
        y = rng.integers(0, 10, n)
        along = (np.cos(angle[y])[:, None, None] * xx + np.sin(angle[y])[:, None, None] * yy)
        wave = 2 * np.pi * frequency[y][:, None, None] * along + rng.uniform(0, 2 * np.pi, (n, 1, 1))
        x = np.sin(wave[:, None] + colour[y]) * rng.uniform(0.15, 0.6, (n, 1, 1, 1))
        x = x + rng.normal(0, 1.5, (n, 3, size, size))
        return (x * 40 + 128).clip(0, 255).astype(np.float32), y.astype(np.int64)

    x_train, y_train = split(train)
    x_test, y_test = split(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def latest_version(repo: Path, model: str) -> Path:
    versions = [p for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise StepFailed(f"{repo / model}: no version folder")
    return max(versions, key=lambda p: int(p.name))


def read_manifest(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / "manifest.json").read_text())


def normalized(x: Any, manifest: dict[str, Any]) -> Any:
    import numpy as np

    norm = manifest["input"].get("normalization")
    if not norm:
        return np.ascontiguousarray(x, dtype=np.float32)
    shape = [1] * x.ndim
    shape[norm.get("axis", 1)] = -1
    mean = np.asarray(norm["mean"], np.float32).reshape(shape)
    std = np.asarray(norm["std"], np.float32).reshape(shape)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
