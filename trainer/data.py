"""Datasets as raw numpy splits, with normalization statistics from the training split.

`load_dataset("digits")`, `load_dataset("mnist1d")`, `load_dataset("path/to/file.npz")`, or a
folder: CIFAR-10/100 in their python batch format or images in class folders (see
`trainer.image_datasets`). Splits hold RAW inputs: the
models train on `dataset.normalize(x)`, the exported graphs do not normalize, and the manifest
carries `dataset.normalization()` so clients can apply it. Nothing here downloads anything.

The split seed is fixed and independent of the training seed, so every run of a dataset sees
the same train/val/test examples and test metrics compare across runs.
"""

from __future__ import annotations

import functools
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from snapserve.trainer.errors import DatasetError

__all__ = [
    "BUILTIN_DATASETS",
    "SPLIT_SEED",
    "Dataset",
    "Split",
    "load_dataset",
    "load_digits_dataset",
    "load_mnist1d_dataset",
    "load_npz_dataset",
    "normalization_stats",
]

SPLIT_SEED = 0

REQUIRED_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True, eq=False)
class Split:
    x: np.ndarray  # float32, raw (not normalized), [N, ...]
    y: np.ndarray  # int64 class indices, [N]

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    mean: np.ndarray  # float32 [C]: per channel (axis 1), or [1] for a scalar
    std: np.ndarray
    # Natural images (CIFAR): random crop + flip is the standard augmentation, on by default.
    # Never for digits or sequences, where a flip changes the class.
    natural_images: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, without the batch axis."""
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std, broadcast along axis 1: what the models are trained on."""
        shape = [1] * x.ndim
        if self.mean.size > 1:
            shape[1] = self.mean.size
        return ((x - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)

    def normalization(self) -> dict[str, Any]:
        """The manifest's `input.normalization`."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std], "axis": 1}


def normalization_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std for [N, C, ...] inputs, one scalar pair for [N, D] features.

    A zero std (a constant channel) becomes 1 so normalizing never divides by zero.
    """
    axes = tuple(i for i in range(x.ndim) if i != 1) if x.ndim >= 3 else None
    mean = np.atleast_1d(x.mean(axis=axes, dtype=np.float64))
    std = np.atleast_1d(x.std(axis=axes, dtype=np.float64))
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _make_dataset(name: str, train: Split, val: Split, test: Split, classes: tuple[str, ...],
                  natural_images: bool = False) -> Dataset:
    mean, std = normalization_stats(train.x)
    return Dataset(name=name, train=train, val=val, test=test, classes=classes, mean=mean, std=std,
                   natural_images=natural_images)


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held_out): a seeded split, stratified by label when every class allows it."""
    try:
        x_rest, x_out, y_rest, y_out = train_test_split(
            x, y, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:  # a class with a single example cannot be stratified
        x_rest, x_out, y_rest, y_out = train_test_split(x, y, test_size=fraction, random_state=seed)
    return Split(x_rest, y_rest), Split(x_out, y_out)


def load_digits_dataset(split_seed: int = SPLIT_SEED) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, pixels 0..16, shipped with scikit-learn).

    Stratified 60/20/20 train/val/test, inputs [N, 1, 8, 8] float32.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    rest, test = _split(x, y, 0.2, split_seed)
    train, val = _split(rest.x, rest.y, 0.25, split_seed)  # 25% of the remaining 80% = 20%
    classes = tuple(str(c) for c in bunch.target_names)
    return _make_dataset("digits", train, val, test, classes)


@functools.cache
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """The canonical MNIST-1D (seed 42: 4,000 train + 1,000 test, length 40), generated locally.

    `make_dataset` is pure NumPy/SciPy and reproduces the published mnist1d_data.pkl exactly;
    `get_dataset()` would try the network first, so it is never called. It reseeds the global
    `random` and `np.random` generators, so their states are restored around it.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def load_mnist1d_dataset(split_seed: int = SPLIT_SEED) -> Dataset:
    """MNIST-1D (Greydanus & Kobak): its own 1,000-example test split; 10% of its 4,000 training
    examples (stratified) held out for validation. Inputs [N, 1, 40] float32 (one channel)."""
    arrays = _mnist1d_arrays()
    x = arrays["x"].astype(np.float32)[:, None, :]
    train, val = _split(x, arrays["y"].astype(np.int64), 0.1, split_seed)
    test = Split(arrays["x_test"].astype(np.float32)[:, None, :], arrays["y_test"].astype(np.int64))
    return _make_dataset("mnist1d", train, val, test, tuple(str(c) for c in range(10)))


BUILTIN_DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": load_digits_dataset,
    "mnist1d": load_mnist1d_dataset,
}


def load_dataset(spec: str, *, split_seed: int = SPLIT_SEED, val_fraction: float = 0.2) -> Dataset:
    """A built-in dataset by name, a .npz file (`load_npz_dataset`), or a folder: CIFAR-10/100
    python batches or one sub-folder of images per class (`trainer.image_datasets`)."""
    if spec in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[spec](split_seed)
    path = Path(spec)
    if path.is_dir():
        from snapserve.trainer.image_datasets import load_folder_dataset

        return load_folder_dataset(path, split_seed=split_seed)
    if path.suffix == ".npz" or path.exists():
        return load_npz_dataset(path, split_seed=split_seed, val_fraction=val_fraction)
    raise DatasetError(
        f"unknown dataset {spec!r}: use one of {sorted(BUILTIN_DATASETS)}, a .npz file, a CIFAR-10/100 "
        "folder or a folder of class sub-folders of images (no such file or folder)")


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
        splits["train"], splits["val"] = _split(splits["train"].x, splits["train"].y, val_fraction, split_seed)
    return _make_dataset(path.stem, splits["train"], splits["val"], splits["test"], classes)


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
