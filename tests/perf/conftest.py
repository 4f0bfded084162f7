"""Fixtures for the performance features' tests: member graphs on disk, a threaded server.

No timing is asserted anywhere here: speed goals live in benchmarks/, these tests check that the
fast paths give the same answers as the plain ones and refuse what they should.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from snapserve.server import BatcherConfig, RuntimeConfig, ServerConfig
from tests.client.conftest import ThreadedServer
from tests.server.conftest import member_model, random_members

SHAPE = (1, 4, 4)  # one example
CLASSES = 5


def conv_member(seed: int, opset: int = 17, classes: int = CLASSES) -> onnx.ModelProto:
    """A small conv net (Conv, Relu, ReduceMean, Gemm) over [batch, 1, 4, 4]: more like a real
    member than a linear layer, with its own node and initializer names (which collide across
    members, as exported ones do)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (4, 1, 3, 3)).astype(np.float32)
    fc = rng.normal(0, 1, (4, classes)).astype(np.float32)
    if opset >= 18:
        reduce = [helper.make_node("ReduceMean", ["h", "axes"], ["pooled"], keepdims=0)]
        inits = [numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")]
    else:
        reduce = [helper.make_node("ReduceMean", ["h"], ["pooled"], axes=[2, 3], keepdims=0)]
        inits = []
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["h"], name="relu"), *reduce,
         helper.make_node("Gemm", ["pooled", "FC"], ["logits"], name="fc")],
        "member",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(fc, "FC"), *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def linear_members(count: int, seed: int = 0, scale: float = 2.0) -> list[onnx.ModelProto]:
    """Linear members that disagree on many inputs (scale), so the scores are not trivial."""
    return [member_model(w, SHAPE) for w in random_members(count, 16, CLASSES, seed, scale)]


def save(models: Sequence[onnx.ModelProto], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, model in enumerate(models):
        path = folder / f"member-{index}.onnx"
        path.write_bytes(model.SerializeToString())
        paths.append(path)
    return paths


@pytest.fixture
def member_files(tmp_path: Path) -> list[Path]:
    """Three members of two kinds (conv at opset 17 and 18, linear): fusing must cope."""
    return save([conv_member(1, opset=17), conv_member(2, opset=18), *linear_members(1, seed=3)],
                tmp_path / "onnx")


def threaded_server(repo: Path, **runtime: object) -> ThreadedServer:
    return ThreadedServer(ServerConfig(model_repository=repo, port=0,
                                       batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=0.002),
                                       runtime=RuntimeConfig(device="cpu", **runtime)))


@pytest.fixture
def imported_repo(tmp_path: Path, member_files: list[Path]) -> Path:
    from snapserve.trainer.importer import import_members

    repo = tmp_path / "repo"
    import_members(member_files, repo, "mixed")
    return repo


@pytest.fixture
def served(imported_repo: Path) -> Iterator[ThreadedServer]:
    server = threaded_server(imported_repo, instances=2)
    yield server
    server.stop()
