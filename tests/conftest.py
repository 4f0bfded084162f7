"""Fixtures every test package may use: a model repository, a real server over it, and
throw-away certificates.

Helper code (building members, writing versions, the reference oracle, servers) is in
tests/support/, imported by name; a package's own conftest.py holds only its local fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc
import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server import BatcherConfig, RunningServer, ServerConfig, start_server
from snapserve.server.cpp import binding
from tests.support.models import conv_member, linear_members, save, write_repository
from tests.support.pki import Pki, make_pki
from tests.support.servers import (ThreadedServer, cpp_toolchain, cpu_server, grpc_frontend,
                                   local_config, pinned_runtime)

# `ensemble-server` serves metrics on 8002 unless told otherwise; server processes the tests start
# (and load_config without an environ) would collide there: off unless a test asks for a port.
os.environ.setdefault("SNAPSERVE_METRICS_PORT", "off")
# Its plan cache (auto: the user's cache folder) would carry plans from one test, or one run of
# the suite, into the next: every load measures unless a test gives it a folder.
os.environ.setdefault("SNAPSERVE_PLAN_CACHE", "off")
# `auto` serves the gRPC port through the C++ front end where it is built, which depends on
# what an earlier run left in the user's cache: server processes the tests start serve
# grpc.aio unless a test asks for the C++ front end.
os.environ.setdefault("SNAPSERVE_GRPC_FRONTEND", "aio")


@pytest.fixture(scope="session")
def cpp_library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The C++ front end's library, built once per test process in a folder of its own (never
    the user's cache, whatever an earlier run left there), which the server processes a test
    starts are pointed at too. Skipped without g++ and libgrpc++, except in CI (.ci/run installs
    them), where a missing toolchain fails."""
    if not cpp_toolchain() and os.environ.get("CI") != "true":
        pytest.skip("needs g++ and libgrpc++ (apt-get install g++ libgrpc++-dev pkg-config); "
                    ".ci/run installs them")
    folder = tmp_path_factory.mktemp("cpp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(binding.CPP_DIR_ENV, str(folder))
        patch.setattr(binding, "_library", None)
        binding.library()
        yield folder


@pytest.fixture(params=["aio", "cpp"])
def each_frontend(request: pytest.FixtureRequest) -> str:
    """The gRPC port's two front ends in turn, for a test whose expectations differ between
    them (the C++ one built first)."""
    if request.param == "cpp":
        request.getfixturevalue("cpp_library")
    return request.param


@pytest.fixture(scope="session", autouse=True)
def frontend_built(request: pytest.FixtureRequest) -> None:
    """A run whose servers serve gRPC through the C++ front end (`make test-cpp`) builds it
    first, once, rather than in each server's start."""
    if grpc_frontend() == "cpp":
        request.getfixturevalue("cpp_library")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, server and client certificates (tests/support/pki.py), made once a session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A repository with `digits` (3 members, [-1, 1, 4, 4] -> 5 classes) and `tiny` (2 members)."""
    return write_repository(tmp_path / "models")


@pytest.fixture
def server_config(model_repo: Path) -> ServerConfig:
    return local_config(model_repo, batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=0.005))


@pytest.fixture
async def running_server(server_config: ServerConfig) -> AsyncIterator[RunningServer]:
    running = await start_server(server_config)
    yield running
    await running.stop(grace=None)


@pytest.fixture
async def stub(running_server: RunningServer) -> AsyncIterator[pb_grpc.EnsembleServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running_server.port}") as channel:
        yield pb_grpc.EnsembleServiceStub(channel)


@pytest.fixture
def threaded_server(model_repo: Path) -> Iterator[ThreadedServer]:
    """A server on its own thread, for blocking clients (in-loop, they would starve it)."""
    server = ThreadedServer(local_config(model_repo))
    yield server
    server.stop()


@pytest.fixture
def member_files(tmp_path: Path) -> list[Path]:
    """Three members of two kinds (conv at opset 17 and 18, linear): fusing must cope."""
    return save([conv_member(1, opset=17), conv_member(2, opset=18), *linear_members(1, seed=3)],
                tmp_path / "onnx")


@pytest.fixture
def imported_repo(tmp_path: Path, member_files: list[Path]) -> Path:
    """`member_files` imported as model `mixed` (the trainer's importer; needs the train extra)."""
    from snapserve.trainer.importer import import_members

    repo = tmp_path / "repo"
    import_members(member_files, repo, "mixed")
    return repo


@pytest.fixture
def served(imported_repo: Path) -> Iterator[ThreadedServer]:
    """`imported_repo` served on the CPU by two instances."""
    server = cpu_server(imported_repo, instances=2)
    yield server
    server.stop()
