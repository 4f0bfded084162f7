"""`trainer train` end to end: the settings -> a trained ensemble -> a published version.

    result = run_training(TrainConfig(out="models"))

Under torchrun every process trains its shard (`train.py`); process 0 alone evaluates, exports
and writes the version (`publish.py`), and the others return None.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from snapserve.trainer.config import TrainConfig
from snapserve.trainer.datasets import load_dataset
from snapserve.trainer.distributed import DistContext, close_distributed, init_distributed
from snapserve.trainer.errors import CheckpointError, RepositoryError
from snapserve.trainer.publish import TrainResult, publish_version
from snapserve.trainer.train import resolve_device, seed_everything, train_ensemble

__all__ = ["remove_if_empty", "run_training"]

logger = logging.getLogger(__name__)


def run_training(config: TrainConfig) -> TrainResult | None:
    """Trains and publishes one run; None on DDP processes other than 0."""
    context = init_distributed(config.device)
    finished = False
    try:
        torch.set_num_threads(config.threads)
        device = resolve_device(config.device, context)
        seed_everything(config.seed)
        if context.is_main:
            _check_writable(Path(config.out), "output folder (--out)", RepositoryError)
            _check_writable(config.run_dir(), "checkpoint folder", CheckpointError)
        try:
            result = _train_and_publish(config, context, device)
        except BaseException:  # an error or Ctrl-C: no empty checkpoint folder left behind
            if context.is_main:
                remove_if_empty(config.run_dir())
            raise
        finished = True
        return result
    finally:
        # A process that fails leaves at once: torchrun then stops the others, where waiting
        # for them would hold this one until they reach the end or time out.
        close_distributed(context, wait=finished)


def _train_and_publish(config: TrainConfig, context: DistContext, device: torch.device,
                       ) -> TrainResult | None:
    dataset = load_dataset(config.dataset)
    logger.info("dataset %s: %d train, %d val, %d test, input %s, %d classes; device %s%s",
                dataset.name, len(dataset.train), len(dataset.val), len(dataset.test),
                list(dataset.input_shape), dataset.num_classes, device,
                f", {context.world_size} processes" if context.enabled else "")
    ensemble = train_ensemble(config, dataset, device, context)
    if not context.is_main:
        return None
    return publish_version(config, dataset, ensemble)


def remove_if_empty(run_dir: Path) -> None:
    """Removes a run's checkpoint folder that holds nothing (a run that failed or was stopped
    before its first checkpoint), and `.runs` with it when that is empty too."""
    for folder in (run_dir, run_dir.parent) if run_dir.parent.name == ".runs" else (run_dir,):
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            return


def _check_writable(folder: Path, what: str, error: type[Exception]) -> None:
    """Fails before training, not after it, when results could not be saved."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise error(f"cannot write to the {what} {folder}: {exc.strerror or exc}") from exc
