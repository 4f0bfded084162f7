"""The built-in datasets, which need no files: scikit-learn's digits and MNIST-1D.

Nothing here downloads anything: digits ships with scikit-learn, MNIST-1D is generated locally.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from snapserve.trainer.datasets.base import SPLIT_SEED, Dataset, Split, hold_out, make_dataset, train_val_test
from snapserve.trainer.errors import DatasetError

__all__ = ["BUILTIN_DATASETS", "MNIST1DSizes", "builtin_loader", "load_digits_dataset", "load_mnist1d_dataset",
           "load_mnist1d_sized"]


def load_digits_dataset(split_seed: int = SPLIT_SEED) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, pixels 0..16, shipped with scikit-learn).

    Stratified 60/20/20 train/val/test, inputs [N, 1, 8, 8] float32.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, val, test = train_val_test(x, y, split_seed)
    classes = tuple(str(c) for c in bunch.target_names)
    return make_dataset("digits", train, val, test, classes)


@functools.cache
def _mnist1d_arrays(num_samples: int = 5000, train_split: float = 0.8) -> dict[str, np.ndarray]:
    """MNIST-1D generated locally; the defaults are the canonical set (seed 42: 4,000 train +
    1,000 test, length 40).

    `mnist1d.data.make_dataset` is pure NumPy/SciPy and reproduces the published mnist1d_data.pkl
    exactly; `get_dataset()` would try the network first, so it is never called. Other sizes
    come from the same generator and seed with `num_samples` and `train_split` changed (a new
    draw, not a superset of the canonical set). It reseeds the global `random` and `np.random`
    generators, so their states are restored around it.
    """
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset as generate

    args = get_dataset_args()
    args.num_samples, args.train_split = num_samples, train_split
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = generate(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def load_mnist1d_dataset(split_seed: int = SPLIT_SEED) -> Dataset:
    """MNIST-1D (Greydanus & Kobak): its own 1,000-example test split; 10% of its 4,000 training
    examples (stratified) held out for validation. Inputs [N, 1, 40] float32 (one channel)."""
    arrays = _mnist1d_arrays()
    x = arrays["x"].astype(np.float32)[:, None, :]
    train, val = hold_out(x, arrays["y"].astype(np.int64), 0.1, split_seed)
    test = Split(arrays["x_test"].astype(np.float32)[:, None, :], arrays["y_test"].astype(np.int64))
    return make_dataset("mnist1d", train, val, test, tuple(str(c) for c in range(10)))


@dataclass(frozen=True)
class MNIST1DSizes:
    """`mnist1d:train=N,val=N,test=N,label_noise=F`: MNIST-1D drawn at other sizes.

    A test split far larger than the canonical 1,000 examples makes a difference of a few tenths
    of a point measurable (the binomial error of 1,000 examples is about +-0.5 points); fewer
    training examples, or noisy training labels, make a model overfit, which is where ensembles
    gain. Only the training labels are made noisy (each replaced, with probability
    `label_noise`, by a uniformly drawn other class): validation and test stay clean, so the
    temperature and every reported metric are measured against the truth.
    """

    train: int = 3600
    val: int = 400
    test: int = 1000
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            if getattr(self, name) < 10:
                raise DatasetError(f"mnist1d: {name} must be >= 10 examples, got {getattr(self, name)}")
        if not 0 <= self.label_noise < 1:
            raise DatasetError(f"mnist1d: label_noise must be in [0, 1), got {self.label_noise}")

    @classmethod
    def parse(cls, spec: str) -> MNIST1DSizes:
        """From `mnist1d:key=value,...`; the message names a bad key or value."""
        _, _, options = spec.partition(":")
        values: dict[str, float | int] = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__:
                raise DatasetError(f"{spec!r}: unknown option {key!r}; use {sorted(cls.__dataclass_fields__)}")
            try:
                values[key] = float(value) if key == "label_noise" else int(value)
            except ValueError:
                raise DatasetError(f"{spec!r}: {key} must be a number, got {value!r}") from None
        return cls(**values)  # type: ignore[arg-type]


def load_mnist1d_sized(spec: str, split_seed: int = SPLIT_SEED) -> Dataset:
    """MNIST-1D at the sizes `spec` names (see MNIST1DSizes), from the same generator."""
    sizes = MNIST1DSizes.parse(spec)
    total = sizes.train + sizes.val + sizes.test
    arrays = _mnist1d_arrays(total, (sizes.train + sizes.val) / total)
    x = arrays["x"].astype(np.float32)[:, None, :]
    train, val = hold_out(x, arrays["y"].astype(np.int64), sizes.val / len(x), split_seed)
    if sizes.label_noise:
        rng = np.random.default_rng([split_seed, 1])  # fixed: the same noisy labels in every run
        flip = rng.random(len(train)) < sizes.label_noise
        shifted = (train.y + rng.integers(1, 10, len(train))) % 10  # another class, uniformly
        train = Split(train.x, np.where(flip, shifted, train.y))
    test = Split(arrays["x_test"].astype(np.float32)[:, None, :], arrays["y_test"].astype(np.int64))
    return make_dataset("mnist1d", train, val, test, tuple(str(c) for c in range(10)))


def builtin_loader(spec: str) -> Callable[[str, int], Dataset] | None:
    """The loader of a built-in spec (`digits`, `mnist1d`, `mnist1d:...`), or None."""
    if spec in BUILTIN_DATASETS:
        return lambda _spec, seed: BUILTIN_DATASETS[spec](seed)
    if spec.startswith("mnist1d:"):
        return load_mnist1d_sized
    return None


BUILTIN_DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": load_digits_dataset,
    "mnist1d": load_mnist1d_dataset,
}
