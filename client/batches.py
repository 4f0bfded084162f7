"""A batch larger than a model's max_batch_size, sent as requests the server accepts and
answered as one: the clients' `predict(..., split=True)` and `ensemble-client predict`."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

__all__ = ["join_predictions", "split_batch"]


def split_batch(array: np.ndarray, max_batch_size: int) -> list[np.ndarray]:
    """`array` ([B, ...]) in consecutive views of at most `max_batch_size` rows (0: no limit)."""
    if max_batch_size < 1 or len(array) <= max_batch_size:
        return [array]
    return [array[start:start + max_batch_size] for start in range(0, len(array), max_batch_size)]


def join_predictions(parts: Sequence[Any]) -> Any:
    """One Prediction of the parts' rows, in order: every array joined along the batch axis
    (a score nobody asked for stays None); the model, version and request id of the first."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(part.version != first.version for part in parts):  # a new version came in between
        raise ValueError(f"the parts of a split batch were answered by versions "
                         f"{sorted({part.version for part in parts})} of {first.model!r}; ask for "
                         "one version (version=N) to split a batch across a switch")
    joined: dict[str, Any] = {}
    for item in dataclasses.fields(first):
        values = [getattr(part, item.name) for part in parts]
        if isinstance(values[0], np.ndarray):
            joined[item.name] = np.concatenate(values, axis=0)
    return dataclasses.replace(first, **joined)
