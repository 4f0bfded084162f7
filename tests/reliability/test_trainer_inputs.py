"""The trainer's own doors: `--arch module:factory` leaves sys.path as it found it; dataset
files that would allocate gigabytes are refused with a DatasetError naming the size and limit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from snapserve.trainer.models import build_model  # noqa: E402


def test_a_user_factory_does_not_leave_the_working_directory_on_sys_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cwd_models.py").write_text(
        "import math, torch\n"
        "def tiny(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(math.prod(input_shape), num_classes))\n")
    monkeypatch.chdir(tmp_path)
    # As the installed `trainer` script runs: neither "" nor the working directory on sys.path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    before = list(sys.path)
    try:
        model = build_model("cwd_models:tiny", (1, 8), 3)
    finally:
        sys.modules.pop("cwd_models", None)
    assert model(torch.zeros(2, 1, 8)).shape == (2, 3)
    assert sys.path == before  # before the fix: the working directory first, for the whole run


# -- dataset bombs ------------------------------------------------------------------------------

import io  # noqa: E402
import pickle  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402

from snapserve.trainer.datasets.cifar import load_cifar  # noqa: E402
from snapserve.trainer.datasets.images import load_image_folder  # noqa: E402
from snapserve.trainer.datasets.npz import MAX_DATASET_BYTES_ENV, load_npz_dataset  # noqa: E402
from snapserve.trainer.errors import DatasetError  # noqa: E402


class _HugeArray:
    """Pickles as numpy's own array reconstruction, asking for a terabyte."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return np.ndarray.__reduce__(np.zeros(1, np.uint8))[0], (np.ndarray, (10**12,), b"B")


def test_a_cifar_pickle_asking_for_a_terabyte_is_refused_by_size(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    bomb = pickle.dumps({b"data": _HugeArray(), b"labels": [0]}, protocol=2)
    for name in ("data_batch_1", "test_batch"):
        (root / name).write_bytes(bomb)
    with pytest.raises(DatasetError, match=r"shape \[1000000000000\].*the limit is"):
        load_cifar(root, split_seed=0)


def _npy_header_only(shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    return out.getvalue() + b"\0" * 64


def test_an_npz_claiming_or_inflating_to_gigabytes_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claims = tmp_path / "claims.npz"
    with zipfile.ZipFile(claims, "w") as archive:
        archive.writestr("x_train.npy", _npy_header_only((10**6, 10**6)))
    with pytest.raises(DatasetError, match="MiB .*the limit is 4,096 MiB"):
        load_npz_dataset(claims)
    inflates = tmp_path / "inflates.npz"  # 8 MiB of zeros, a few KiB compressed
    np.savez_compressed(inflates, x_train=np.zeros((2048, 1024), np.float32),
                        y_train=np.zeros(2048, np.int64), x_test=np.zeros((2, 1024), np.float32),
                        y_test=np.zeros(2, np.int64))
    assert inflates.stat().st_size < 2**20
    monkeypatch.setenv(MAX_DATASET_BYTES_ENV, str(2**20))
    with pytest.raises(DatasetError, match=r"x_train.npy\) would take 8 MiB.*limit is 1 MiB"):
        load_npz_dataset(inflates)


def test_images_beyond_the_limit_or_pillows_bomb_bound_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image = pytest.importorskip("PIL.Image")
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("L", (600, 600)).save(tmp_path / label / f"{i}.png")
    monkeypatch.setenv(MAX_DATASET_BYTES_ENV, str(2**20))  # one 600x600 float32 image: 1.4 MiB
    with pytest.raises(DatasetError, match="600x600 image .*limit is 1 MiB"):
        load_image_folder(tmp_path, split_seed=0)
    monkeypatch.delenv(MAX_DATASET_BYTES_ENV)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 360,000 pixels > 2 x 1000
    with pytest.raises(DatasetError, match="decompression bomb"):
        load_image_folder(tmp_path, split_seed=0)
