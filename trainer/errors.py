"""The trainer's named exceptions. Callers catch `TrainerError` for any of them."""

from __future__ import annotations

__all__ = ["ConfigError", "DatasetError", "ExportParityError", "RepositoryError", "TrainerError"]


class TrainerError(Exception):
    """Base class of every error the trainer raises on purpose."""


class ConfigError(TrainerError):
    """A setting is invalid; the message names the field."""


class DatasetError(TrainerError):
    """A dataset cannot be found, read, or does not have the expected arrays."""


class ExportParityError(TrainerError):
    """An exported ONNX graph does not reproduce the PyTorch model's probabilities."""

    def __init__(self, path: str, batch_size: int, max_abs_diff: float, tolerance: float) -> None:
        self.path = path
        self.batch_size = batch_size
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        super().__init__(
            f"{path}: ONNX Runtime and PyTorch probabilities differ by {max_abs_diff:.3g} "
            f"(tolerance {tolerance:.3g}) on a batch of {batch_size}"
        )


class RepositoryError(TrainerError):
    """A model repository version cannot be written or fails verification."""
