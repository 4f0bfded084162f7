"""Images in class folders: `root/<class>/*.png|jpg|...` (split 60/20/20, stratified) or
`root/{train,test[,val]}/<class>/...`. All images must have one size; greyscale images give
one channel, anything else RGB. Read with Pillow (a matplotlib dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from snapserve.trainer.datasets.base import Dataset, Split, hold_out, make_dataset, train_val_test
from snapserve.trainer.datasets.npz import check_size
from snapserve.trainer.errors import DatasetError

__all__ = ["IMAGE_SUFFIXES", "load_image_folder"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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

    arrays, size, total = [], None, 0
    channels = 1 if mode == "L" else 3
    for f in files:
        try:
            with Image.open(f) as image:  # reads the header only: the size, before any pixel
                width, height = image.size
                check_size(f, f"a {width}x{height} image as float32", width * height * channels * 4)
                total += width * height * channels * 4
                check_size(f.parent.parent, f"the images so far ({len(arrays) + 1})", total)
                array = np.asarray(image.convert(mode), dtype=np.float32)
        except Image.DecompressionBombError as error:  # Pillow's own bound, before ours
            raise DatasetError(f"{f}: refused as a decompression bomb: {error}") from error
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
        except Image.DecompressionBombError as error:
            raise DatasetError(f"{f}: refused as a decompression bomb: {error}") from error
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
        train, val, test = train_val_test(splits["all"].x, splits["all"].y, split_seed)
    else:
        train, test = splits["train"], splits["test"]
        val = splits.get("val")
        if val is None:
            train, val = hold_out(train.x, train.y, 0.2, split_seed)
    if len(classes) < 2:
        raise DatasetError(f"{root}: need at least 2 class folders, found {list(classes)}")
    return make_dataset(root.name, train, val, test, classes)
