"""What every dataset is: raw numpy splits, normalization statistics, and the seeded splitting.

Splits hold RAW inputs: the models train on `dataset.normalize(x)`, the exported graphs do not
normalize, and the manifest carries `dataset.normalization()` so clients can apply it.

The split seed is fixed and independent of the training seed, so every run of a dataset sees
the same train/val/test examples and test metrics compare across runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = ["OOD_DESCRIPTION", "SPLIT_SEED", "Dataset", "Split", "hold_out", "make_dataset", "normalization_stats",
           "train_val_test"]

SPLIT_SEED = 0
OOD_SEED = 1  # the permutation of `Dataset.ood_inputs`
OOD_DESCRIPTION = "the test inputs with their positions shuffled"


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

    def ood_inputs(self) -> np.ndarray:
        """Out-of-distribution inputs: the test inputs, raw, with their positions (every axis but
        the batch one) shuffled by one fixed permutation. Same values and statistics, no shape
        left: MNIST-1D's "spatially shuffled" variant (Greydanus & Kobak; a CNN falls from 94%
        to 56% when trained on it), for any dataset, so every report can say whether the
        scores flag inputs unlike the training data."""
        flat = self.test.x.reshape(len(self.test), -1)
        order = np.random.default_rng(OOD_SEED).permutation(flat.shape[1])
        return flat[:, order].reshape(self.test.x.shape)

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


def make_dataset(name: str, train: Split, val: Split, test: Split, classes: tuple[str, ...],
                 natural_images: bool = False) -> Dataset:
    """A Dataset whose normalization comes from its training split alone."""
    mean, std = normalization_stats(train.x)
    return Dataset(name=name, train=train, val=val, test=test, classes=classes, mean=mean, std=std,
                   natural_images=natural_images)


def hold_out(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held_out): a seeded split, stratified by label when every class allows it."""
    try:
        x_rest, x_out, y_rest, y_out = train_test_split(
            x, y, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:  # a class with a single example cannot be stratified
        x_rest, x_out, y_rest, y_out = train_test_split(x, y, test_size=fraction, random_state=seed)
    return Split(x_rest, y_rest), Split(x_out, y_out)


def train_val_test(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[Split, Split, Split]:
    """A 60/20/20 split for data that comes without one: 20% test, then 25% of the rest."""
    rest, test = hold_out(x, y, 0.2, seed)
    train, val = hold_out(rest.x, rest.y, 0.25, seed)
    return train, val, test
