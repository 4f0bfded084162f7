"""Writes model versions per docs/model-repository.md (manifest schema_version 1).

A version is written under `<repository>/<model>/.tmp-<version>-<random>/` and `os.rename`d to
`<version>` only when complete, so a server polling the folder never sees half a version.

    with VersionWriter(repository, "digits") as writer:
        export_onnx(model, writer.member_path(0), ...)
        version_dir = writer.commit(manifest, report)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from snapserve.trainer.errors import RepositoryError

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "VersionWriter", "build_manifest", "next_version",
           "sha256_file", "validate_model_name", "verify_version"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RENAME_ATTEMPTS = 5  # another trainer may take the version we picked; then we pick again


def validate_model_name(name: str) -> str:
    if not _MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise RepositoryError(f"model name {name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]*")
    return name


def next_version(model_dir: Path) -> int:
    """max(existing decimal version folders) + 1; anything else in the folder is ignored."""
    versions = [int(p.name) for p in model_dir.iterdir()
                if p.is_dir() and p.name.isdecimal() and int(p.name) > 0] if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(*, name: str, method: str, input_shape: list[int], normalization: dict | None,
                   classes: list[str], members: list[dict[str, Any]], metrics: dict[str, float],
                   training: dict[str, Any], opset: int, temperature: float = 1.0,
                   input_name: str = "input", output_name: str = "logits") -> dict[str, Any]:
    """A schema-1 manifest without `version` and the members' `sha256` (commit fills them in).

    `members` entries carry file (relative to the version folder), epoch, step, lr, metrics.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "name": validate_model_name(name),
        "version": None,
        "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "method": method,
        "input": {"name": input_name, "dtype": "float32", "shape": [-1, *input_shape],
                  "normalization": normalization},
        "output": {"name": output_name, "kind": "logits", "shape": [-1, len(classes)]},
        "classes": list(classes),
        "temperature": float(temperature),
        "members": members,
        "metrics": metrics,
        "onnx": {"opset": opset},
        "training": training,
    }


class VersionWriter:
    """Builds one version in a hidden temporary folder; `commit` publishes it atomically.

    Leaving the `with` block without a commit (an error) removes the temporary folder.
    """

    def __init__(self, repository: str | Path, name: str) -> None:
        self.model_dir = Path(repository) / validate_model_name(name)
        self.name = name
        self.tmp_dir: Path | None = None
        self.version_dir: Path | None = None

    def __enter__(self) -> VersionWriter:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        guess = next_version(self.model_dir)
        self.tmp_dir = self.model_dir / f".tmp-{guess}-{secrets.token_hex(4)}"
        (self.tmp_dir / "members").mkdir(parents=True)
        (self.tmp_dir / "report").mkdir()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.version_dir is None and self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    @property
    def directory(self) -> Path:
        """The temporary version folder: write extra report files here before commit."""
        if self.tmp_dir is None:
            raise RepositoryError("VersionWriter used outside its `with` block")
        return self.tmp_dir

    @staticmethod
    def member_file(index: int) -> str:
        return f"members/member-{index:03d}.onnx"

    def member_path(self, index: int) -> Path:
        return self.directory / self.member_file(index)

    def commit(self, manifest: dict[str, Any], report: dict[str, Any]) -> Path:
        """Checksums the members, writes manifest and report/metrics.json, renames into place."""
        tmp = self.directory
        for member in manifest["members"]:
            member["sha256"] = sha256_file(self._inside(tmp, member["file"]))
            # The server compares the size before it reads the file (server/models/manifest.py).
            member["size"] = self._inside(tmp, member["file"]).stat().st_size
        _write_json(tmp / "report" / "metrics.json", report)
        for _ in range(_RENAME_ATTEMPTS):
            version = next_version(self.model_dir)
            manifest["version"] = version
            _write_json(tmp / MANIFEST_NAME, manifest)
            target = self.model_dir / str(version)
            try:
                # rename(2) replaces an EMPTY directory; refuse that case ourselves.
                if target.exists():
                    continue
                os.rename(tmp, target)
            except OSError as error:  # ENOTEMPTY/EEXIST: another writer won the race
                logger.warning("version %d of %s taken while writing (%s); retrying", version, self.name, error)
                continue
            self.version_dir = target
            logger.info("wrote %s", target)
            return target
        raise RepositoryError(f"could not claim a version folder in {self.model_dir} "
                              f"after {_RENAME_ATTEMPTS} attempts")

    @staticmethod
    def _inside(root: Path, relative: str) -> Path:
        path = (root / relative).resolve()
        if not path.is_relative_to(root.resolve()):
            raise RepositoryError(f"member file {relative!r} is outside the version folder")
        if not path.is_file():
            raise RepositoryError(f"member file {relative!r} was not written")
        return path


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def verify_version(version_dir: str | Path) -> dict[str, Any]:
    """Reads a version's manifest and checks every member's sha256; returns the manifest."""
    version_dir = Path(version_dir)
    try:
        manifest = json.loads((version_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as error:
        raise RepositoryError(f"{version_dir}: cannot read {MANIFEST_NAME}: {error}") from error
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RepositoryError(f"{version_dir}: schema_version {manifest.get('schema_version')!r}, "
                              f"expected {SCHEMA_VERSION}")
    for member in manifest.get("members", []):
        path = VersionWriter._inside(version_dir, member["file"])
        if sha256_file(path) != member["sha256"]:
            raise RepositoryError(f"{version_dir}: {member['file']} does not match its sha256")
    return manifest
