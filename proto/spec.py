"""What a model version says about itself, as both sides read it: its input and its members.

The server reads these from manifest.json (docs/model-repository.md) and the client from
GetModel, which carries the same fields; one definition keeps the two from drifting apart.
numpy only, like the rest of this leaf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["INPUT_KINDS", "LOGITS", "NORMALIZED", "OUTPUT_KINDS", "PROBABILITIES", "RAW", "InputSpec",
           "MemberSpec", "Normalization"]

# What a version's graphs take (manifest `input.kind`, GetModel `InputSpec.kind`): RAW, the graphs
# apply `normalization` themselves, so every client sends raw values; NORMALIZED, the client
# applies it before sending (versions exported before normalisation moved into the graphs).
RAW, NORMALIZED = "raw", "normalized"
INPUT_KINDS = (RAW, NORMALIZED)
# What each member graph outputs (manifest `output.kind`): LOGITS, softmax gives probabilities;
# PROBABILITIES, rows that already sum to one (an imported graph ending in a softmax).
LOGITS, PROBABILITIES = "logits", "probabilities"
OUTPUT_KINDS = (LOGITS, PROBABILITIES)


@dataclass(frozen=True)
class Normalization:
    """Model input = (raw - mean) / std, broadcast along `axis`; applied by the graphs (input kind
    RAW) or by clients (NORMALIZED)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    axis: int


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 for the batch dimension
    normalization: Normalization | None
    kind: str = NORMALIZED  # RAW or NORMALIZED, see above

    @property
    def client_normalization(self) -> Normalization | None:
        """The normalisation a client must apply before sending: None when the graphs apply it."""
        return self.normalization if self.kind == NORMALIZED else None


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
    # The graph file's size in bytes, when the manifest gives it (the trainer writes it): checked
    # before the file is read, so a file that is not the one published costs no memory.
    size: int | None = None
