"""The fused ensemble graph: every member and the aggregation in one ONNX graph.

One `run` of `ensemble.onnx` replaces M member runs plus the server's numpy scores:

    input [B, ...]  ─> member 0 ─> logits ─┐
                    ─> member 1 ─> logits ─┼─> [B, M, C] ─> softmax, mean, temperature,
                    ─> ...                 ┘    entropies, MI, per-member KL, votes, top classes

It is built from the member graphs with the onnx API alone (no torch): each member's node,
edge, initializer and function names get a prefix (`m000/` ...) so they cannot collide, the
members share the one input, and the score nodes follow (`SCORE_NODES`, one builder per score).
The outputs are the served scores it has builders for, named and ordered as
`snapserve.proto.scores.SCORE_NAMES` (`FUSED_OUTPUTS`); the server computes any other score from
the graph's `member_probabilities`, so a score added later needs no nodes here. The temperature is
an overridable initializer (a graph input with a default): the server always feeds the
manifest's value, so a temperature fitted after the graph was written can never disagree with
it; other tools that load the graph get the default.

Numerics: the scores are computed in float32 from log-softmax, in forms that stay accurate
without float64: log p̄ = logsumexp_m(log p_m) - log M, KL(p_m ‖ p̄) = Σ p_m (log p_m - log p̄),
MI = mean_m KL(p_m ‖ p̄) (the same quantity as H[p̄] - mean_m H[p_m], without subtracting two
nearly equal entropies). No 0·log 0 arises: log-softmax of finite logits is finite.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper, version_converter

from snapserve.proto.scores import (FUSED_REQUIRED_SCORES, SCORE_NAMES, SCORE_SPECS, SCORES,
                                    probabilities, softmax)
from snapserve.proto.spec import LOGITS, PROBABILITIES
from snapserve.trainer.errors import RepositoryError

__all__ = ["FUSED_FILE", "FUSED_FP16_FILE", "FUSED_OUTPUTS", "FP16_TOLERANCE", "MIN_OPSET",
           "SCORE_NODES", "TEMPERATURE_INPUT", "FusionError", "add_fused_graph", "check_fused",
           "fuse_members", "member_prefix", "member_to_fp16", "try_add_fused_graph"]

logger = logging.getLogger(__name__)

FUSED_FILE = "ensemble.onnx"
FUSED_FP16_FILE = "ensemble-fp16.onnx"
TEMPERATURE_INPUT = "temperature"
# Softmax/LogSoftmax take one `axis` and Unsqueeze/ReduceSum take axes as an input from opset 13
# on; older members are converted up to it.
MIN_OPSET = 13
# Largest |Δp| between the FP32 and FP16 fused graphs' probabilities we accept at export.
FP16_TOLERANCE = 1e-2
_CHECK_TOLERANCE = 1e-4  # fused vs separate path, float32 both


class FusionError(RepositoryError):
    """The members cannot be combined into one graph (opset conversion, a broken graph)."""


def member_prefix(index: int) -> str:
    return f"m{index:03d}/"


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return max(versions, default=1)


def _at_opset(model: onnx.ModelProto, opset: int, index: int) -> onnx.ModelProto:
    if _default_opset(model) == opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors
        raise FusionError(f"member {index}: cannot convert from opset {_default_opset(model)} to "
                          f"{opset} to fuse it with the others: {exc}") from exc


class _Graph:
    """Appends score nodes; knows the opset's spelling of reduce axes (attribute before 18)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"ensemble/{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._name(op_type),
                                           **attrs))
        return out

    def reduce(self, op_type: str, x: str, axis: int, keepdims: int = 0,
               out: str | None = None) -> str:
        # ReduceSum takes axes as an input from opset 13; the other reductions from 18.
        if op_type == "ReduceSum" or self.opset >= 18:
            axes = self.const(np.array([axis], dtype=np.int64), "axes")
            return self.op(op_type, [x, axes], out, keepdims=keepdims)
        return self.op(op_type, [x], out, axes=[axis], keepdims=keepdims)

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", [x, self.const(np.array([axis], dtype=np.int64), "axes")])


class _Scores:
    """The score nodes of one fused graph, each built once, on demand, into a tensor named after
    its score; the intermediates several scores share are built once too."""

    def __init__(self, g: _Graph, member_logits: list[str], members: int) -> None:
        self.g, self.members = g, members
        # [B, M, C]: the members' logits side by side
        self.logits = g.op("Concat", [g.unsqueeze(name, 1) for name in member_logits], axis=1)
        self._built: dict[str, str] = {}

    def score(self, name: str) -> str:
        if name not in self._built:
            if name not in SCORE_NODES:
                raise FusionError(f"the fused graph's score nodes need {name!r}, which has none")
            self._built[name] = SCORE_NODES[name](self, name)
        return self._built[name]

    @functools.cached_property
    def probs(self) -> str:  # [B, M, C]
        return self.score("member_probabilities")

    @functools.cached_property
    def log_probs(self) -> str:  # [B, M, C]
        return self.g.op("LogSoftmax", [self.logits], axis=-1)

    @functools.cached_property
    def mean(self) -> str:  # p̄ [B, C]
        return self.g.reduce("ReduceMean", self.probs, 1)

    @functools.cached_property
    def log_mean(self) -> str:  # log p̄ [B, C], as logsumexp_m(log p_m) - log M
        g = self.g
        return g.op("Sub", [g.reduce("ReduceLogSumExp", self.log_probs, 1),
                            g.const(np.array(math.log(self.members), dtype=np.float32), "log_m")])

    @functools.cached_property
    def kl(self) -> str:  # KL(p_m ‖ p̄) [B, M], before clipping
        gap = self.g.op("Sub", [self.log_probs, self.g.unsqueeze(self.log_mean, 1)])
        return self.g.reduce("ReduceSum", self.g.op("Mul", [self.probs, gap]), 2)


def _vote_disagreement(s: _Scores, out: str) -> str:
    g = s.g
    consensus = g.op("ArgMax", [s.mean], axis=1, keepdims=1)  # [B, 1]
    differs = g.op("Not", [g.op("Equal", [s.score("member_top_class"), consensus])])
    return g.reduce("ReduceMean", g.op("Cast", [differs], to=TensorProto.FLOAT), 1, out=out)


def _expected_entropy(s: _Scores, out: str) -> str:
    g = s.g
    member_entropy = g.op("Neg", [g.reduce("ReduceSum", g.op("Mul", [s.probs, s.log_probs]), 2)])
    return g.reduce("ReduceMean", member_entropy, 1, out=out)


# The node builders, by score name: each writes its score into the tensor `out` (the score's
# name) and returns it. A score of SCORES without a builder here is not an output of the fused
# graph; the server computes it from the member probabilities the graph outputs.
SCORE_NODES: dict[str, Callable[[_Scores, str], str]] = {
    "probabilities": lambda s, out: s.g.op(
        "Softmax", [s.g.op("Div", [s.log_mean, TEMPERATURE_INPUT])], out, axis=-1),
    "top_class": lambda s, out: s.g.op("ArgMax", [s.score("probabilities")], out, axis=1,
                                       keepdims=0),
    "predictive_entropy": lambda s, out: s.g.op(
        "Neg", [s.g.reduce("ReduceSum", s.g.op("Mul", [s.mean, s.log_mean]), 1)], out),
    "expected_entropy": _expected_entropy,
    # MI = mean_m KL(p_m ‖ p̄); both are >= 0 in exact arithmetic, so Relu clips the rounding.
    "mutual_information": lambda s, out: s.g.op("Relu", [s.g.reduce("ReduceMean", s.kl, 1)], out),
    "vote_disagreement": _vote_disagreement,
    "member_kl": lambda s, out: s.g.op("Relu", [s.kl], out),
    "member_top_class": lambda s, out: s.g.op("ArgMax", [s.probs], out, axis=2, keepdims=0),
    "member_probabilities": lambda s, out: s.g.op("Softmax", [s.logits], out, axis=-1),
}
# The graph's outputs: the served scores it has nodes for, by name and in the table's order.
FUSED_OUTPUTS: tuple[str, ...] = tuple(name for name in SCORE_NAMES if name in SCORE_NODES)


def _score_nodes(g: _Graph, member_logits: list[str], members: int) -> list[str]:
    """[B, C] logits of each member -> the scores SCORE_NODES builds (see the module docstring);
    returns their names in the table's order."""
    missing = [name for name in FUSED_REQUIRED_SCORES if name not in SCORE_NODES]
    if missing:  # the server computes every other score from these
        raise FusionError(f"the fused graph has no nodes for {missing}, which the server needs")
    scores = _Scores(g, member_logits, members)
    return [scores.score(spec.name) for spec in SCORES if spec.name in SCORE_NODES]


def _topological(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes ordered so each comes after the producers of its inputs (ONNX requires it; the
    FP16 converter appends its casts at the end). Stable: an ordered graph keeps its order."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    order: list[onnx.NodeProto] = []
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    for root in range(len(nodes)):
        stack = [(root, False)]
        while stack:
            i, expanded = stack.pop()
            if state[i] == 2:
                continue
            if expanded:
                state[i] = 2
                order.append(nodes[i])
                continue
            if state[i] == 1:
                raise FusionError(f"member graph has a cycle through node {nodes[i].name!r}")
            state[i] = 1
            stack.append((i, True))
            stack.extend((producer[name], False) for name in reversed(nodes[i].input)
                         if name in producer and state[producer[name]] != 2)
    return order


def _output_infos(names: Sequence[str], members: int, classes: int) -> list[onnx.ValueInfoProto]:
    sizes: dict[str, str | int] = {"batch": "batch", "members": members, "classes": classes}
    return [helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(SCORE_SPECS[name].dtype),
                [sizes[dim] for dim in SCORE_SPECS[name].dims])
            for name in names]


def _classes(model: onnx.ModelProto, output_name: str) -> int:
    for out in model.graph.output:
        if out.name == output_name:
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 2 and dims[1].HasField("dim_value"):
                return dims[1].dim_value
    raise FusionError(f"member output {output_name!r} is not declared as [batch, classes] "
                      "with a fixed class count")


def fuse_members(members: Sequence[onnx.ModelProto], input_name: str = "input",
                 output_name: str = "logits", temperature: float = 1.0,
                 served: Sequence[int] | None = None,
                 output_kind: str = LOGITS) -> onnx.ModelProto:
    """One graph running every member on `input_name` and computing FUSED_OUTPUTS.

    The members must share the input (name, type) and the output name; the importer and the
    trainer check that first, with messages naming the member. `served` (the manifest's
    selection, repeats allowed) lists the members the scores are over: each member runs once and
    its logits enter the [B, M, C] stack as often as listed; None: each member once.
    `output_kind` probabilities: the members end in their own softmax, so their log (floored
    at the smallest float32, so a zero stays finite) stands for the logits: softmax(log p) = p.
    """
    if not members:
        raise FusionError("cannot fuse an ensemble of no members")
    opset = max(MIN_OPSET, *(_default_opset(m) for m in members))
    classes = _classes(members[0], output_name)
    g = _Graph(opset)
    initializers: list[onnx.TensorProto] = []
    sparse: list[onnx.SparseTensorProto] = []
    functions: list[onnx.FunctionProto] = []
    value_infos: list[onnx.ValueInfoProto] = []
    opsets: dict[str, int] = {"": opset}
    member_logits: list[str] = []
    for index, member in enumerate(members):
        prefixed = compose.add_prefix(_at_opset(member, opset, index), member_prefix(index),
                                      rename_inputs=False)
        graph = prefixed.graph
        g.nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        sparse.extend(graph.sparse_initializer)
        value_infos.extend(graph.value_info)
        functions.extend(prefixed.functions)
        for entry in prefixed.opset_import:
            domain = "" if entry.domain == "ai.onnx" else entry.domain
            opsets[domain] = max(opsets.get(domain, 0), entry.version)
        logits = member_prefix(index) + output_name
        out_type = next(o.type.tensor_type.elem_type for o in graph.output if o.name == logits)
        if out_type != TensorProto.FLOAT:  # the scores are float32 whatever the members output
            logits = g.op("Cast", [logits], to=TensorProto.FLOAT)
        if output_kind == PROBABILITIES:
            tiny = g.const(np.array(np.finfo(np.float32).tiny, dtype=np.float32), "tiny")
            logits = g.op("Log", [g.op("Max", [logits, tiny])])
        member_logits.append(logits)
    order = list(range(len(members))) if served is None else list(served)
    outputs = _score_nodes(g, [member_logits[i] for i in order], len(order))
    graph_input = next(i for i in members[0].graph.input if i.name == input_name)
    temperature_init = numpy_helper.from_array(np.array(temperature, dtype=np.float32),
                                               TEMPERATURE_INPUT)
    graph = helper.make_graph(
        _topological(g.nodes), "snapserve_ensemble",
        [graph_input, helper.make_tensor_value_info(TEMPERATURE_INPUT, TensorProto.FLOAT, [])],
        _output_infos(outputs, len(order), classes),
        initializer=[*initializers, *g.initializers, temperature_init],
        value_info=value_infos, sparse_initializer=sparse)
    model = helper.make_model(graph, functions=functions, producer_name="snapserve",
                              opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    model.ir_version = max(m.ir_version for m in members)
    helper.set_model_props(model, {"snapserve.members": str(len(order)),
                                   "snapserve.temperature": repr(float(temperature))})
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise FusionError(f"the fused graph is not valid ONNX: {exc}") from exc
    return model


def member_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A member with FP16 weights and arithmetic, still taking and returning FP32 (casts at
    its edges), so it fuses like any other member and the score nodes stay FP32 (they are
    small and need the precision: MI is a small number).

    For GPUs, where tensor cores make the members about twice as fast; check the result with
    `check_fused(..., tolerance=FP16_TOLERANCE)`.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16  # ships with onnxruntime

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sample_input(spec: dict[str, Any], examples: int, seed: int = 0) -> np.ndarray:
    shape = [examples, *spec["shape"][1:]]
    return np.random.default_rng(seed).normal(0, 1, shape).astype(spec["dtype"])


def _session(model: onnx.ModelProto | Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_fused(fused: onnx.ModelProto, member_files: Sequence[Path], input_spec: dict[str, Any],
                output_name: str, temperature: float, tolerance: float = _CHECK_TOLERANCE,
                examples: int = 7, output_kind: str = LOGITS) -> float:
    """Max |Δ| of member and mean probabilities, fused graph vs the members run one by one.

    The full set of scores is compared with the server's numpy scores in tests/trainer/test_fuse.py; this is
    the cheap export-time guard (like the PyTorch parity check) against a mis-wired graph.
    """
    x = _sample_input(input_spec, examples)
    fused_out = _session(fused).run(["member_probabilities", "probabilities"],
                                    {input_spec["name"]: x,
                                     TEMPERATURE_INPUT: np.array(temperature, dtype=np.float32)})
    outputs = np.stack([_session(path).run([output_name], {input_spec["name"]: x})[0]
                        for path in member_files], axis=1).astype(np.float64)
    probs = (outputs / outputs.sum(axis=-1, keepdims=True) if output_kind == PROBABILITIES
             else softmax(outputs))  # [B, M, C]
    served = probabilities(probs, temperature)
    worst = max(float(np.max(np.abs(fused_out[0] - probs))),
                float(np.max(np.abs(fused_out[1] - served))))
    if not worst <= tolerance:  # also NaN
        raise FusionError(f"the fused graph's probabilities differ from the members' by {worst:.3g} "
                          f"(tolerance {tolerance:.3g})")
    return worst


def add_fused_graph(version_dir: Path, manifest: dict[str, Any], fp16: bool = False) -> dict[str, Any]:
    """Write ensemble.onnx (and ensemble-fp16.onnx) into an uncommitted version folder and
    record it under manifest["ensemble"]; returns that entry.

    Call it after the members are written and before VersionWriter.commit (which checksums
    the members; the fused files are checksummed here).
    """
    spec, output_name = manifest["input"], manifest["output"]["name"]
    output_kind = manifest["output"].get("kind", LOGITS)
    temperature = float(manifest.get("temperature", 1.0))
    files = [version_dir / m["file"] for m in manifest["members"]]
    served = (manifest.get("selection") or {}).get("members")
    fused = fuse_members([onnx.load(str(f)) for f in files], spec["name"], output_name, temperature, served,
                         output_kind)
    listed = files if served is None else [files[i] for i in served]  # the multiset the scores are over
    diff = check_fused(fused, listed, spec, output_name, temperature, output_kind=output_kind)
    data = fused.SerializeToString()
    (version_dir / FUSED_FILE).write_bytes(data)
    entry: dict[str, Any] = {"file": FUSED_FILE, "sha256": _sha256(data),
                             "outputs": [o.name for o in fused.graph.output],
                             "temperature_input": TEMPERATURE_INPUT, "max_abs_diff": diff}
    logger.info("wrote %s (%d members, %.1f MiB): max |Δp| vs the members %.2e",
                FUSED_FILE, len(files), len(data) / 2**20, diff)
    if fp16:
        entry["fp16"] = _add_fp16(version_dir, files, spec, output_name, temperature, served,
                                  output_kind)
    manifest["ensemble"] = entry
    return entry


def try_add_fused_graph(version_dir: Path, manifest: dict[str, Any],
                        fp16: bool = False) -> dict[str, Any] | None:
    """add_fused_graph, or a warning and None: the fused graph is an optimisation, the members
    alone still serve (only slower), so a graph that cannot be fused never fails an export."""
    try:
        return add_fused_graph(version_dir, manifest, fp16=fp16)
    except FusionError as exc:
        logger.warning("not writing the fused graph %s: %s", FUSED_FILE, exc)
        return None


def _add_fp16(version_dir: Path, files: list[Path], spec: dict[str, Any], output_name: str,
              temperature: float, served: Sequence[int] | None,
              output_kind: str = LOGITS) -> dict[str, Any]:
    half = fuse_members([member_to_fp16(onnx.load(str(f))) for f in files], spec["name"],
                        output_name, temperature, served, output_kind)
    # Accuracy parity: FP16 against the FP32 members, on more examples than the wiring check.
    listed = files if served is None else [files[i] for i in served]
    diff = check_fused(half, listed, spec, output_name, temperature, tolerance=FP16_TOLERANCE,
                       examples=64, output_kind=output_kind)
    data = half.SerializeToString()
    (version_dir / FUSED_FP16_FILE).write_bytes(data)
    logger.info("wrote %s: max |Δp| vs the FP32 members %.2e", FUSED_FP16_FILE, diff)
    return {"file": FUSED_FP16_FILE, "sha256": _sha256(data), "max_abs_diff": diff,
            "tolerance": FP16_TOLERANCE}
