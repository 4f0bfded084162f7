"""A dataset from a .npz file of arrays, read without pickle (a dataset file never runs code)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from snapserve.trainer.datasets.base import SPLIT_SEED, Dataset, Split, hold_out, make_dataset
from snapserve.trainer.errors import DatasetError

__all__ = ["REQUIRED_NPZ_ARRAYS", "load_npz_dataset"]

REQUIRED_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz_dataset(path: str | Path, *, split_seed: int = SPLIT_SEED, val_fraction: float = 0.2) -> Dataset:
    """A dataset from a .npz with x_train, y_train, x_test, y_test.

    Optional: x_val and y_val (else `val_fraction` of the training arrays is held out), and
    `classes` (names; else "0".."K-1" for K = the largest label + 1). Inputs are [N, ...] numbers,
    labels integer class indices.
    """
    path = Path(path)
    arrays = _read_npz(path)
    missing = [k for k in REQUIRED_NPZ_ARRAYS if k not in arrays]
    if missing:
        raise DatasetError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DatasetError(f"{path}: x_val and y_val must be given together")
    names = ["train", "test"] + (["val"] if "x_val" in arrays else [])
    splits = {n: _npz_split(path, n, arrays[f"x_{n}"], arrays[f"y_{n}"]) for n in names}
    shapes = {n: s.x.shape[1:] for n, s in splits.items()}
    if len(set(shapes.values())) > 1:
        raise DatasetError(f"{path}: example shapes differ between splits: {shapes}")
    classes = _npz_classes(path, arrays.get("classes"), splits)
    if "val" not in splits:
        if not 0 < val_fraction < 1:
            raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if len(splits["train"]) < 2:
            raise DatasetError(f"{path}: x_train needs at least 2 examples to carve a validation split")
        splits["train"], splits["val"] = hold_out(splits["train"].x, splits["train"].y, val_fraction, split_seed)
    return make_dataset(path.stem, splits["train"], splits["val"], splits["test"], classes)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        # allow_pickle=False: a dataset file must never be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: cannot read as .npz: {error}") from error


def _npz_split(path: Path, name: str, x: np.ndarray, y: np.ndarray) -> Split:
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f"{path}: x_{name} must be a real numeric array [N, ...], got {x.dtype} {x.shape}")
    if y.ndim != 1:
        raise DatasetError(f"{path}: y_{name} must be 1-D class indices, got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{path}: x_{name} has {len(x)} examples but y_{name} has {len(y)}")
    if len(y) == 0:
        raise DatasetError(f"{path}: x_{name} is empty")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    if not integral:
        raise DatasetError(f"{path}: y_{name} must hold integer class indices, got {y.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{path}: x_{name} contains NaN or infinite values")
    return Split(x, y.astype(np.int64))


def _npz_classes(path: Path, names: np.ndarray | None, splits: dict[str, Split]) -> tuple[str, ...]:
    low = min(int(s.y.min()) for s in splits.values())
    high = max(int(s.y.max()) for s in splits.values())
    if names is not None:
        if names.ndim != 1 or len(names) < 1:
            raise DatasetError(f"{path}: classes must be a 1-D array of names, got shape {names.shape}")
        classes = tuple(str(c) for c in names)
    else:
        classes = tuple(str(c) for c in range(high + 1))
    if low < 0 or high >= len(classes):
        raise DatasetError(
            f"{path}: labels must be in [0, {len(classes) - 1}] for {len(classes)} classes, "
            f"found range [{low}, {high}]")
    if len(classes) < 2:
        raise DatasetError(f"{path}: need at least 2 classes, got {len(classes)}")
    return classes
