"""MNIST-1D generated offline, CIFAR-10/100 python batches read without unpickling code, and
class folders of images: shapes, splits and clear errors."""

from __future__ import annotations

import os
import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snapserve.trainer.datasets import load_dataset
from snapserve.trainer.errors import DatasetError
from snapserve.trainer.datasets.cifar import CIFAR10_CLASSES


def test_mnist1d_is_generated_locally_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    state = np.random.get_state()
    data = load_dataset("mnist1d")
    assert (len(data.train), len(data.val), len(data.test)) == (3600, 400, 1000)  # the canonical 4,000 + 1,000
    assert data.input_shape == (1, 40) and data.classes == tuple("0123456789")
    assert np.all(np.abs(np.bincount(data.val.y) - 40) <= 2)  # stratified
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is left alone
    again = load_dataset("mnist1d")
    assert np.array_equal(again.test.x, data.test.x)


def test_mnist1d_at_other_sizes_with_noisy_training_labels() -> None:
    clean = load_dataset("mnist1d:train=900,val=100,test=2000")
    assert (len(clean.train), len(clean.val), len(clean.test)) == (900, 100, 2000) and clean.name == "mnist1d"
    noisy = load_dataset("mnist1d:train=900,val=100,test=2000,label_noise=0.3")
    assert np.array_equal(noisy.train.x, clean.train.x) and np.array_equal(noisy.test.y, clean.test.y)
    assert np.array_equal(noisy.val.y, clean.val.y)  # only the training labels are noisy
    flipped = noisy.train.y != clean.train.y  # always to another class
    assert 0.25 < flipped.mean() < 0.35
    assert np.array_equal(load_dataset("mnist1d:train=900,val=100,test=2000,label_noise=0.3").train.y, noisy.train.y)
    # out-of-distribution inputs: the test inputs' positions shuffled, the same values
    ood = clean.ood_inputs()
    assert ood.shape == clean.test.x.shape and not np.array_equal(ood, clean.test.x)
    assert np.array_equal(np.sort(ood, axis=-1), np.sort(clean.test.x, axis=-1))
    with pytest.raises(DatasetError, match="unknown option 'trian'"):
        load_dataset("mnist1d:trian=10")
    with pytest.raises(DatasetError, match="label_noise must be in"):
        load_dataset("mnist1d:label_noise=1.5")


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as the real CIFAR files (cPickle, protocol 2) have."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def _dump(path: Path, obj: object, py2: bool) -> None:
    with open(path, "wb") as f:
        if py2:
            Py2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=4)


def _batch(n: int, seed: int, label_key: bytes = b"labels", classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"tiny batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(v) for v in np.arange(n) % classes], b"filenames": [b"x.png"] * n}


@pytest.mark.parametrize("py2", [True, False])
def test_cifar10_python_batches(tmp_path: Path, py2: bool) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in (1, 2):
        _dump(root / f"data_batch_{i}", _batch(50, i), py2)
    _dump(root / "test_batch", _batch(20, 9), py2)
    _dump(root / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, py2)
    data = load_dataset(str(root))
    assert data.name == "cifar10" and data.classes == CIFAR10_CLASSES and data.natural_images
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 20)
    assert data.input_shape == (3, 32, 32) and data.mean.shape == (3,)
    raw = _batch(20, 9)[b"data"].reshape(-1, 3, 32, 32)  # planes R, G, B of 32x32, row-major
    np.testing.assert_array_equal(data.test.x, raw.astype(np.float32))


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _dump(root / "train", _batch(200, 1, b"fine_labels", 100), True)
    _dump(root / "test", _batch(30, 2, b"fine_labels", 100), True)
    _dump(root / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, True)
    data = load_dataset(str(root))
    assert data.name == "cifar100" and len(data.classes) == 100 and data.classes[7] == "c7"
    assert (len(data.train) + len(data.val), len(data.test)) == (200, 30)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_cifar_file_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "evil"
    root.mkdir()
    _dump(root / "data_batch_1", {b"data": Exploit(), b"labels": [0]}, False)
    _dump(root / "test_batch", _batch(5, 1), False)
    with pytest.raises(DatasetError, match=r"data_batch_1: refusing to load (posix|os)\.system"):
        load_dataset(str(root))
    assert not (tmp_path / "pwned").exists()
    # an object array would carry arbitrary Python objects: refused too
    _dump(root / "data_batch_1", {b"data": np.array([[1] * 3072], dtype=object), b"labels": [0]}, False)
    with pytest.raises(DatasetError, match="numeric numpy array"):
        load_dataset(str(root))


@pytest.mark.parametrize(("batch", "message"), [
    ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, r"must be \[N, 3072\]"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "must be 4 integers"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, r"labels must be in \[0, 9\]"),
    ({b"data": np.zeros((4, 3072), np.uint8)}, "no 'labels' list"),
])
def test_cifar_errors_name_the_file_and_the_problem(tmp_path: Path, batch: dict, message: str) -> None:
    _dump(tmp_path / "data_batch_1", batch, True)
    _dump(tmp_path / "test_batch", _batch(5, 1), True)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(tmp_path))
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(DatasetError, match="data_batch_1: not a CIFAR python batch file"):
        load_dataset(str(tmp_path))


def _image(path: Path, value: int, size: tuple[int, int] = (6, 5), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (value, 255 - value, value // 2) if mode == "RGB" else value
    Image.new(mode, size, color).save(path)


def test_image_folders_split_or_given(tmp_path: Path) -> None:
    for c, name in enumerate(["cat", "dog"]):
        for i in range(10):
            _image(tmp_path / "flat" / name / f"{i}.png", 10 * i + c)
    data = load_dataset(str(tmp_path / "flat"))
    assert data.classes == ("cat", "dog") and data.input_shape == (3, 5, 6)  # [C, H, W]
    assert (len(data.train), len(data.val), len(data.test)) == (12, 4, 4)
    assert not data.natural_images  # augmentation stays opt-in for arbitrary image folders
    for split in ("train", "test"):
        for c, name in enumerate(["a", "b", "c"]):
            for i in range(4 if split == "train" else 2):
                _image(tmp_path / "split" / split / name / f"{i}.png", 40 * c + i, mode="L")
    data = load_dataset(str(tmp_path / "split"))
    assert data.input_shape == (1, 5, 6) and (len(data.train) + len(data.val), len(data.test)) == (12, 6)
    assert sorted(set(data.test.y.tolist())) == [0, 1, 2]


def test_image_folder_errors(tmp_path: Path) -> None:
    _image(tmp_path / "sizes" / "a" / "0.png", 1)
    _image(tmp_path / "sizes" / "b" / "0.png", 1, size=(7, 7))
    with pytest.raises(DatasetError, match="images differ in size.*resize them"):
        load_dataset(str(tmp_path / "sizes"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    _image(tmp_path / "empty" / "b" / "0.png", 1)
    with pytest.raises(DatasetError, match=r"class folder\(s\) \['a'\] hold no images"):
        load_dataset(str(tmp_path / "empty"))
    _image(tmp_path / "broken" / "a" / "0.png", 1)
    (tmp_path / "broken" / "b").mkdir()
    (tmp_path / "broken" / "b" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"0.png: cannot read the image"):
        load_dataset(str(tmp_path / "broken"))
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(str(tmp_path / "missing"))


def test_augmentation_is_for_images_and_on_by_default_for_cifar(tmp_path: Path) -> None:
    import torch

    from snapserve.trainer.config import TrainConfig
    from snapserve.trainer.distributed import DistContext
    from snapserve.trainer.errors import ConfigError
    from snapserve.trainer.train import _batches

    cpu, one = torch.device("cpu"), DistContext()
    with pytest.raises(ConfigError, match=r"augment .* needs images \[N, C, H, W\]; mnist1d"):
        _batches(TrainConfig(out="x", augment=True), load_dataset("mnist1d"), cpu, one)
    root = tmp_path / "cifar"
    root.mkdir()
    _dump(root / "data_batch_1", _batch(40, 1), False)
    _dump(root / "test_batch", _batch(10, 2), False)
    cifar = load_dataset(str(root))
    batches = _batches(TrainConfig(out="x", batch_size=8), cifar, cpu, one)
    assert batches.augment_fill is not None  # default on for CIFAR: padding = normalised black
    np.testing.assert_allclose(batches.augment_fill.numpy(), -cifar.mean / cifar.std, rtol=1e-6)
    assert _batches(TrainConfig(out="x", batch_size=8, augment=False), cifar, cpu, one).augment_fill is None
    first = next(batches.epoch(0))
    assert first.x.shape == (8, 3, 32, 32) and torch.equal(first.x, next(batches.epoch(0)).x)


def test_cifar_labels_sharing_references_are_refused_before_numpy_expands_them(
        tmp_path: Path) -> None:
    # ~9 KB of pickle: 4 labels, each the same list of lists, which np.asarray would expand to
    # 4 x 3000 x 3000 int64 (~290 MB; the 1.4 GB with one more level).
    row = [0] * 3000
    grid = [row] * 3000
    _dump(tmp_path / "data_batch_1", {b"data": np.zeros((4, 3072), np.uint8),
                                      b"labels": [grid] * 4}, False)
    _dump(tmp_path / "test_batch", _batch(5, 1), False)
    assert (tmp_path / "data_batch_1").stat().st_size < 64 * 1024
    with pytest.raises(DatasetError, match="'labels' must be 4 integers .* holding other than "
                                           "integers"):
        load_dataset(str(tmp_path))
    # names in batches.meta likewise: strings only
    _dump(tmp_path / "data_batch_1", _batch(10, 1), False)
    _dump(tmp_path / "batches.meta", {b"label_names": [grid] * 10}, False)
    with pytest.raises(DatasetError, match="expected 10 names"):
        load_dataset(str(tmp_path))
