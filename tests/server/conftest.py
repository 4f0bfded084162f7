"""Fixtures for server tests: small ONNX member models in a model repository, and a real server.

`write_model_version` writes a version folder exactly as docs/model-repository.md says (members,
sha256s, manifest.json, written under .tmp-* and renamed), so other test packages can reuse it:
`from tests.server.conftest import write_model_version, random_members, reference_member_probs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import AsyncIterator, Sequence

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server import BatcherConfig, RunningServer, ServerConfig, start_server

OPSET = 17
IR_VERSION = 8  # old enough for any onnxruntime >= 1.17 (pyproject's floor)

Weights = tuple[np.ndarray, np.ndarray]  # W [features, classes], b [classes]


def member_model(weights: Weights, input_shape: Sequence[int], input_name: str = "input",
                 output_name: str = "logits") -> onnx.ModelProto:
    """logits = flatten(x) @ W + b, over an input of shape [batch, *input_shape]."""
    w, b = (np.asarray(a, dtype=np.float32) for a in weights)
    graph = helper.make_graph(
        [helper.make_node("Flatten", [input_name], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "b"], [output_name])],
        "member",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def random_members(members: int, features: int, classes: int, seed: int = 0,
                   scale: float = 1.0) -> list[Weights]:
    """Members with different weights, so they disagree on some inputs."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, scale, (features, classes)).astype(np.float32),
             rng.normal(0, 0.1, classes).astype(np.float32)) for _ in range(members)]


def write_model_version(repo: Path, name: str, members_weights: Sequence[Weights | onnx.ModelProto],
                        input_shape: Sequence[int], classes: Sequence[str], *,
                        version: int | None = None, temperature: float = 1.0,
                        normalization: dict | None = None, method: str = "snapshot",
                        manifest_overrides: dict | None = None) -> Path:
    """Write <repo>/<name>/<version>/ (default: newest + 1) and return its path.

    `input_shape` is one example's shape (no batch dimension). A member is (W, b) for
    `member_model`, or a ready onnx.ModelProto (input "input", output "logits").
    `manifest_overrides` replaces top-level manifest fields, to write deliberately broken versions.
    """
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
        version = max(existing, default=0) + 1
    tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    (tmp / "members").mkdir(parents=True)
    members = []
    for i, weights in enumerate(members_weights):
        model = weights if isinstance(weights, onnx.ModelProto) else member_model(weights, input_shape)
        data = model.SerializeToString()
        file = f"members/member-{i:03d}.onnx"
        (tmp / file).write_bytes(data)
        members.append({"file": file, "sha256": hashlib.sha256(data).hexdigest(), "epoch": i + 1,
                        "step": 10 * (i + 1), "lr": 0.0, "metrics": {"accuracy": 0.5 + 0.01 * i}})
    manifest = {
        "schema_version": 1, "name": name, "version": version,
        "created_at": "2026-11-24T12:00:00Z", "method": method,
        "input": {"name": "input", "dtype": "float32", "shape": [-1, *input_shape],
                  "normalization": normalization},
        "output": {"name": "logits", "kind": "logits", "shape": [-1, len(classes)]},
        "classes": list(classes), "temperature": temperature, "members": members,
        "metrics": {"accuracy": 0.9, "nll": 0.3},
        "onnx": {"opset": OPSET}, "training": {"dataset": "synthetic", "seed": 0},
    }
    manifest.update(manifest_overrides or {})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    final = model_dir / str(version)
    os.rename(tmp, final)
    return final


def reference_member_probs(version_dir: Path, x: np.ndarray) -> np.ndarray:
    """The test oracle: run each member file with onnxruntime directly, softmax in float64."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    probs = []
    for member in manifest["members"]:
        session = ort.InferenceSession(str(version_dir / member["file"]),
                                       providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": x.astype(np.float32)})[0].astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs.append(exp / exp.sum(axis=1, keepdims=True))
    return np.stack(probs, axis=1)


DIGITS_SHAPE = (1, 4, 4)
DIGITS_CLASSES = [str(i) for i in range(5)]


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A repository with `digits` (3 members, [-1, 1, 4, 4] -> 5 classes) and `tiny` (2 members)."""
    repo = tmp_path / "models"
    write_model_version(repo, "digits", random_members(3, 16, 5, seed=1), DIGITS_SHAPE,
                        DIGITS_CLASSES, normalization={"mean": [0.5], "std": [2.0], "axis": 1})
    write_model_version(repo, "tiny", random_members(2, 3, 2, seed=2), (3,), ["no", "yes"],
                        method="fge")
    return repo


@pytest.fixture
def server_config(model_repo: Path) -> ServerConfig:
    return ServerConfig(model_repository=model_repo, port=0,
                        batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=0.005))


@pytest.fixture
async def running_server(server_config: ServerConfig) -> AsyncIterator[RunningServer]:
    running = await start_server(server_config)
    yield running
    await running.stop(grace=None)


@pytest.fixture
async def stub(running_server: RunningServer) -> AsyncIterator[pb_grpc.EnsembleServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running_server.port}") as channel:
        yield pb_grpc.EnsembleServiceStub(channel)
