"""`trainer import`: serve existing ONNX classifiers as an ensemble.

    trainer import --members a.onnx b.onnx c.onnx --out models --name resnet20 [--classes labels.txt]

Writes a model version exactly as training does (docs/model-repository.md): the member files
(bytes unchanged unless their weights were in external files), their checksums, the input spec
read from the graphs, and the fused `ensemble.onnx`. Members must output logits [batch, C] and
agree on the input (name, dtype, shape) and the output (name, class count); the first member
that disagrees is refused with a message naming it and the mismatch.

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

from snapserve.trainer.errors import TrainerError
from snapserve.trainer.fuse import try_add_fused_graph
from snapserve.trainer.repository import VersionWriter, build_manifest

__all__ = ["MemberMismatch", "MemberSignature", "add_import_parser", "import_members", "member_signature",
           "read_classes", "run_import"]

logger = logging.getLogger(__name__)

_MAX_INLINE_BYTES = 2**31 - 1  # protobuf's limit for one serialized model


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


def _smoke_test(data: bytes, signature: MemberSignature, label: str) -> None:
    """Run a batch of 2: catches graphs that declare a dynamic batch but hard-code one inside
    (a Reshape to [1, -1]), and graphs ONNX Runtime cannot load, before a server does."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        x = np.zeros((2, *signature.shape[1:]), dtype=signature.dtype)
        logits = session.run([signature.output_name], {signature.input_name: x})[0]
    except Exception as exc:  # ORT's exception types are not public API
        raise MemberMismatch(f"member {label}: ONNX Runtime cannot run a batch of 2: {exc}") from exc
    if logits.shape != (2, signature.classes):
        raise MemberMismatch(f"member {label}: a batch of 2 gave output shape {list(logits.shape)}; "
                             f"expected [2, {signature.classes}]")
    if np.all(logits >= 0) and np.allclose(logits.sum(axis=1), 1.0, atol=1e-4):
        logger.warning("member %s: outputs look like probabilities, not logits; the server "
                       "applies softmax to them (export the graph without its final softmax)", label)


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
                   fp16: bool = False) -> Path:
    """Write a new version of `name` in the repository `out` from ONNX member files."""
    paths = [Path(m) for m in members]
    if not paths:
        raise MemberMismatch("no members given")
    if not temperature > 0:
        raise MemberMismatch(f"temperature must be > 0, got {temperature!r}")
    signatures, blobs = [], []
    for path in paths:
        model, data = _load(path)
        signature = member_signature(model, str(path))
        if signatures and signature != signatures[0] and _mismatch(signatures[0], signature):
            raise MemberMismatch(f"member {path} disagrees with {paths[0]}: "
                                 f"{_mismatch(signatures[0], signature)}")
        _smoke_test(data, signature, str(path))
        signatures.append(signature)
        blobs.append(data)
    first = signatures[0]
    classes = read_classes(Path(classes_file) if classes_file else None, first.classes)
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
        if fuse:
            try_add_fused_graph(writer.directory, manifest, fp16=fp16)
        version_dir = writer.commit(manifest, {"imported": [e["source"] for e in entries]})
    logger.info("imported %d members as %s", len(paths), version_dir)
    return version_dir


def add_import_parser(subparsers: Any) -> None:
    """The `trainer import` subcommand (trainer/cli.py adds it next to `train`)."""
    p = subparsers.add_parser(
        "import", help="write a model version from existing ONNX classifiers",
        description="Serve existing ONNX classifiers (logits [batch, C], one shared input) as an "
                    "ensemble: writes manifest, checksums and the fused ensemble.onnx.")
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
    p.add_argument("--no-fuse", action="store_true", help="do not write the fused ensemble.onnx")
    p.add_argument("--fp16", action="store_true",
                   help="also write ensemble-fp16.onnx (for GPUs), checked against FP32")
    p.set_defaults(handler=run_import)


def run_import(args: Any) -> int:
    if (args.mean is None) != (args.std is None):
        raise MemberMismatch("--mean and --std go together")
    normalization = None if args.mean is None else {"mean": args.mean, "std": args.std, "axis": 1}
    version_dir = import_members(args.members, args.out, args.name, args.classes, args.temperature,
                                 normalization, fuse=not args.no_fuse, fp16=args.fp16)
    fused = (version_dir / "ensemble.onnx").is_file()
    print(f"wrote {version_dir} ({len(args.members)} members{', fused graph' if fused else ''})")
    return 0
