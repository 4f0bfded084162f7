"""Built-in digits and .npz datasets: splits, normalization and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from snapserve.trainer.datasets import Dataset, load_dataset, normalization_stats
from snapserve.trainer.errors import DatasetError


def test_digits_is_a_fixed_stratified_60_20_20_split(digits: Dataset) -> None:
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1077, 360, 360)
    assert digits.input_shape == (1, 8, 8) and digits.train.x.dtype == np.float32
    assert digits.classes == tuple("0123456789")
    assert digits.train.x.min() == 0 and digits.train.x.max() == 16  # raw pixels, not normalized
    for split in (digits.train, digits.val, digits.test):
        counts = np.bincount(split.y, minlength=10) / len(split)
        assert np.all(np.abs(counts - 0.1) < 0.02)  # stratified: ~10% per digit
    again = load_dataset("digits")  # the split does not depend on any training seed
    assert np.array_equal(again.test.x, digits.test.x) and np.array_equal(again.test.y, digits.test.y)


def test_normalization_comes_from_the_training_split(digits: Dataset) -> None:
    assert digits.mean == pytest.approx([digits.train.x.mean()], rel=1e-5)
    assert digits.std == pytest.approx([digits.train.x.std()], rel=1e-5)
    z = digits.normalize(digits.train.x)
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    assert digits.normalization() == {"mean": [float(digits.mean[0])], "std": [float(digits.std[0])], "axis": 1}


def test_per_channel_statistics_and_constant_channels() -> None:
    x = np.zeros((4, 3, 2, 2), np.float32)
    x[:, 0] = 5.0  # constant: std 0 becomes 1
    x[:, 1] = np.arange(4, dtype=np.float32)[:, None, None]
    mean, std = normalization_stats(x)
    assert mean.tolist() == pytest.approx([5.0, 1.5, 0.0])
    assert std.tolist() == pytest.approx([1.0, np.std([0, 1, 2, 3]), 1.0])
    assert normalization_stats(np.array([[1.0, 3.0], [1.0, 3.0]]))[0].tolist() == [2.0]  # [N, D]: a scalar


def _arrays(n_train: int = 40, n_test: int = 10, shape: tuple[int, ...] = (3, 4, 4)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.normal(size=(n_train, *shape)).astype(np.float32),
            "y_train": np.arange(n_train) % 4,
            "x_test": rng.normal(size=(n_test, *shape)).astype(np.float32),
            "y_test": np.arange(n_test) % 4}


def _save(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_class_names_and_a_carved_validation_split(tmp_path: Path) -> None:
    arrays = _arrays()
    data = load_dataset(_save(tmp_path, **arrays, classes=np.array(["a", "b", "c", "d"])))
    assert data.name == "toy" and data.classes == ("a", "b", "c", "d")
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 10)
    assert np.bincount(data.val.y).tolist() == [2, 2, 2, 2]  # stratified
    assert data.input_shape == (3, 4, 4) and data.mean.shape == (3,)
    np.testing.assert_array_equal(data.test.x, arrays["x_test"])


def test_npz_with_its_own_validation_split_and_default_class_names(tmp_path: Path) -> None:
    arrays = _arrays()
    data = load_dataset(_save(tmp_path, **arrays, x_val=arrays["x_test"][:5], y_val=np.array([0, 1, 2, 3, 4])))
    assert len(data.train) == 40 and len(data.val) == 5
    assert data.classes == ("0", "1", "2", "3", "4")  # the largest label (in y_val) + 1


@pytest.mark.parametrize(("change", "message"), [
    ({"x_test": None}, r"missing array\(s\) \['x_test'\]"),
    ({"y_train": np.arange(39) % 4}, "x_train has 40 examples but y_train has 39"),
    ({"y_test": np.array([0, 1, 2, 3, -1, 0, 1, 2, 3, 0])}, r"labels must be in \[0, 3\].*\[-1, 3\]"),
    ({"classes": np.array(["a", "b", "c"])}, r"labels must be in \[0, 2\] for 3 classes, found range \[0, 3\]"),
    ({"y_train": np.linspace(0, 1, 40)}, "y_train must hold integer class indices"),
    ({"x_test": np.zeros((10, 3, 5, 5), np.float32)}, "example shapes differ between splits"),
    ({"x_val": np.zeros((2, 3, 4, 4), np.float32)}, "x_val and y_val must be given together"),
    ({"x_train": np.full((40, 3, 4, 4), np.nan, np.float32)}, "NaN"),
])
def test_npz_errors_name_the_problem(tmp_path: Path, change: dict, message: str) -> None:
    arrays = {**_arrays(), **change}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with pytest.raises(DatasetError, match=message):
        load_dataset(_save(tmp_path, **arrays))


def test_missing_unreadable_and_unknown_datasets(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="cannot read as .npz"):
        load_dataset(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError, match="cannot read as .npz"):  # never unpickled
        load_dataset(str(tmp_path / "objects.npz"))
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar99'.*\['digits', 'mnist1d'\]"):
        load_dataset("cifar99")


@pytest.mark.parametrize("member", ["extra", "x_train.bin", "notes.txt"])
def test_every_npz_member_counts_against_the_limit_whatever_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: str) -> None:
    import zipfile

    path = Path(_save(tmp_path, **_arrays()))
    # 64 MiB of zeros deflate to ~64 KiB: refused by its declared size, never inflated.
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, b"\0" * (64 * 2**20))
    assert path.stat().st_size < 2**20
    monkeypatch.setenv("SNAPSERVE_MAX_DATASET_BYTES", str(32 * 2**20))
    with pytest.raises(DatasetError, match=f"up to {member}.*the limit is 32 MiB"):
        load_dataset(str(path))
