"""Architectures: shapes, the published parameter counts, depth rules, user factories, and ONNX
export of the ones with unusual ops."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from snapserve.trainer.errors import ConfigError
from snapserve.trainer.export import check_parity, export_onnx
from snapserve.trainer.models import build_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("arch", "depth", "width", "params"), [
    ("resnet", 20, None, 269_722),       # He et al. 2016: "0.27M"
    ("resnet", 110, None, 1_727_962),    # "1.7M"
    ("preresnet", 164, None, 1_703_258),  # bottleneck blocks from depth 44, as the SWA/FGE code
    ("wrn", 16, 4, 2_748_890),           # Zagoruyko & Komodakis: WRN-16-4 "2.7M"
    ("wrn", 28, 10, 36_479_194),         # WRN-28-10 "36.5M"
])
def test_cifar_networks_have_the_published_sizes(arch: str, depth: int, width: int | None, params: int) -> None:
    assert count(build_model(arch, (3, 32, 32), 10, depth=depth, width=width)) == params


@pytest.mark.parametrize(("arch", "shape", "options"), [
    ("mlp", (1, 8, 8), {}), ("cnn", (1, 8, 8), {}), ("cnn1d", (1, 40), {}),
    ("resnet", (3, 16, 16), {"depth": 8}), ("preresnet", (3, 16, 16), {"depth": 8}),
    ("preresnet", (3, 16, 16), {"depth": 47}), ("wrn", (3, 16, 16), {"depth": 10, "width": 1}),
])
def test_every_architecture_maps_a_batch_to_logits(arch: str, shape: tuple, options: dict) -> None:
    torch.manual_seed(0)
    model = build_model(arch, shape, 7, **options).eval()
    assert model(torch.randn(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize(("arch", "options", "order", "block"), [
    ("resnet", {"depth": 8}, ["conv", "bn", "layers", "fc"], ["conv1", "bn1", "conv2", "bn2"]),
    ("preresnet", {"depth": 8}, ["conv", "layers", "bn", "fc"], ["bn1", "conv1", "bn2", "conv2"]),
    ("preresnet", {"depth": 47}, ["conv", "layers", "bn", "fc"],
     ["bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "shortcut"]),
    ("wrn", {"depth": 10, "width": 4}, ["conv", "layers", "bn", "fc"], ["bn1", "conv1", "bn2", "conv2", "shortcut"]),
])
def test_state_dict_keys_keep_their_names_and_order(arch: str, options: dict, order: list[str],
                                                     block: list[str]) -> None:
    """Checkpoints and members written earlier load by these names: one network class serves
    every residual arch, and each keeps the keys (and their order) of the forward pass."""
    keys = list(build_model(arch, (3, 16, 16), 10, **options).state_dict())
    assert list(dict.fromkeys(k.split(".")[0] for k in keys)) == order
    # The first block projects its shortcut only where its channels grow (bottlenecks, wrn > 1).
    first = [k.split(".")[2] for k in keys if k.startswith("layers.0.")]
    assert list(dict.fromkeys(first)) == block
    assert keys[-2:] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize(("arch", "shape", "options", "message"), [
    ("resnet", (3, 32, 32), {"depth": 21}, r"6n\+2"),
    ("preresnet", (3, 32, 32), {"depth": 50}, r"9n\+2 from 44"),
    ("wrn", (3, 32, 32), {"depth": 20}, r"6n\+4"),
    ("cnn", (1, 40), {}, r"needs inputs shaped \[N, C, H, W\], got \[N, 1, 40\]"),
    ("cnn1d", (1, 8, 8), {}, r"\[N, C, L\]"),
    ("mlp", (4,), {"depth": 3}, "depth applies to"),
    ("resnet", (3, 32, 32), {"width": 2}, "width applies to"),
    ("vgg", (3, 32, 32), {}, "module:factory"),
])
def test_bad_architecture_settings_are_named(arch: str, shape: tuple, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(arch, shape, 10, **options)


def test_a_user_factory_by_module_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "import math, torch\n"
        "def tiny(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), num_classes))\n"
        "def broken(input_shape, num_classes):\n"
        "    return 'not a module'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_models:tiny", (1, 40), 10)
    assert model(torch.zeros(2, 1, 40)).shape == (2, 10)
    with pytest.raises(ConfigError, match="returned str, not a torch.nn.Module"):
        build_model("my_models:broken", (1, 40), 10)
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        build_model("my_models:nope", (1, 40), 10)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        build_model("no_such_module:f", (1, 40), 10)
    sys.modules.pop("my_models", None)


@pytest.mark.parametrize(("arch", "shape", "options"), [
    ("resnet", (3, 16, 16), {"depth": 8}),  # option-A shortcut: strided slice + channel padding
    ("cnn1d", (1, 40), {}),
])
def test_export_parity_of_the_new_architectures(arch: str, shape: tuple, options: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(arch, shape, 5, **options)
    model.train()
    with torch.no_grad():  # BatchNorm statistics away from their initial identity
        for _ in range(3):
            model(torch.randn(16, *shape) * 2 + 1)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, shape)
    x = np.random.default_rng(0).normal(size=(9, *shape)).astype(np.float32)
    assert check_parity(model, path, [x, x[:1]]) < 1e-4


def test_random_crop_flip_is_a_padded_crop_or_its_mirror() -> None:
    from snapserve.trainer.augment import random_crop_flip

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = random_crop_flip(x, torch.Generator().manual_seed(0), fill, padding=2)
    again = random_crop_flip(x, torch.Generator().manual_seed(0), fill, padding=2)
    assert out.shape == x.shape and torch.equal(out, again)  # seeded: a resumed run sees the same
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for c in range(3):
        padded[:, c][padded[:, c] == 0] = fill[c]
    padded[0, 0, 2, 2] = 0.0  # the one real zero pixel
    for b in range(2):
        crops = [padded[b, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], crop) or torch.equal(out[b], crop.flip(-1)) for crop in crops)
    flips = sum(
        not torch.equal(random_crop_flip(x[:1], torch.Generator().manual_seed(s), fill, padding=0), x[:1])
        for s in range(20))
    assert 3 < flips < 17  # padding 0: only the flip remains, with probability 1/2 per image
