"""Architectures by name. Each takes the input shape without the batch axis and the class count,
and returns logits [B, classes]. Inputs arrive normalized; the graphs never normalize.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from trainer.errors import ConfigError

__all__ = ["ARCHITECTURES", "build_model", "cnn", "mlp"]


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Two hidden layers; flattens any input shape."""
    features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU()]


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A small VGG-style CNN with BatchNorm, sized for 8x8 digits on a CPU.

    Global average pooling makes it work for any [C, H, W] with H, W >= 2.
    """
    if len(input_shape) != 3:
        raise ConfigError(f"arch 'cnn' needs inputs shaped [N, C, H, W], got [N, {', '.join(map(str, input_shape))}]")
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


ARCHITECTURES: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}") from None
    return builder(tuple(input_shape), num_classes)
