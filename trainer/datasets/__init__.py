"""Datasets as raw numpy splits, with normalization statistics from the training split.

    load_dataset("digits")              built-in (builtin.py): digits, mnist1d
    load_dataset("mnist1d:train=1000,test=10000")   MNIST-1D drawn at other sizes
    load_dataset("path/to/file.npz")    arrays in a .npz (npz.py)
    load_dataset("path/to/folder")      CIFAR-10/100 python batches (cifar.py), else one
                                        sub-folder of images per class (images.py)

Every loader returns a `Dataset` (base.py) with a fixed-seed train/val/test split of RAW
inputs. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

from snapserve.trainer.datasets.base import OOD_DESCRIPTION, SPLIT_SEED, Dataset, Split, normalization_stats
from snapserve.trainer.datasets.builtin import BUILTIN_DATASETS, builtin_loader
from snapserve.trainer.datasets.cifar import is_cifar_folder, load_cifar
from snapserve.trainer.datasets.images import load_image_folder
from snapserve.trainer.datasets.npz import load_npz_dataset
from snapserve.trainer.errors import DatasetError

__all__ = ["BUILTIN_DATASETS", "OOD_DESCRIPTION", "SPLIT_SEED", "Dataset", "Split", "builtin_loader", "load_dataset", "normalization_stats"]


def load_dataset(spec: str, *, split_seed: int = SPLIT_SEED, val_fraction: float = 0.2) -> Dataset:
    """A built-in dataset by name, a .npz file, or a folder: CIFAR when it has CIFAR's files,
    else class folders of images."""
    loader = builtin_loader(spec)
    if loader is not None:
        return loader(spec, split_seed)
    path = Path(spec)
    if path.is_dir():
        if is_cifar_folder(path):
            return load_cifar(path, split_seed=split_seed)
        return load_image_folder(path, split_seed=split_seed)
    if path.suffix == ".npz" or path.exists():
        return load_npz_dataset(path, split_seed=split_seed, val_fraction=val_fraction)
    raise DatasetError(
        f"unknown dataset {spec!r}: use one of {sorted(BUILTIN_DATASETS)}, a .npz file, a CIFAR-10/100 "
        "folder or a folder of class sub-folders of images (no such file or folder)")
