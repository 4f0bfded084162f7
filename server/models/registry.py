"""The model registry: model name -> version -> ServedEnsemble, shared by every service.

The ModelManager (lifecycle.py) fills it from the <repository>/<model>/<version>/ folders that
`scan_repository` finds; a request looks its version up once (`get`) and is sent to it by the
pipeline (api/pipeline.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Callable, Iterator

from snapserve.server.errors import ConfigError, ModelNotFound, VersionNotFound
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.manifest import MODEL_NAME

__all__ = ["ModelRegistry", "check_repository_root", "scan_repository"]

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"[1-9][0-9]*")  # positive decimal integers, written the one canonical way


class ModelRegistry:
    """Loaded model versions by name; the default version of a model is its newest loaded one.

    Changed only on the event loop thread; `add` and `remove` are each one step, so a request
    sees the registry before or after a switch of versions, never half of it.
    """

    def __init__(self) -> None:
        self._models: dict[str, dict[int, ServedEnsemble]] = {}
        # Why versions of a model were refused at load, by version (the ModelManager sets it):
        # the NOT_FOUND messages name the reason, so a client learns it without the server log.
        self.refusal_reasons: Callable[[str], dict[int, str]] = lambda name: {}

    def add(self, served: ServedEnsemble) -> None:
        self._models.setdefault(served.name, {})[served.version] = served

    def remove(self, name: str, version: int) -> ServedEnsemble:
        """Take a version out (ModelNotFound / VersionNotFound); the caller closes it."""
        versions = self._models_named(name)
        if version not in versions:
            raise VersionNotFound(f"model {name!r} has no version {version} loaded")
        served = versions.pop(version)
        if not versions:
            del self._models[name]
        return served

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def loaded(self) -> list[ServedEnsemble]:
        """Every loaded version, by name then version. Safe from other threads (the metrics
        endpoint): each list() copy of a dict is one step under the GIL."""
        models = sorted(list(self._models.items()))
        return [served for _, versions in models for _, served in sorted(list(versions.items()))]

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
            refused = self.refusal_reasons(name).get(version)
            why = "" if refused is None else f" (refused at load: {refused})"
            raise VersionNotFound(f"model {name!r} has no version {version}{why}; loaded versions: "
                                  f"{sorted(versions)} (0 asks for the default)")
        return versions[version]

    def _models_named(self, name: str) -> dict[int, ServedEnsemble]:
        if name not in self._models:
            known = ", ".join(self.names()) or "none"
            why = "".join(f"; version {v} was refused at load: {reason}" for v, reason in
                          sorted(self.refusal_reasons(name).items(), reverse=True))
            raise ModelNotFound(f"model {name!r} is not served{why}; models: {known}")
        return self._models[name]

    def __iter__(self) -> Iterator[ServedEnsemble]:
        return iter(self.loaded())

    def __len__(self) -> int:
        return sum(len(v) for v in self._models.values())

    def terminate(self) -> None:
        """Stop every model's runs in progress (the server's grace period is over)."""
        for served in self:
            served.terminate()

    async def close(self) -> None:
        # All at once: every model refuses new requests from the same moment (server shutdown).
        await asyncio.gather(*(served.close() for served in self))


def check_repository_root(root: Path) -> None:
    """ConfigError when `root` is a model folder (its folders are versions with a manifest.json)
    rather than the repository above it: served as a repository it would hold no model, and
    start with nothing to serve."""
    versions = sorted((p.name for p in root.iterdir()
                       if p.is_dir() and _VERSION.fullmatch(p.name) and (p / "manifest.json").is_file()),
                      key=int)
    if versions:
        shown = ", ".join(f"{v}/" for v in versions[:3]) + (", ..." if len(versions) > 3 else "")
        parent = root.resolve().parent
        raise ConfigError(f"model repository {str(root)!r}: this looks like a model folder (its "
                          f"folders {shown} are versions with a manifest.json); pass its parent, "
                          f"--model-repository {str(parent)!r}, which serves it as model "
                          f"{root.resolve().name!r}")


def scan_repository(root: Path, warn: bool = True) -> dict[str, list[Path]]:
    """Model name -> its version folders, newest first. Hidden, temporary and non-integer
    folders (`.tmp-3-ab12`, `latest`) are skipped, as the contract says. `warn=False` skips
    them quietly (a poller would repeat the same warnings every few seconds)."""
    models: dict[str, list[Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if not MODEL_NAME.fullmatch(model_dir.name):
            if warn and not model_dir.name.startswith("."):
                logger.warning("skipping %s: not a valid model name", model_dir)
            continue
        try:
            versions = [p for p in model_dir.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
        except FileNotFoundError:  # removed while we looked (a poller's scan races deletions)
            continue
        if versions:
            models[model_dir.name] = sorted(versions, key=lambda p: int(p.name), reverse=True)
        elif warn:
            logger.warning("skipping model %s: no version folders", model_dir.name)
    return models

