"""A dataset from a .npz file of arrays, read without pickle (a dataset file never runs code)."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from snapserve.trainer.datasets.base import SPLIT_SEED, Dataset, Split, hold_out, make_dataset
from snapserve.trainer.errors import DatasetError

__all__ = ["MAX_DATASET_BYTES_ENV", "REQUIRED_NPZ_ARRAYS", "check_size", "load_npz_dataset",
           "max_dataset_bytes"]

REQUIRED_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
NPY_MAGIC = b"\x93NUMPY"
# The most memory one dataset file may make the trainer allocate (its arrays as read, and as
# float32), so a crafted file (a zip bomb .npz, a pickle or image header claiming gigabytes) is
# refused by name instead of taking the machine's memory. CIFAR-10's train split as float32 is
# 0.6 GiB; raise it for larger data.
MAX_DATASET_BYTES_ENV = "SNAPSERVE_MAX_DATASET_BYTES"
DEFAULT_MAX_DATASET_BYTES = 4 * 2**30


def max_dataset_bytes() -> int:
    """The limit: $SNAPSERVE_MAX_DATASET_BYTES if set, else 4 GiB."""
    raw = os.environ.get(MAX_DATASET_BYTES_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_MAX_DATASET_BYTES
    except ValueError:
        raise DatasetError(f"{MAX_DATASET_BYTES_ENV}={raw!r} is not a number of bytes") from None


def check_size(path: Path, what: str, nbytes: int, limit: int | None = None) -> None:
    """DatasetError naming the size found and the limit when `nbytes` exceeds it."""
    limit = max_dataset_bytes() if limit is None else limit
    if nbytes > limit:
        raise DatasetError(f"{path}: {what} would take {nbytes / 2**20:,.0f} MiB ({nbytes} bytes); "
                           f"the limit is {limit / 2**20:,.0f} MiB (set {MAX_DATASET_BYTES_ENV} to "
                           "raise it)")


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
        _check_npz_sizes(path)
        # allow_pickle=False: a dataset file must never be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: cannot read as .npz: {error}") from error


def _member_bytes(member: zipfile.ZipExtFile) -> int:
    """What np.load allocates for one .npy member: its header's shape x item size (it allocates
    that before reading a byte of data, so a header can claim terabytes in a tiny file)."""
    version = np.lib.format.read_magic(member)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(member)
    return math.prod(shape) * max(dtype.itemsize, 4)  # float32 after conversion, at least


def _check_npz_sizes(path: Path) -> None:
    """Refuse an .npz whose members, decompressed or as arrays, exceed the limit, before reading.

    Every member counts, whatever its name: np.load reads a member without the .npy suffix too
    (as an array if it holds one, else as its bytes). Its declared size bounds what zipfile
    inflates; an array's header bounds what numpy allocates; only the header is inflated here."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            total += info.file_size
            check_size(path, f"its members (up to {info.filename})", total)
            with archive.open(info) as member:
                is_array = member.read(len(NPY_MAGIC)) == NPY_MAGIC
            if is_array:
                with archive.open(info) as member:
                    total += max(0, _member_bytes(member) - info.file_size)
            check_size(path, f"its arrays (up to {info.filename})", total)


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
