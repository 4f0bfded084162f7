"""snapserve trainer: trains snapshot ensembles and writes them to a model repository.

The trainer and the server never import each other; `docs/model-repository.md` is their contract.

    from snapserve.trainer import train_version
    result = train_version(out="models", name="digits", dataset="digits", epochs=40, members=5)

`train_version` (trainer/api.py) is loaded on first use: importing the package loads no torch.
"""

from typing import Any

__all__ = ["TrainConfig", "TrainResult", "train_version"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from snapserve.trainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'snapserve.trainer' has no attribute {name!r}")
