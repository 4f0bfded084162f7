"""One served model version: its manifest, its runtime and the batcher in front of it.

`predict` is what every service (native now, KServe v2 later) calls: check the input, queue it,
get this request's rows of the batch's scores back.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from server.batcher import Batcher, BatcherConfig
from server.errors import InferenceError, ModelLoadError
from server.inputs import conform_input
from server.manifest import Manifest, read_manifest, verify_checksums
from server.runtime import EnsembleRuntime, RuntimeConfig
from server.scores import EnsembleScores, ensemble_scores

__all__ = ["ServedEnsemble", "load_version"]

logger = logging.getLogger(__name__)


class ServedEnsemble:
    """A loaded model version behind a dynamic batcher. Inference runs on `executor`."""

    def __init__(self, manifest: Manifest, path: Path, runtime: EnsembleRuntime,
                 batcher_config: BatcherConfig, executor: Executor) -> None:
        self.manifest = manifest
        self.path = path
        self.runtime = runtime
        self._executor = executor
        self.batcher: Batcher[np.ndarray, EnsembleScores] = Batcher(
            self._infer_batch, batcher_config, size=len, name=f"{manifest.name}:{manifest.version}")

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def max_batch_size(self) -> int:
        return self.batcher.config.max_batch_size

    async def predict(self, x: np.ndarray, timeout: float | None = None) -> EnsembleScores:
        """Scores for the examples in x ([B, ...]); InvalidInput if x does not fit the model."""
        x = conform_input(x, self.manifest.input, self.max_batch_size)
        return await self.batcher.submit(x, timeout=timeout)

    async def _infer_batch(self, inputs: list[np.ndarray]) -> list[EnsembleScores]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._infer_batch_sync, inputs)

    def _infer_batch_sync(self, inputs: list[np.ndarray]) -> list[EnsembleScores]:
        # Runs in a worker thread: the scores are computed here too, over the whole batch,
        # so the event loop only slices views.
        x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs, axis=0)
        scores = ensemble_scores(self.runtime.run(x), self.manifest.temperature)
        bounds = np.cumsum([0] + [len(i) for i in inputs])
        return [scores.rows(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def warm_up(self) -> None:
        """One example through every member: loads kernels now, and checks the class count."""
        x = np.zeros((1, *self.manifest.input.shape[1:]), dtype=self.manifest.input.dtype)
        try:
            classes = self.runtime.run(x).shape[-1]
        except InferenceError as exc:
            raise ModelLoadError(f"warm-up inference failed: {exc}") from exc
        if classes != len(self.manifest.classes):
            raise ModelLoadError(f"members output {classes} logits; the manifest lists "
                                 f"{len(self.manifest.classes)} classes")

    async def start(self) -> None:
        await self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()


def load_version(path: Path, runtime_config: RuntimeConfig, batcher_config: BatcherConfig,
                 executor: Executor) -> ServedEnsemble:
    """Read, verify and load <repository>/<model>/<version>; raises ModelLoadError if unusable."""
    manifest = read_manifest(path)
    verify_checksums(manifest, path)
    runtime = EnsembleRuntime(manifest.member_paths(path), manifest.input.name,
                              manifest.output_name, runtime_config)
    served = ServedEnsemble(manifest, path, runtime, batcher_config, executor)
    served.warm_up()
    return served
