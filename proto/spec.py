"""What a model version says about itself, as both sides read it: its input and its members.

The server reads these from manifest.json (docs/model-repository.md) and the client from
GetModel, which carries the same fields; one definition keeps the two from drifting apart.
numpy only, like the rest of this leaf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["InputSpec", "MemberSpec", "Normalization"]


@dataclass(frozen=True)
class Normalization:
    """Model input = (raw - mean) / std, broadcast along `axis`; applied by clients, not graphs."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    axis: int


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 for the batch dimension
    normalization: Normalization | None


@dataclass(frozen=True)
class MemberSpec:
    """One member: its graph file and checksum, where training took it, its own test metrics."""

    file: str
    sha256: str
    epoch: int
    step: int
    lr: float
    metrics: dict[str, float]
    # Files holding the graph's tensors outside it (ONNX external data, for graphs over 2 GiB),
    # as (file relative to the version folder, sha256); checked like the graph itself.
    external_data: tuple[tuple[str, str], ...] = ()
