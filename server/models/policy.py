"""The repository settings (`RepositoryConfig`): the version policy, polling, explicit control.

The version policy says which of a model's versions on disk are served (`wanted_versions`):
latest, the newest loadable one; all, every loadable one (requests without a version get the
newest); specific, only the pinned ones (models without a pin are not served).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from snapserve.server.errors import ConfigError, InvalidModelName
from snapserve.server.models.manifest import MODEL_NAME

__all__ = ["MAX_MODEL_NAME", "VERSION_POLICIES", "RepositoryConfig", "check_model_name",
           "wanted_versions"]

VERSION_POLICIES = ("latest", "all", "specific")
MAX_MODEL_NAME = 255  # one path component on common file systems


@dataclass(frozen=True)
class RepositoryConfig:
    # latest: the newest loadable version of each model; all: every loadable version (requests
    # without a version get the newest); specific: only the versions in `pinned`, and models
    # without a pin are not served.
    version_policy: str = "latest"
    # Model name -> the versions to serve, with version_policy "specific" (CLI: --pin digits=2).
    pinned: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Seconds between scans for new, broken or removed versions. 0: the repository is read at
    # start-up and on RepositoryModelLoad only. A scan lists folders; it reads no model file
    # unless something changed, so a few seconds costs little.
    poll_interval_s: float = 0.0
    # RepositoryModelLoad / RepositoryModelUnload. Off by default: they let any client that
    # reaches the port change what is served.
    allow_repository_control: bool = False

    def __post_init__(self) -> None:
        if self.version_policy not in VERSION_POLICIES:
            raise ConfigError(f"version_policy must be one of {', '.join(VERSION_POLICIES)}, "
                              f"got {self.version_policy!r}")
        pinned = {}
        for name, versions in dict(self.pinned).items():
            try:
                check_model_name(name, "pinned")
            except InvalidModelName as exc:
                raise ConfigError(str(exc)) from None
            versions = tuple(sorted(set(versions)))
            if not versions or not all(isinstance(v, int) and v >= 1 for v in versions):
                raise ConfigError(f"pinned[{name!r}] must list versions >= 1, got {versions!r}")
            pinned[name] = versions
        object.__setattr__(self, "pinned", pinned)
        if pinned and self.version_policy != "specific":
            raise ConfigError(f"pinned versions need version_policy 'specific', not "
                              f"{self.version_policy!r}")
        if self.version_policy == "specific" and not pinned:
            raise ConfigError("version_policy 'specific' needs pinned versions (--pin MODEL=V)")
        if not (self.poll_interval_s >= 0 and math.isfinite(self.poll_interval_s)):
            raise ConfigError(f"poll_interval_s must be a number >= 0, "
                              f"got {self.poll_interval_s!r}")


def check_model_name(name: str, field: str = "model_name") -> str:
    """`name` if it is a plain model name; InvalidModelName otherwise (``, `..`, `a/b`, ...)."""
    if not isinstance(name, str) or len(name) > MAX_MODEL_NAME or not MODEL_NAME.fullmatch(name):
        raise InvalidModelName(
            f"{field} {name!r} is not a model name: expected letters, digits, '_', '.', '-', "
            f"starting with a letter or digit, at most {MAX_MODEL_NAME} characters")
    return name


def wanted_versions(config: RepositoryConfig, name: str, on_disk: Mapping[int, Path]) -> list[int]:
    """Versions to serve, newest first; with `latest`, the first loadable one of them."""
    if config.version_policy == "specific":
        return sorted(set(config.pinned.get(name, ())) & on_disk.keys(), reverse=True)
    return sorted(on_disk, reverse=True)
