"""Architectures by name. Each takes the input shape without the batch axis and the class count,
and returns logits [B, classes]. Inputs arrive normalized; the graphs never normalize.

    build_model("resnet", (3, 32, 32), 10, depth=20)
    build_model("my_models:tiny_net", (1, 40), 10)      # a user's factory(input_shape, num_classes)

`mlp` (any shape), `cnn1d` ([C, L], e.g. MNIST-1D), `cnn` (small images), and the CIFAR-style
`resnet` (He et al. 2016, depth 6n+2: 20/32/56/110), `preresnet` (pre-activation, as in the
SWA/FGE reference code: basic blocks below depth 44, bottlenecks from 44 on, depth 9n+2) and
`wrn` (Zagoruyko & Komodakis 2016, WRN-depth-width, depth 6n+4).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from snapserve.trainer.errors import ConfigError

__all__ = ["ARCHITECTURES", "DEFAULT_DEPTH", "build_model", "check_arch", "cnn", "cnn1d", "mlp",
           "preresnet", "resnet", "wrn"]


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 128) -> nn.Module:
    """Two hidden layers of `width` units; flattens any input shape."""
    features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU()]


def _need_rank(arch: str, input_shape: tuple[int, ...], rank: int, layout: str) -> None:
    if len(input_shape) != rank:
        raise ConfigError(f"arch {arch!r} needs inputs shaped [N, {layout}], "
                          f"got [N, {', '.join(map(str, input_shape))}]")


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A small VGG-style CNN with BatchNorm, sized for 8x8 digits on a CPU.

    Global average pooling makes it work for any [C, H, W] with H, W >= 2.
    """
    _need_rank("cnn", input_shape, 3, "C, H, W")
    channels = input_shape[0]
    return nn.Sequential(
        *_conv_bn_relu(channels, width),
        *_conv_bn_relu(width, width),
        nn.MaxPool2d(2),
        *_conv_bn_relu(width, 2 * width),
        *_conv_bn_relu(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def cnn1d(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A 1-D CNN for sequences [C, L] such as MNIST-1D ([1, 40]), with BatchNorm.

    Three strided convolutions as in the MNIST-1D paper's CNN (which reaches ~94%), plus
    BatchNorm (so SWA's BatchNorm recomputation matters here too) and a linear head on the
    flattened features: MNIST-1D digits sit at varying positions, and the paper's CNN keeps
    position information the same way.
    """
    _need_rank("cnn1d", input_shape, 2, "C, L")
    channels, length = input_shape
    layers: list[nn.Module] = []
    for index, kernel in enumerate((5, 3, 3)):
        layers += [nn.Conv1d(channels if index == 0 else width, width, kernel, stride=2,
                             padding=kernel // 2, bias=False),
                   nn.BatchNorm1d(width), nn.ReLU()]
        length = (length + 2 * (kernel // 2) - kernel) // 2 + 1
    if length < 1:
        raise ConfigError(f"arch 'cnn1d' needs sequences of length >= 8, got {input_shape[1]}")
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * length, num_classes))


# ---- CIFAR-style residual networks ---------------------------------------------------------

def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class _ShortcutA(nn.Module):
    """He et al.'s option A for CIFAR: subsample and zero-pad the channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    """Post-activation basic block (ResNet v1)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        changes = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = _ShortcutA(planes - in_planes) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """Pre-activation basic block; `dropout` between its convolutions is the wide ResNet's."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(out)))))
        return out + shortcut


class _PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class _ResNet(nn.Module):
    """The CIFAR residual network every residual arch here shares: a 3x3 stem of 16 channels,
    three stages of `blocks_per_stage` blocks (the first block of stages 2 and 3 halves the
    resolution), global average pooling and a linear head.

    `preact`: pre-activation blocks leave the last BatchNorm and ReLU to the end of the network;
    post-activation ones (ResNet v1) have them after the stem instead. The BatchNorm is
    registered where it runs, so state_dict keys keep the order of the forward pass.
    """

    def __init__(self, in_channels: int, num_classes: int, block: Callable[[int, int, int], nn.Module],
                 blocks_per_stage: int, *, preact: bool, widths: tuple[int, int, int] = (16, 32, 64),
                 expansion: int = 1) -> None:
        super().__init__()
        self.preact = preact
        self.conv = _conv3x3(in_channels, 16)
        if not preact:
            self.bn = nn.BatchNorm2d(16)
        layers, planes = [], 16
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                layers.append(block(planes, width, 2 if stage > 0 and index == 0 else 1))
                planes = width * expansion
        self.layers = nn.Sequential(*layers)
        if preact:
            self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = F.relu(self.bn(self.layers(self.conv(x))))
        else:
            out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 20) -> nn.Module:
    """ResNet for CIFAR (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, depth 6n+2."""
    _need_rank("resnet", input_shape, 3, "C, H, W")
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"depth for arch 'resnet' must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    return _ResNet(input_shape[0], num_classes, _BasicBlock, (depth - 2) // 6, preact=False)


def preresnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 20) -> nn.Module:
    """Pre-activation ResNet (He et al. 2016b) in the layout of the SWA/FGE reference code: depth
    6n+2 with basic blocks below 44 (20, 32), 9n+2 with bottlenecks from 44 (56, 110, 164)."""
    _need_rank("preresnet", input_shape, 3, "C, H, W")
    valid = (depth - 2) % 9 == 0 if depth >= 44 else depth >= 8 and (depth - 2) % 6 == 0
    if not valid:
        raise ConfigError(f"depth for arch 'preresnet' must be 6n+2 below 44 (20, 32) or 9n+2 from 44 "
                          f"(56, 110, 164), got {depth}")
    if depth >= 44:
        return _ResNet(input_shape[0], num_classes, _PreActBottleneck, (depth - 2) // 9, preact=True,
                       expansion=_PreActBottleneck.expansion)
    return _ResNet(input_shape[0], num_classes, _PreActBlock, (depth - 2) // 6, preact=True)


def wrn(input_shape: tuple[int, ...], num_classes: int, depth: int = 16, width: int = 4,
        dropout: float = 0.0) -> nn.Module:
    """WRN-depth-width: pre-activation blocks, 16k/32k/64k channels, depth 6n+4 (16, 22, 28, 40)."""
    _need_rank("wrn", input_shape, 3, "C, H, W")
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"depth for arch 'wrn' must be 6n+4 (16, 22, 28, 40), got {depth}")
    return _ResNet(input_shape[0], num_classes, functools.partial(_PreActBlock, dropout=dropout),
                   (depth - 4) // 6, preact=True, widths=(16 * width, 32 * width, 64 * width))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp, "cnn": cnn, "cnn1d": cnn1d, "resnet": resnet, "preresnet": preresnet, "wrn": wrn,
}

# Which architectures take --depth / --width (and their defaults when not given).
DEFAULT_DEPTH = {"resnet": 20, "preresnet": 20, "wrn": 16}
_TAKES_WIDTH = {"mlp", "cnn", "cnn1d", "wrn"}


def check_arch(arch: str, depth: int | None, width: int | None) -> None:
    """Validates the names and which of depth/width apply; a user factory takes neither."""
    if ":" in arch:
        module, _, factory = arch.partition(":")
        if not module or not factory:
            raise ConfigError(f"arch {arch!r}: a user model is given as module:factory")
        if depth is not None or width is not None:
            raise ConfigError(f"depth and width do not apply to a user model ({arch!r})")
        return
    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch must be one of {sorted(ARCHITECTURES)} or module:factory, got {arch!r}")
    if depth is not None and arch not in DEFAULT_DEPTH:
        raise ConfigError(f"depth applies to {sorted(DEFAULT_DEPTH)}, not arch {arch!r}")
    if width is not None and arch not in _TAKES_WIDTH:
        raise ConfigError(f"width applies to {sorted(_TAKES_WIDTH)}, not arch {arch!r}")
    for field, value in (("depth", depth), ("width", width)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{field} must be an integer >= 1, got {value!r}")


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int, *,
                depth: int | None = None, width: int | None = None) -> nn.Module:
    check_arch(arch, depth, width)
    input_shape = tuple(input_shape)
    if ":" in arch:
        return _user_model(arch, input_shape, num_classes)
    options = {k: v for k, v in (("depth", depth), ("width", width)) if v is not None}
    return ARCHITECTURES[arch](input_shape, num_classes, **options)


def _user_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`module:factory`, found on sys.path or in the working directory. The working directory
    is searched last and only for this import: first, or left on sys.path for the run, a stray
    file there (json.py, a torch.py) would shadow installed modules in every later import."""
    module_name, _, factory_name = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path  # the `trainer` script lacks it
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"arch {spec!r}: cannot import {module_name!r}: {error}") from error
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"arch {spec!r}: {module_name} has no callable {factory_name!r}")
    model = factory(input_shape, num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"arch {spec!r}: factory(input_shape, num_classes) returned "
                          f"{type(model).__name__}, not a torch.nn.Module")
    return model

