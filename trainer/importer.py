"""`trainer import`: serve existing ONNX classifiers as an ensemble.

    trainer import --members a.onnx b.onnx c.onnx --out models --name resnet20 [--classes labels.txt]

Writes a model version exactly as training does (docs/model-repository.md): the member files
(bytes unchanged unless their weights were in external files), their checksums, the input spec
read from the graphs, and the fused `ensemble.onnx`. Members output logits or probabilities
[batch, C] (`output.kind`: a final Softmax node, or rows that are non-negative and sum to one on
sample inputs, say probabilities, which the server then does not softmax again; where neither
tells, `--output-kind` must) and agree on the input (name, dtype, shape) and the output (name,
class count); the first member that disagrees is refused with a message naming it and the
mismatch. Their bytes are unchanged, so a normalisation given with `--mean/--std` stays the
client's to apply (`input.kind` normalized).

Needs onnx and onnxruntime only: nothing here (or in what it imports) imports torch.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper

from snapserve.proto.adaptive import DEFAULT_TOLERANCE, calibrate
from snapserve.proto.scores import softmax
from snapserve.proto.spec import LOGITS, NORMALIZED, OUTPUT_KINDS, PROBABILITIES, RAW
from snapserve.trainer.errors import TrainerError
from snapserve.trainer.fuse import try_add_fused_graph
from snapserve.trainer.repository import VersionWriter, build_manifest

__all__ = ["MemberMismatch", "MemberSignature", "add_import_parser", "detect_output_kind", "import_members",
           "member_signature", "read_classes", "run_import"]

logger = logging.getLogger(__name__)

_MAX_INLINE_BYTES = 2**31 - 1  # protobuf's limit for one serialized model
_SAMPLE_ROWS = 8  # the smoke test's batch: > 1 (a hard-coded batch of one shows), rows to judge by
_SUM_TOLERANCE = 1e-4  # |row sum - 1| of a float32 softmax's rows


class MemberMismatch(TrainerError):
    """A member cannot be imported, or disagrees with the first member; the message names it."""


@dataclass(frozen=True)
class MemberSignature:
    """What the manifest needs from a member graph, and what the members must agree on."""

    input_name: str
    dtype: str             # numpy name, e.g. "float32"
    shape: tuple[int, ...]  # -1 first (the batch)
    output_name: str
    classes: int
    opset: int

    def describe(self) -> str:
        return (f"input {self.input_name!r} {list(self.shape)} {self.dtype}, "
                f"output {self.output_name!r} [-1, {self.classes}]")


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def _batch_shape(dims: list[int | str | None], what: str, label: str) -> tuple[int, ...]:
    if not dims:
        raise MemberMismatch(f"member {label}: {what} has no declared shape; expected [batch, ...]")
    if isinstance(dims[0], int):
        raise MemberMismatch(f"member {label}: {what} has a fixed batch dimension {dims[0]}; "
                             "re-export it with a dynamic first axis so requests can be batched")
    rest = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise MemberMismatch(f"member {label}: {what} shape {dims} has dynamic dimensions after "
                             "the batch; the manifest needs fixed sizes there")
    return (-1, *rest)  # type: ignore[arg-type]


def member_signature(model: onnx.ModelProto, label: str) -> MemberSignature:
    """The member's input and output, or MemberMismatch saying why it cannot be served."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise MemberMismatch(f"member {label}: has {len(inputs)} inputs {[i.name for i in inputs]}; "
                             "an ensemble member takes exactly one")
    if len(graph.output) != 1:
        raise MemberMismatch(f"member {label}: has {len(graph.output)} outputs "
                             f"{[o.name for o in graph.output]}; expected one, the logits")
    inp, out = inputs[0], graph.output[0]
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)).name
    except (KeyError, TypeError) as exc:
        raise MemberMismatch(f"member {label}: input {inp.name!r} is not a plain tensor") from exc
    out_shape = _batch_shape(_dims(out), f"output {out.name!r}", label)
    if len(out_shape) != 2:
        raise MemberMismatch(f"member {label}: output {out.name!r} has shape {_dims(out)}; "
                             "expected logits [batch, classes]")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    return MemberSignature(inp.name, dtype, _batch_shape(_dims(inp), f"input {inp.name!r}", label),
                           out.name, out_shape[1], opset)


def _mismatch(first: MemberSignature, other: MemberSignature) -> str:
    fields = [("input name", first.input_name, other.input_name),
              ("input dtype", first.dtype, other.dtype),
              ("input shape", list(first.shape), list(other.shape)),
              ("output name", first.output_name, other.output_name),
              ("class count", first.classes, other.classes)]
    return "; ".join(f"{what} {theirs!r} (the first member has {ours!r})"
                     for what, ours, theirs in fields if ours != theirs)


def _load(path: Path) -> tuple[onnx.ModelProto, bytes]:
    """The member and the bytes to store: the file unchanged (so its checksum matches the
    source's), or, when its weights live in external files, the model with them inlined."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        if not any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
            return model, path.read_bytes()
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError ...
        raise MemberMismatch(f"member {path}: cannot be read as ONNX: {exc}") from exc
    data = model.SerializeToString()
    if len(data) > _MAX_INLINE_BYTES:
        raise MemberMismatch(f"member {path}: weights of {len(data)} bytes cannot be inlined")
    return model, data


def _sample_input(signature: MemberSignature) -> np.ndarray:
    """Random values for float inputs (rows to judge the outputs by); zeros otherwise (an
    index input's one value sure to be valid)."""
    shape = (_SAMPLE_ROWS, *signature.shape[1:])
    if np.issubdtype(np.dtype(signature.dtype), np.floating):
        return np.random.default_rng(0).normal(0, 1, shape).astype(signature.dtype)
    return np.zeros(shape, dtype=signature.dtype)


def _smoke_test(data: bytes, signature: MemberSignature, label: str) -> np.ndarray:
    """The outputs of a sample batch of _SAMPLE_ROWS: catches graphs that declare a dynamic
    batch but hard-code one inside (a Reshape to [1, -1]), and graphs ONNX Runtime cannot load,
    before a server does."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    rows = _SAMPLE_ROWS
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        outputs = session.run([signature.output_name],
                              {signature.input_name: _sample_input(signature)})[0]
    except Exception as exc:  # ORT's exception types are not public API
        raise MemberMismatch(f"member {label}: ONNX Runtime cannot run a batch of {rows}: {exc}") from exc
    if outputs.shape != (rows, signature.classes):
        raise MemberMismatch(f"member {label}: a batch of {rows} gave output shape "
                             f"{list(outputs.shape)}; expected [{rows}, {signature.classes}]")
    return outputs


def detect_output_kind(model: onnx.ModelProto, outputs: np.ndarray) -> str | None:
    """LOGITS or PROBABILITIES, as the graph shows it; None where it cannot tell.

    A final Softmax node, or sample rows that are non-negative and sum to one: probabilities.
    Any negative value: logits (a LogSoftmax's log-probabilities are logits too: their softmax
    is the probabilities). Non-negative rows that do not sum to one (a final Relu or Sigmoid)
    could be either.
    """
    output_name = model.graph.output[0].name
    if any(node.op_type == "Softmax" and output_name in node.output for node in model.graph.node):
        return PROBABILITIES
    outputs = outputs.astype(np.float64)
    if np.any(outputs < 0):
        return LOGITS
    if np.allclose(outputs.sum(axis=1), 1.0, atol=_SUM_TOLERANCE):
        return PROBABILITIES
    return None


def _output_kind(detected: list[str | None], paths: list[Path], given: str | None) -> str:
    """The members' one output kind: `given` (--output-kind) if set, else what every member
    shows; MemberMismatch where the members disagree or do not tell."""
    if given is not None:
        if given not in OUTPUT_KINDS:
            raise MemberMismatch(f"output kind {given!r} is not one of {list(OUTPUT_KINDS)}")
        for path, kind in zip(paths, detected):
            if kind is not None and kind != given:
                logger.warning("member %s looks like it outputs %s; importing it as %s, as "
                               "--output-kind says", path, kind, given)
        return given
    unknown = [str(path) for path, kind in zip(paths, detected) if kind is None]
    if unknown:
        raise MemberMismatch(f"member {unknown[0]}: cannot tell whether its outputs are logits or "
                             "probabilities (non-negative rows that do not sum to one); say which "
                             "with --output-kind logits|probabilities")
    kinds = sorted(set(detected))  # type: ignore[arg-type]
    if len(kinds) > 1:
        first = {kind: str(path) for path, kind in reversed(list(zip(paths, detected)))}
        raise MemberMismatch(f"members disagree on their outputs: {first[LOGITS]} outputs logits, "
                             f"{first[PROBABILITIES]} probabilities (a final softmax); an ensemble's "
                             "members output one kind")
    if kinds == [PROBABILITIES]:
        logger.info("the members output probabilities (a final softmax): recorded as output.kind "
                    "probabilities, served without another softmax")
    return kinds[0]  # type: ignore[return-value]


def read_classes(path: Path | None, count: int) -> list[str]:
    """Labels, one per line (blank lines at the end ignored); "0".."C-1" without a file."""
    if path is None:
        return [str(i) for i in range(count)]
    try:
        labels = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise MemberMismatch(f"cannot read class labels from {path}: {exc}") from exc
    labels = [label.strip() for label in labels]
    if len(labels) != count:
        raise MemberMismatch(f"{path} has {len(labels)} labels; the members output {count} classes")
    return labels


def import_members(members: Sequence[str | Path], out: str | Path, name: str,
                   classes_file: str | Path | None = None, temperature: float = 1.0,
                   normalization: dict[str, Any] | None = None, fuse: bool = True,
                   fp16: bool = False, output_kind: str | None = None,
                   validation: str | Path | None = None,
                   adaptive_tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """Write a new version of `name` in the repository `out` from ONNX member files.

    `output_kind` (logits or probabilities) says what the members output; None: detected
    (`detect_output_kind`), refused where it cannot be told. `validation`: an .npz with `x`
    (inputs as the members take them) and `y` (labels), for the adaptive calibration.
    """
    paths = [Path(m) for m in members]
    if not paths:
        raise MemberMismatch("no members given")
    if not temperature > 0:
        raise MemberMismatch(f"temperature must be > 0, got {temperature!r}")
    signatures, blobs, detected = [], [], []
    for path in paths:
        model, data = _load(path)
        signature = member_signature(model, str(path))
        if signatures and signature != signatures[0] and _mismatch(signatures[0], signature):
            raise MemberMismatch(f"member {path} disagrees with {paths[0]}: "
                                 f"{_mismatch(signatures[0], signature)}")
        detected.append(detect_output_kind(model, _smoke_test(data, signature, str(path))))
        signatures.append(signature)
        blobs.append(data)
    first = signatures[0]
    kind = _output_kind(detected, paths, output_kind)
    classes = read_classes(Path(classes_file) if classes_file else None, first.classes)
    adaptive = None if validation is None else _adaptive_calibration(
        blobs, first, kind, Path(validation), adaptive_tolerance)
    with VersionWriter(out, name) as writer:
        entries = []
        for index, data in enumerate(blobs):
            writer.member_path(index).write_bytes(data)
            entries.append({"file": writer.member_file(index), "epoch": 0, "step": 0, "lr": 0.0,
                            "metrics": {}, "source": paths[index].name})
        manifest = build_manifest(
            name=name, method="imported", input_shape=list(first.shape[1:]),
            normalization=normalization, classes=classes, members=entries, metrics={},
            training={"imported_from": [str(p) for p in paths],
                      "versions": {"python": platform.python_version(), "onnx": onnx.__version__,
                                   "onnxruntime": ort.__version__}},
            opset=max(s.opset for s in signatures), temperature=temperature,
            input_name=first.input_name, output_name=first.output_name)
        manifest["input"]["dtype"] = first.dtype
        # The bytes are the source's: a normalisation stays the client's to apply.
        manifest["input"]["kind"] = RAW if normalization is None else NORMALIZED
        manifest["output"]["kind"] = kind
        if adaptive is not None:
            manifest["adaptive"] = adaptive
        if fuse:
            try_add_fused_graph(writer.directory, manifest, fp16=fp16)
        version_dir = writer.commit(manifest, {"imported": [e["source"] for e in entries],
                                               **({"adaptive": adaptive} if adaptive else {})})
    logger.info("imported %d members as %s", len(paths), version_dir)
    return version_dir


def _adaptive_calibration(blobs: list[bytes], signature: MemberSignature, kind: str, path: Path,
                          tolerance: float) -> dict[str, Any]:
    """The manifest's `adaptive` object from the validation data in `path` (x, y)."""
    if not 0 <= tolerance <= 100:
        raise MemberMismatch(f"--adaptive-tolerance must be in [0, 100] accuracy points, got {tolerance}")
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise MemberMismatch(f"--val-data {path}: expected an .npz with arrays 'x' (inputs) and "
                             f"'y' (labels): {exc}") from exc
    if x.ndim != len(signature.shape) or list(x.shape[1:]) != list(signature.shape[1:]) or len(x) != len(y):
        raise MemberMismatch(f"--val-data {path}: x has shape {list(x.shape)} and y {list(y.shape)}; the "
                             f"members take [N, {', '.join(map(str, signature.shape[1:]))}], one label per row")
    if y.dtype.kind not in "iu" or not len(y) or y.min() < 0 or y.max() >= signature.classes:
        raise MemberMismatch(f"--val-data {path}: y must hold class indices in [0, {signature.classes})")
    x = x.astype(signature.dtype)
    outputs = []
    for data in blobs:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        out = np.concatenate([session.run(None, {signature.input_name: x[i:i + 256]})[0]
                              for i in range(0, len(x), 256)]).astype(np.float64)
        outputs.append(out / out.sum(axis=-1, keepdims=True) if kind == PROBABILITIES else softmax(out))
    calibration = calibrate(np.stack(outputs, axis=1), y, tolerance).to_manifest()
    logger.info("adaptive calibration on %d validation rows: %.2f members per example", len(y),
                calibration["validation"]["mean_members_evaluated"])
    return calibration


def add_import_parser(subparsers: Any) -> None:
    """The `trainer import` subcommand (trainer/cli.py adds it next to `train`)."""
    p = subparsers.add_parser(
        "import", help="write a model version from existing ONNX classifiers",
        description="Serve existing ONNX classifiers (logits or probabilities [batch, C], one "
                    "shared input) as an ensemble: writes manifest, checksums and the fused "
                    "ensemble.onnx.")
    p.add_argument("--members", nargs="+", required=True, metavar="ONNX", help="member graphs")
    p.add_argument("--out", required=True, help="model repository folder (created if missing)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class labels, one per line (default: 0 .. C-1)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="served probabilities are softmax(log(mean p) / T) (default: %(default)s)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="input normalisation mean per channel, for clients sending raw data")
    p.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std")
    p.add_argument("--output-kind", choices=OUTPUT_KINDS, default=None,
                   help="what the members output; default: detected (a final Softmax node, or "
                        "sample rows that sum to one, mean probabilities), refused where unclear")
    p.add_argument("--val-data", default=None, metavar="NPZ",
                   help="validation data (arrays x, y) for the adaptive member evaluation's calibration "
                        "(manifest 'adaptive'); without it the version serves every member")
    p.add_argument("--adaptive-tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="POINTS",
                   help="validation accuracy points adaptive evaluation may lose (default: %(default)s)")
    p.add_argument("--no-fuse", action="store_true", help="do not write the fused ensemble.onnx")
    p.add_argument("--fp16", action="store_true",
                   help="also write ensemble-fp16.onnx (for GPUs), checked against FP32")
    p.set_defaults(handler=run_import)


def run_import(args: Any) -> int:
    if (args.mean is None) != (args.std is None):
        raise MemberMismatch("--mean and --std go together")
    normalization = None if args.mean is None else {"mean": args.mean, "std": args.std, "axis": 1}
    version_dir = import_members(args.members, args.out, args.name, args.classes, args.temperature,
                                 normalization, fuse=not args.no_fuse, fp16=args.fp16,
                                 output_kind=args.output_kind, validation=args.val_data,
                                 adaptive_tolerance=args.adaptive_tolerance)
    fused = (version_dir / "ensemble.onnx").is_file()
    print(f"wrote {version_dir} ({len(args.members)} members{', fused graph' if fused else ''})")
    return 0
