"""The standard CIFAR augmentation on batched tensors: a random crop of the image padded by 4
pixels, and a horizontal flip with probability 1/2 (He et al. 2016; torchvision's
RandomCrop(32, padding=4) + RandomHorizontalFlip()).

It runs on the training device, on normalized batches. The padding is the normalized value of a
black pixel, (0 - mean) / std per channel: what torchvision gets by padding the raw image before
normalizing. Randomness comes from a generator the caller seeds, so a resumed run sees the same
crops and flips.
"""

from __future__ import annotations

import torch

__all__ = ["PADDING", "random_crop_flip"]

PADDING = 4


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, fill: torch.Tensor,
                     padding: int = PADDING) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H, W]; `fill` [C] is the per-channel padding value."""
    b, c, h, w = x.shape
    padded = fill.to(x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is reversed column indices
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
