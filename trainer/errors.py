"""The trainer's named exceptions. Callers catch `TrainerError` for any of them."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DatasetError", "ExportParityError", "RepositoryError",
           "TrainerError", "TrainingDiverged"]


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


class CheckpointError(TrainerError):
    """A checkpoint cannot be written or read, or does not belong to this run."""


class TrainingDiverged(TrainerError):
    """The loss became NaN or infinite; the message names the epoch and the step."""

    def __init__(self, epoch: int, where: str, loss: float) -> None:
        self.epoch = epoch
        self.where = where
        self.loss = loss
        super().__init__(
            f"the training loss became {loss} at epoch {epoch}, {where}: training stopped, and that "
            "epoch was not checkpointed. Lower --lr (or use --amp bf16 instead of fp16), or check "
            "the data for extreme values"
        )
