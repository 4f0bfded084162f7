"""A served version in this process, without a server: notebooks, batch scoring, tests.

    from snapserve.server import Ensemble
    ensemble = Ensemble.load("models/digits/1")
    scores = ensemble.predict(x)          # raw inputs [B, ...], as a client sends them
    scores.probabilities, scores.mutual_information, ensemble.labels(scores.top_class)

It is the server's own path, not a copy: the manifest read and checked, every graph's checksum
verified, the runtime the server builds (fused graph or members, timed when `graph="auto"`) and
the same scores (`snapserve.proto.scores` through the runtime), so an answer here equals the
server's for the same version and inputs (tests/server/test_inprocess.py). It lives in the server
package, not the trainer's, because loading and scoring a version is the server's side of the
repository contract; it needs ONNX Runtime and numpy, not torch, gRPC or an event loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from snapserve.proto.scores import EnsembleScores
from snapserve.server.config import BatcherConfig, RuntimeConfig
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.inputs import conform_input
from snapserve.server.models.loading import load_version
from snapserve.server.models.manifest import Manifest

__all__ = ["Ensemble"]

logger = logging.getLogger(__name__)


class Ensemble:
    """One model version, loaded as the server loads it; `predict` is synchronous."""

    def __init__(self, served: ServedEnsemble) -> None:
        self._served = served

    @classmethod
    def load(cls, path: str | Path, *, device: Literal["auto", "cpu", "cuda"] = "cpu",
             graph: Literal["auto", "fused", "members"] = "auto", intra_op_threads: int = 0,
             allow_nonfinite: bool = False) -> Ensemble:
        """The version at `path` (<repository>/<model>/<version>/); ModelLoadError says why not.
        `intra_op_threads` 0: chosen at load, as the server's auto does."""
        config = RuntimeConfig(device=device, graph=graph, instances=1,
                               intra_op_threads=intra_op_threads, allow_nonfinite=allow_nonfinite)
        return cls(load_version(Path(path), config, BatcherConfig()))

    @property
    def manifest(self) -> Manifest:
        return self._served.manifest

    @property
    def name(self) -> str:
        return self._served.name

    @property
    def version(self) -> int:
        return self._served.version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    def labels(self, top_class: np.ndarray) -> np.ndarray:
        """The class labels of `top_class` indices."""
        return np.asarray(self.classes)[np.asarray(top_class)]

    def predict(self, x: np.ndarray) -> EnsembleScores:
        """Every score for the batch `x` ([B, ...] raw inputs of the manifest's dtype and shape,
        any B); InvalidInput says what does not fit, as the server would."""
        x = np.asarray(x)
        x = conform_input(x, self.manifest.input, max(int(x.shape[0]) if x.ndim else 1, 1),
                          self._served.allow_nonfinite)
        return self._served.runtime.scores(x)

    def close(self) -> None:
        """Releases the ONNX Runtime sessions now (else when the object is collected)."""
        self._served.terminate()

    def __enter__(self) -> Ensemble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
