"""The repository settings (`RepositoryConfig`): the version policy, polling, explicit control.

The version policy says which of a model's versions on disk are served (`wanted_versions`):
latest, the newest loadable one; all, every loadable one (requests without a version get the
newest); specific, only the pinned ones (models without a pin are not served).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from snapserve.server.config import MAX_MODEL_NAME, MODEL_NAME, VERSION_POLICIES, RepositoryConfig
from snapserve.server.errors import InvalidModelName

__all__ = ["MAX_MODEL_NAME", "VERSION_POLICIES", "RepositoryConfig", "check_model_name",
           "wanted_versions"]


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
