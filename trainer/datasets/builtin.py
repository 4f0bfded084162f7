"""The built-in datasets, which need no files: scikit-learn's digits and MNIST-1D.

Nothing here downloads anything: digits ships with scikit-learn, MNIST-1D is generated locally.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import numpy as np

from snapserve.trainer.datasets.base import SPLIT_SEED, Dataset, Split, hold_out, make_dataset, train_val_test

__all__ = ["BUILTIN_DATASETS", "load_digits_dataset", "load_mnist1d_dataset"]


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
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """The canonical MNIST-1D (seed 42: 4,000 train + 1,000 test, length 40), generated locally.

    `mnist1d.data.make_dataset` is pure NumPy/SciPy and reproduces the published mnist1d_data.pkl
    exactly; `get_dataset()` would try the network first, so it is never called. It reseeds the global
    `random` and `np.random` generators, so their states are restored around it.
    """
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset as generate

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = generate(get_dataset_args())
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


BUILTIN_DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": load_digits_dataset,
    "mnist1d": load_mnist1d_dataset,
}
