"""The trainer from Python: `train_version` runs what `trainer train` runs and returns the version.

    from snapserve.trainer import train_version
    result = train_version(out="models", name="digits", dataset="digits", epochs=40, members=5)
    result.version_dir, result.manifest["metrics"]["accuracy"]

The keywords are TrainConfig's fields (trainer/config.py), the CLI's flags without dashes
(`--weight-decay` is `weight_decay`); the CLI builds the same TrainConfig and calls this. Progress
goes to the `snapserve.trainer` loggers (logging.basicConfig(level="INFO") shows it).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from snapserve.trainer.config import TrainConfig
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.publish import TrainResult
from snapserve.trainer.run import run_training

__all__ = ["TrainConfig", "TrainResult", "train_version"]


def train_version(config: TrainConfig | None = None, /, **settings: Any) -> TrainResult | None:
    """Trains and writes one version; its folder, manifest and metrics (None on DDP processes
    other than 0). Either a TrainConfig or its fields as keywords (`out` required); ConfigError
    names an unknown keyword."""
    if config is None:
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"train_version(): unknown setting(s) {unknown}; the settings are "
                              f"TrainConfig's fields: {sorted(known)}")
        if "out" not in settings:
            raise ConfigError("train_version(): out= (the model repository folder) is required")
        settings["out"] = str(settings["out"]) if isinstance(settings["out"], Path) else settings["out"]
        config = TrainConfig(**settings)
    elif settings:
        raise ConfigError("train_version(): give a TrainConfig or keywords, not both")
    return run_training(config)
