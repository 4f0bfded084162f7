"""The model registry: model name -> version -> ServedEnsemble, shared by every service.

`load_repository` fills it from <repository>/<model>/<version>/ folders. It loads the newest
version of each model that passes its checks; a version that fails is refused with one log line
and the next older one is tried, so a broken upload never takes a model (or its neighbours) down.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import Executor
from pathlib import Path
from typing import Iterator

from server.batcher import BatcherConfig
from server.ensemble import ServedEnsemble, load_version
from server.errors import ModelLoadError, ModelNotFound, VersionNotFound
from server.manifest import MODEL_NAME
from server.runtime import RuntimeConfig

__all__ = ["ModelRegistry", "load_repository", "scan_repository"]

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"[1-9][0-9]*")  # positive decimal integers, written the one canonical way


class ModelRegistry:
    """Loaded model versions by name; the default version of a model is its newest loaded one."""

    def __init__(self) -> None:
        self._models: dict[str, dict[int, ServedEnsemble]] = {}

    def add(self, served: ServedEnsemble) -> None:
        self._models.setdefault(served.name, {})[served.version] = served

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models_named(name))

    def default_version(self, name: str) -> int:
        return max(self._models_named(name))

    def get(self, name: str, version: int = 0) -> ServedEnsemble:
        """The model version to serve; version 0 means the default. ModelNotFound / VersionNotFound."""
        versions = self._models_named(name)
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise VersionNotFound(f"model {name!r} has no version {version}; loaded versions: "
                                  f"{sorted(versions)} (0 asks for the default)")
        return versions[version]

    def _models_named(self, name: str) -> dict[int, ServedEnsemble]:
        if name not in self._models:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"model {name!r} is not served; models: {known}")
        return self._models[name]

    def __iter__(self) -> Iterator[ServedEnsemble]:
        for name in self.names():
            yield from (self._models[name][v] for v in sorted(self._models[name]))

    def __len__(self) -> int:
        return sum(len(v) for v in self._models.values())

    async def start(self) -> None:
        for served in self:
            await served.start()

    async def close(self) -> None:
        for served in self:
            await served.close()


def scan_repository(root: Path) -> dict[str, list[Path]]:
    """Model name -> its version folders, newest first. Hidden, temporary and non-integer
    folders (`.tmp-3-ab12`, `latest`) are skipped, as the contract says."""
    models: dict[str, list[Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if not MODEL_NAME.fullmatch(model_dir.name):
            if not model_dir.name.startswith("."):
                logger.warning("skipping %s: not a valid model name", model_dir)
            continue
        versions = [p for p in model_dir.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
        if versions:
            models[model_dir.name] = sorted(versions, key=lambda p: int(p.name), reverse=True)
        else:
            logger.warning("skipping model %s: no version folders", model_dir.name)
    return models


def load_repository(root: Path, runtime_config: RuntimeConfig, batcher_config: BatcherConfig,
                    executor: Executor) -> ModelRegistry:
    """A registry holding the newest loadable version of every model under `root`."""
    registry = ModelRegistry()
    for name, version_dirs in scan_repository(root).items():
        for path in version_dirs:
            try:
                served = load_version(path, runtime_config, batcher_config, executor)
            except ModelLoadError as exc:
                logger.error("refusing model %s version %s: %s", name, path.name, exc)
                continue
            except Exception:  # a bug or an OS error must not take the other models down
                logger.exception("refusing model %s version %s: unexpected error", name, path.name)
                continue
            registry.add(served)
            logger.info("loaded model %s version %d: %d members, method %s, on %s",
                        name, served.version, served.runtime.members, served.manifest.method or "?",
                        served.runtime.provider)
            break
        else:
            logger.error("model %s: no loadable version among %s; not serving it",
                         name, [p.name for p in version_dirs])
    return registry
