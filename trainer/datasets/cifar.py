"""CIFAR-10/100 in their python batch format, read without letting the pickles run code.

CIFAR-10 (`cifar-10-batches-py/`): data_batch_1..5, test_batch, batches.meta. CIFAR-100
(`cifar-100-python/`): train, test, meta, with `fine_labels`. Each batch is a pickled dict:
b"data" a uint8 array [N, 3072] (3 colour planes of 32x32), b"labels" (or b"fine_labels") a
list of ints. 10% of the training images (stratified) are held out for validation.

Those files ARE pickles, and unpickling can run arbitrary code. They are read with
`CifarUnpickler`, which resolves only what the real files contain: numpy's array
reconstruction (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`), plus
`numpy.core.numeric._frombuffer` (arrays re-saved with pickle protocol 5) and a latin-1-only
`_codecs.encode` (bytes re-saved by Python 3 with protocol 2). Dicts, lists, strings, bytes
and numbers need no import at all. Any other global (os.system, builtins.eval, ...) is refused
before it is called, and object arrays are refused after loading.
"""

from __future__ import annotations

import importlib
import io
import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from snapserve.trainer.datasets.base import Dataset, Split, hold_out, make_dataset
from snapserve.trainer.datasets.npz import check_size, max_dataset_bytes
from snapserve.trainer.errors import DatasetError

__all__ = ["CIFAR10_CLASSES", "CifarUnpickler", "RefusedGlobal", "is_cifar_folder", "load_cifar",
           "safe_unpickle"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_VAL_FRACTION = 0.1  # 5,000 of CIFAR's 50,000 training images


def _numpy_function(name: str) -> Any:
    """numpy 2 moved numpy.core to numpy._core; pickles name either."""
    module, _, attribute = name.rpartition(".")
    for candidate in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(candidate), attribute)
        except (ImportError, AttributeError):
            continue
    raise ImportError(name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding.lower().replace("-", "") != "latin1" or not isinstance(text, str):
        raise RefusedGlobal(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_RECONSTRUCT = _numpy_function("numpy.core.multiarray._reconstruct")


class ArrayTooLarge(pickle.UnpicklingError):
    """The stream asks numpy for an array beyond the dataset size limit."""


def _bounded_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's _reconstruct allocates `shape` at once, whatever data follows: a few bytes of
    pickle can ask for terabytes. Refuse shapes beyond the limit before numpy allocates."""
    try:
        nbytes = math.prod(int(d) for d in (shape if isinstance(shape, tuple) else (shape,)))
        nbytes *= np.dtype(dtype).itemsize
    except (TypeError, ValueError) as error:
        raise RefusedGlobal(f"refusing an array of shape {shape!r}: {error}") from error
    limit = max_dataset_bytes()
    if nbytes > limit:
        raise ArrayTooLarge(f"an array of shape {list(shape)} would take {nbytes} bytes; the limit "
                            f"is {limit} bytes (SNAPSERVE_MAX_DATASET_BYTES)")
    return _RECONSTRUCT(subtype, shape, dtype)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _bounded_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _bounded_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_function("numpy.core.numeric._frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _numpy_function("numpy.core.numeric._frombuffer"),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The stream asked for a global that CIFAR files never contain."""


class CifarUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals a CIFAR batch file needs (see the module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(
                f"refusing to load {module}.{name}: a CIFAR batch holds only dicts, lists, strings, "
                "numbers and numpy arrays") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal("refusing a persistent id: not a CIFAR batch")


def safe_unpickle(path: Path) -> Any:
    """Unpickles a CIFAR batch file with CifarUnpickler (encoding="bytes", as the CIFAR page says)."""
    try:
        check_size(path, "the file", path.stat().st_size)
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        return CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ArrayTooLarge as error:
        raise DatasetError(f"{path}: {error}") from error
    except RefusedGlobal as error:
        raise DatasetError(f"{path}: {error}") from error
    except Exception as error:  # noqa: BLE001 - any malformed stream: EOFError, ValueError, ...
        raise DatasetError(f"{path}: not a CIFAR python batch file ({type(error).__name__}: {error})") from error


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _read_batch(path: Path, label_key: str, classes: int) -> Split:
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a dict, found {type(batch).__name__}")
    batch = _text_keys(batch)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype == object:
        raise DatasetError(f"{path}: 'data' must be a numeric numpy array, got {type(data).__name__}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be [N, 3072] (3x32x32 images), got shape {list(data.shape)}")
    if labels is None:
        raise DatasetError(f"{path}: no {label_key!r} list; found keys {sorted(batch)}")
    _check_flat_ints(path, label_key, labels, len(data))
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {label_key!r} must be {len(data)} integers (one per image), got "
                           f"{labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DatasetError(f"{path}: labels must be in [0, {classes - 1}], found [{labels.min()}, {labels.max()}]")
    check_size(path, f"'data' as float32 ({len(data)} images)", len(data) * 3072 * 4)
    return Split(data.reshape(-1, 3, 32, 32).astype(np.float32), labels.astype(np.int64))


def _text_keys(mapping: dict[Any, Any]) -> dict[str, Any]:
    """A batch dict by text keys; other keys (a tuple of shared references would print as
    gigabytes) are dropped."""
    return {_text(k): v for k, v in mapping.items() if isinstance(k, (bytes, str))}


def _check_flat_ints(path: Path, key: str, labels: Any, count: int) -> None:
    """Labels as CIFAR writes them (a list of ints, or a 1-D integer array), checked by length and
    element type before numpy sees them: a few KB of pickle can nest lists that share references,
    which np.asarray would expand to gigabytes."""
    if isinstance(labels, np.ndarray):
        return  # its size was bounded as it was unpickled (_bounded_reconstruct)
    if not isinstance(labels, list) or len(labels) != count or not all(
            type(v) is int for v in labels):
        got = (f"a list holding {'other than integers' if len(labels) == count else len(labels)}"
               if isinstance(labels, list) else f"a {type(labels).__name__}")
        raise DatasetError(f"{path}: {key!r} must be {count} integers (one per image) in a list, "
                           f"got {got}")


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]))


def _class_names(path: Path, key: str, count: int, default: tuple[str, ...] | None) -> tuple[str, ...]:
    if not path.is_file():
        if default is None:
            return tuple(str(i) for i in range(count))
        return default
    meta = safe_unpickle(path)
    names = _text_keys(meta).get(key) if isinstance(meta, dict) else None
    if (not isinstance(names, list) or len(names) != count
            or not all(isinstance(n, (bytes, str)) for n in names)):
        raise DatasetError(f"{path}: expected {count} names (strings) under {key!r}")
    return tuple(_text(n) for n in names)


def _cifar_kind(root: Path) -> int | None:
    """10 or 100 by the files the folder holds; None for any other folder."""
    if (root / "test_batch").is_file() and any(root.glob("data_batch_*")):
        return 10
    if (root / "train").is_file() and (root / "test").is_file():
        return 100
    return None


def is_cifar_folder(root: Path) -> bool:
    return _cifar_kind(root) is not None


def load_cifar(root: Path, *, split_seed: int) -> Dataset:
    """CIFAR-10 or CIFAR-100 from their python batch files (see the module doc)."""
    kind = _cifar_kind(root)
    if kind == 10:
        files = sorted(root.glob("data_batch_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        train = _concat([_read_batch(f, "labels", 10) for f in files])
        test = _read_batch(root / "test_batch", "labels", 10)
        classes = _class_names(root / "batches.meta", "label_names", 10, CIFAR10_CLASSES)
    elif kind == 100:
        train = _read_batch(root / "train", "fine_labels", 100)
        test = _read_batch(root / "test", "fine_labels", 100)
        classes = _class_names(root / "meta", "fine_label_names", 100, None)
    else:
        raise DatasetError(f"{root}: not a CIFAR-10 (data_batch_*, test_batch) or CIFAR-100 (train, test) folder")
    train, val = hold_out(train.x, train.y, CIFAR_VAL_FRACTION, split_seed)
    name = f"cifar{kind}"
    return make_dataset(name, train, val, test, classes, natural_images=True)
