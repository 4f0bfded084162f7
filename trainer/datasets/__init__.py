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


# A table is not read as a data set: which columns are features and which the label, and where
# the test split comes from, are the user's to say. The message shows the conversion.
CSV_MESSAGE = (
    "{path}: a CSV file is not a data set the trainer reads; convert it to a .npz with x_train, "
    "y_train, x_test, y_test (and optionally x_val, y_val, classes), e.g. for a label in the last "
    "column: python -c \"import numpy as np; d = np.loadtxt('{path}', delimiter=',', skiprows=1); "
    "n = len(d) * 4 // 5; np.savez('data.npz', x_train=d[:n, :-1].astype('float32'), "
    "y_train=d[:n, -1].astype('int64'), x_test=d[n:, :-1].astype('float32'), "
    "y_test=d[n:, -1].astype('int64'))\", then --dataset data.npz")


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
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        raise DatasetError(CSV_MESSAGE.format(path=path))
    if path.suffix == ".npz" or path.exists():
        return load_npz_dataset(path, split_seed=split_seed, val_fraction=val_fraction)
    raise DatasetError(
        f"unknown dataset {spec!r}: use one of {sorted(BUILTIN_DATASETS)}, a .npz file, a CIFAR-10/100 "
        "folder or a folder of class sub-folders of images (no such file or folder)")
