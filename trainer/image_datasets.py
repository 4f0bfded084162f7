"""Image datasets from folders: CIFAR-10/100 in their python batch format, and class folders.

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

Class folders: `root/<class>/*.png|jpg|...` (split 60/20/20, stratified) or
`root/{train,test[,val]}/<class>/...`. All images must have one size; greyscale images give
one channel, anything else RGB. Read with Pillow (a matplotlib dependency).
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from snapserve.trainer.data import Dataset, Split, _make_dataset, _split
from snapserve.trainer.errors import DatasetError

__all__ = ["CIFAR10_CLASSES", "CifarUnpickler", "IMAGE_SUFFIXES", "load_cifar", "load_folder_dataset",
           "load_image_folder", "safe_unpickle"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
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


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_function("numpy.core.multiarray._reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_function("numpy.core.multiarray._reconstruct"),
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
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        return CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
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
    batch = {_text(k): v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype == object:
        raise DatasetError(f"{path}: 'data' must be a numeric numpy array, got {type(data).__name__}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be [N, 3072] (3x32x32 images), got shape {list(data.shape)}")
    if labels is None:
        raise DatasetError(f"{path}: no {label_key!r} list; found keys {sorted(batch)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {label_key!r} must be {len(data)} integers (one per image), got "
                           f"{labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DatasetError(f"{path}: labels must be in [0, {classes - 1}], found [{labels.min()}, {labels.max()}]")
    return Split(data.reshape(-1, 3, 32, 32).astype(np.float32), labels.astype(np.int64))


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]))


def _class_names(path: Path, key: str, count: int, default: tuple[str, ...] | None) -> tuple[str, ...]:
    if not path.is_file():
        if default is None:
            return tuple(str(i) for i in range(count))
        return default
    meta = safe_unpickle(path)
    names = {_text(k): v for k, v in meta.items()}.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != count:
        raise DatasetError(f"{path}: expected {count} names under {key!r}")
    return tuple(_text(n) for n in names)


def _cifar_kind(root: Path) -> int | None:
    if (root / "test_batch").is_file() and any(root.glob("data_batch_*")):
        return 10
    if (root / "train").is_file() and (root / "test").is_file():
        return 100
    return None


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
    train, val = _split(train.x, train.y, CIFAR_VAL_FRACTION, split_seed)
    name = f"cifar{kind}"
    return _make_dataset(name, train, val, test, classes, natural_images=True)


def _images_by_class(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {c.name: sorted(f for f in c.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    empty = [name for name, files in found.items() if not files]
    if not found:
        raise DatasetError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    if empty:
        raise DatasetError(f"{root}: class folder(s) {empty} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def _read_images(files: list[Path], mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    arrays, size = [], None
    for f in files:
        try:
            with Image.open(f) as image:
                array = np.asarray(image.convert(mode), dtype=np.float32)
        except (OSError, UnidentifiedImageError) as error:
            raise DatasetError(f"{f}: cannot read the image: {error}") from error
        if size is None:
            size, first = array.shape, f
        elif array.shape != size:
            raise DatasetError(f"images differ in size: {first} is {size[1]}x{size[0]}, {f} is "
                               f"{array.shape[1]}x{array.shape[0]}; resize them to one size first")
        arrays.append(array)
    x = np.stack(arrays)
    return x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)


def _mode(files: list[Path]) -> str:
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as image:
                if image.mode not in ("1", "L", "I", "I;16", "F"):
                    return "RGB"
        except OSError as error:
            raise DatasetError(f"{f}: cannot read the image: {error}") from error
    return "L"


def load_image_folder(root: Path, *, split_seed: int) -> Dataset:
    """One sub-folder of images per class, or train/test[/val] folders of those (module doc)."""
    parts = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" in parts and "test" in parts:
        by_split = {name: _images_by_class(folder) for name, folder in parts.items()}
    elif parts:
        raise DatasetError(f"{root}: has {sorted(parts)} but needs both train/ and test/ (or only class folders)")
    else:
        by_split = {"all": _images_by_class(root)}
    classes = tuple(sorted(next(iter(by_split.values()))))
    for name, found in by_split.items():
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetError(f"{root}/{name}: class folders {unknown} do not appear in train/")
    every = [f for found in by_split.values() for files in found.values() for f in files]
    mode = _mode(every)
    splits = {}
    for name, found in by_split.items():
        files = [f for c in classes for f in found.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in found.get(c, [])], dtype=np.int64)
        splits[name] = Split(_read_images(files, mode), labels)
    shapes = {name: s.x.shape[1:] for name, s in splits.items()}
    if len(set(shapes.values())) > 1:
        raise DatasetError(f"{root}: image sizes differ between splits: {shapes}")
    if "all" in splits:
        rest, test = _split(splits["all"].x, splits["all"].y, 0.2, split_seed)
        train, val = _split(rest.x, rest.y, 0.25, split_seed)
    else:
        train, test = splits["train"], splits["test"]
        val = splits.get("val")
        if val is None:
            train, val = _split(train.x, train.y, 0.2, split_seed)
    if len(classes) < 2:
        raise DatasetError(f"{root}: need at least 2 class folders, found {list(classes)}")
    return _make_dataset(root.name, train, val, test, classes)


def load_folder_dataset(root: Path, *, split_seed: int) -> Dataset:
    """A CIFAR folder when it has CIFAR's files, else class folders of images."""
    if _cifar_kind(root) is not None:
        return load_cifar(root, split_seed=split_seed)
    return load_image_folder(root, split_seed=split_seed)
