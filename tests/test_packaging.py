"""The built wheel: one import package, `snapserve`, that lives beside proto-plus.

`proto` is also the import name of Google's proto-plus (pulled in by every google-cloud library),
so a wheel that installed a top-level `proto/` would break one of the two. The wheel is built from
a copy of the sources, installed into a fresh venv next to proto-plus, and both are imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("proto", "server", "client", "trainer")
DISTRIBUTION = "snapserve_ensembles"


def _pip(python: Path | str, *args: str, cwd: Path | None = None) -> None:
    done = subprocess.run([str(python), "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline from a copy of what the project ships (no build isolation)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    _pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src))
    (built,) = out.glob(f"{DISTRIBUTION}-*.whl")
    return built


def test_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"snapserve"}
    top_level = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(top_level).decode()
    for script in ("trainer = snapserve.trainer.cli:main", "ensemble-server = snapserve.server.process.cli:main",
                   "ensemble-client = snapserve.client.cli:main"):
        assert script in entry_points


def test_wheel_ships_every_source_package_and_the_protos(wheel: Path) -> None:
    """A subpackage missing from pyproject's explicit `packages` list would be left out silently."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in FOLDERS:
        for source in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in source.parts:
                assert f"snapserve/{source.relative_to(ROOT).as_posix()}" in names, source
        for extra in (*(ROOT / folder).rglob("*.proto"), *(ROOT / folder).rglob("*.pyi")):
            assert f"snapserve/{extra.relative_to(ROOT).as_posix()}" in names, extra


@pytest.mark.slow
def test_wheel_installs_beside_proto_plus(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # The suite's own site-packages comes after the new venv's (a plain path line: its editable
    # install of this project is not activated there), so pip and the wheel's dependencies are
    # found there: pip still resolves the wheel's [cpu] requirements against the constraints,
    # installs only the wheel and proto-plus into the new venv, and leaves the other venv alone.
    site = next((env_dir / "lib").glob("python*/site-packages"))
    suite_sites = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "suite-dependencies.pth").write_text("".join(f"{path}\n" for path in suite_sites))
    _pip(python, "install", "-q", "-c", str(ROOT / "constraints.txt"), f"{wheel}[cpu]", "proto-plus")
    probe = (
        "import proto, snapserve.proto.snapserve.v1.ensemble_pb2 as pb, snapserve.server.process.cli, "
        "snapserve.client; "
        "from snapserve.proto.inference import grpc_service_pb2; "
        "assert hasattr(proto, 'Message'), proto.__file__; "
        "assert pb.PredictRequest.DESCRIPTOR.full_name == 'snapserve.v1.PredictRequest'; "
        "print(proto.__file__)"
    )
    done = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "site-packages/proto/" in done.stdout, "proto-plus's `proto` was shadowed"
    ours = {p.name for p in site.iterdir() if p.name in {"server", "client", "trainer", "snapserve"}}
    assert ours == {"snapserve"}
