"""A member file's size is compared before it is read: with the manifest's `size` (the trainer
writes it), else with the 2 GiB a graph file may be. A 3 GiB sparse file is refused without the
server reading it (it took the server to 3.3 GiB before the checksum refused it)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from snapserve.server.errors import ChecksumMismatch
from snapserve.server.models.manifest import read_manifest, read_verified
from tests.support.models import write_repository


def _grow(path: Path, size: int) -> None:
    with path.open("r+b") as file:
        file.truncate(size)  # sparse: no disk, and no memory unless read


def _set_size(version: Path, size: int | None) -> None:
    manifest_path = version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["members"][0]["size"] = size
    manifest_path.write_text(json.dumps(manifest))


def test_a_size_that_is_not_the_manifests_is_refused_before_reading(tmp_path: Path) -> None:
    version = write_repository(tmp_path / "models") / "digits" / "1"
    member = version / read_manifest(version).members[0].file
    published = member.stat().st_size
    _set_size(version, published)
    assert read_verified(read_manifest(version), version)  # the right size loads
    _grow(member, 256 * 2**20)
    start = time.perf_counter()
    with pytest.raises(ChecksumMismatch, match=f"is {256 * 2**20} bytes, the manifest says "
                                               f"{published}"):
        read_verified(read_manifest(version), version)
    assert time.perf_counter() - start < 0.5


def test_without_a_size_a_graph_past_2_gib_is_refused_unread(tmp_path: Path) -> None:
    version = write_repository(tmp_path / "models") / "digits" / "1"
    _set_size(version, None)
    _grow(version / read_manifest(version).members[0].file, 3 * 2**30)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ChecksumMismatch, match="more than a graph file may be"):
        read_verified(read_manifest(version), version)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 256 * 1024


@pytest.mark.parametrize("size", [0, -1, True, "12", 2**31])
def test_a_bad_size_field_is_named(tmp_path: Path, size: object) -> None:
    from snapserve.server.errors import ManifestError

    version = write_repository(tmp_path / "models") / "digits" / "1"
    _set_size(version, size)  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=r"members\[0\]\.size"):
        read_manifest(version)


def test_the_trainer_writes_each_members_size(tmp_path: Path) -> None:
    from snapserve.trainer.repository import VersionWriter

    with VersionWriter(tmp_path / "models", "sized") as writer:
        writer.member_path(0).write_bytes(b"\0" * 1234)
        version = writer.commit({"members": [{"file": writer.member_file(0)}]}, {})
    member = json.loads((version / "manifest.json").read_text())["members"][0]
    assert member["size"] == 1234
