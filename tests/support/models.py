"""Small ONNX member models and model versions written exactly as docs/model-repository.md says
(members, sha256s, manifest.json, written under .tmp-* and renamed)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # old enough for any onnxruntime pyproject allows

DIGITS_SHAPE = (1, 4, 4)
DIGITS_CLASSES = [str(i) for i in range(5)]

Weights = tuple[np.ndarray, np.ndarray]  # W [features, classes], b [classes]


def _finish(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


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
    return _finish(graph)


def random_members(members: int, features: int, classes: int, seed: int = 0,
                   scale: float = 1.0) -> list[Weights]:
    """Members with different weights, so they disagree on some inputs."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, scale, (features, classes)).astype(np.float32),
             rng.normal(0, 0.1, classes).astype(np.float32)) for _ in range(members)]


def int_input_member(features: int, classes: int, seed: int) -> onnx.ModelProto:
    """A member whose input is int64 (token ids, counts): logits = float(x) @ W + b."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes)).astype(np.float32)
    b = rng.normal(size=classes).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("Gemm", ["xf", "W", "b"], ["logits"])], "int-member",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    return _finish(graph)


# -- members more like exported ones (tests/trainer, tests/benchmarks) ---------------------------------------------

SHAPE = DIGITS_SHAPE  # one example
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
    return _finish(graph, opset)


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


# -- model versions ---------------------------------------------------------------------------

def _write_members(folder: Path, members_weights: Sequence[Weights | onnx.ModelProto],
                   input_shape: Sequence[int]) -> list[dict]:
    members = []
    for i, weights in enumerate(members_weights):
        model = weights if isinstance(weights, onnx.ModelProto) else member_model(weights, input_shape)
        data = model.SerializeToString()
        file = f"members/member-{i:03d}.onnx"
        (folder / file).write_bytes(data)
        members.append({"file": file, "sha256": hashlib.sha256(data).hexdigest(), "epoch": i + 1,
                        "step": 10 * (i + 1), "lr": 0.0, "metrics": {"accuracy": 0.5 + 0.01 * i}})
    return members


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
    manifest = {
        "schema_version": 1, "name": name, "version": version,
        "created_at": "2026-11-24T12:00:00Z", "method": method,
        "input": {"name": "input", "dtype": "float32", "shape": [-1, *input_shape],
                  "normalization": normalization},
        "output": {"name": "logits", "kind": "logits", "shape": [-1, len(classes)]},
        "classes": list(classes), "temperature": temperature,
        "members": _write_members(tmp, members_weights, input_shape),
        "metrics": {"accuracy": 0.9, "nll": 0.3},
        "onnx": {"opset": OPSET}, "training": {"dataset": "synthetic", "seed": 0},
    }
    manifest.update(manifest_overrides or {})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    final = model_dir / str(version)
    os.rename(tmp, final)
    return final


def write_int_model(repo: Path, name: str = "counts") -> Path:
    """A version whose input is int64 [-1, 3] (two int_input_member members, classes a and b)."""
    return write_model_version(
        repo, name, [int_input_member(3, 2, seed=s) for s in (1, 2)], (3,), ["a", "b"],
        manifest_overrides={"input": {"name": "input", "dtype": "int64", "shape": [-1, 3],
                                      "normalization": None}})


def write_repository(repo: Path) -> Path:
    """`digits` (3 members, [-1, 1, 4, 4] -> 5 classes) and `tiny` (2 members) in `repo`."""
    write_model_version(repo, "digits", random_members(3, 16, 5, seed=1), DIGITS_SHAPE,
                        DIGITS_CLASSES, normalization={"mean": [0.5], "std": [2.0], "axis": 1})
    write_model_version(repo, "tiny", random_members(2, 3, 2, seed=2), (3,), ["no", "yes"],
                        method="fge")
    return repo


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


def index_member(rows: int, classes: int, seed: int, indices: int = 3) -> onnx.ModelProto:
    """A member of an imported kind that ONNX Runtime can refuse per request: int64 indices
    [batch, indices] look up rows of an embedding table (Gather), summed into logits. An index
    outside [-rows, rows) fails the whole run inside ONNX Runtime."""
    table = np.random.default_rng(seed).normal(size=(rows, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input"], ["looked_up"], axis=0),
         helper.make_node("ReduceSum", ["looked_up", "axes"], ["logits"], keepdims=0)],
        "index-member",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", indices])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    return _finish(graph)


def write_index_model(repo: Path, name: str = "lookup", rows: int = 10) -> Path:
    """A version whose input is int64 indices [-1, 3] into a table of `rows` (two index_member
    members, classes a, b, c); an index >= rows makes ONNX Runtime fail the batch."""
    return write_model_version(
        repo, name, [index_member(rows, 3, seed=s) for s in (1, 2)], (3,), ["a", "b", "c"],
        manifest_overrides={"input": {"name": "input", "dtype": "int64", "shape": [-1, 3],
                                      "normalization": None}})


def slow_member(size: int = 128, steps: int = 100, classes: int = 2) -> onnx.ModelProto:
    """A member that takes long per example: `steps` chained [size, size] matrix products over
    an input [batch, size, size], then a mean into logits. ONNX Runtime checks its terminate
    flag between nodes, so a run of it can be stopped part-way."""
    w = (np.eye(size) * 0.5 + 0.5 / size).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input" if i == 0 else f"h{i}", "W"], [f"h{i + 1}"])
             for i in range(steps)]
    nodes += [helper.make_node("ReduceMean", [f"h{steps}"], ["pooled"], axes=[1], keepdims=0),
              helper.make_node("Slice", ["pooled", "starts", "ends", "axes"], ["logits"])]
    graph = helper.make_graph(
        nodes, "slow-member",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W"),
                     numpy_helper.from_array(np.array([0], np.int64), "starts"),
                     numpy_helper.from_array(np.array([classes], np.int64), "ends"),
                     numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return _finish(graph)


def write_slow_model(repo: Path, name: str = "slow", size: int = 128, steps: int = 100) -> Path:
    """A version of one slow_member: input float32 [-1, size, size], classes a and b."""
    return write_model_version(repo, name, [slow_member(size, steps)], (size, size), ["a", "b"])
