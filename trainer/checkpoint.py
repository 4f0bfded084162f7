"""Checkpoints: one file per run, rewritten atomically at the end of every epoch.

    <run dir>/checkpoint.pt     (run dir: --checkpoint-dir, or <out>/.runs/<name>-<method>-<hash>)

It holds everything an unbroken run would still have in memory: the model, the optimizer
(momentum buffers), the GradScaler, the step, the collector (members so far, or SWA/SWAG
moments), the RNG states and the per-epoch history for the report. Schedules are closed-form
and the data order is a function of (seed, epoch), so nothing else is needed to continue
exactly where the run stopped.

Writes go to a temporary file in the same folder, are fsynced, then `os.replace`d over the old
checkpoint: a run killed while writing leaves the previous checkpoint intact. Reads use
`torch.load(weights_only=True)`, so a checkpoint can only hold tensors and plain containers and
loading one never runs code; RNG states are stored as tensors and lists for that reason.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapserve.trainer.errors import CheckpointError

__all__ = ["CHECKPOINT_FILE", "FORMAT", "load_checkpoint", "restore_rng_state", "rng_state",
           "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Writes `state` to run_dir/checkpoint.pt atomically; CheckpointError if it cannot."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_name(f".{CHECKPOINT_FILE}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the checkpoint {path}: {error.strerror or error} "
                              "(a full disk or an unwritable --checkpoint-dir?)") from error
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint file (or a run folder's checkpoint.pt) onto the CPU, without running code."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways inside torch.load
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error}); "
                              "was it written by this trainer?") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a trainer checkpoint (format {FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a run touches, as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [version, list(internal), gauss_next],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
