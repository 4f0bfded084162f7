"""The installed version of snapserve, for `--version` and KServe ServerMetadata."""

from __future__ import annotations

from importlib import metadata

__all__ = ["DISTRIBUTION", "package_version"]

DISTRIBUTION = "snapserve-ensembles"  # the distribution's name on PyPI (`snapserve` is taken)


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"
