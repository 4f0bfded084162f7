"""Fixtures for the performance features' tests: member graphs on disk, a threaded server.

No timing is asserted anywhere here: speed goals live in benchmarks/, these tests check that the
fast paths give the same answers as the plain ones and refuse what they should.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support.models import conv_member, linear_members, save
from tests.support.servers import ThreadedServer, cpu_server


@pytest.fixture
def member_files(tmp_path: Path) -> list[Path]:
    """Three members of two kinds (conv at opset 17 and 18, linear): fusing must cope."""
    return save([conv_member(1, opset=17), conv_member(2, opset=18), *linear_members(1, seed=3)],
                tmp_path / "onnx")


@pytest.fixture
def imported_repo(tmp_path: Path, member_files: list[Path]) -> Path:
    from snapserve.trainer.importer import import_members

    repo = tmp_path / "repo"
    import_members(member_files, repo, "mixed")
    return repo


@pytest.fixture
def served(imported_repo: Path) -> Iterator[ThreadedServer]:
    server = cpu_server(imported_repo, instances=2)
    yield server
    server.stop()
