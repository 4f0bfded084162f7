"""Reading and checking a model version folder (docs/model-repository.md, schema_version 1).

Only what the server needs is parsed into dataclasses; the whole manifest text is kept for
GetModel. Every problem raises ManifestError (or ChecksumMismatch) naming the field or file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snapserve.proto.tensors import NUMPY_TO_DTYPE
from snapserve.proto.spec import (INPUT_KINDS, LOGITS, NORMALIZED, OUTPUT_KINDS, RAW, InputSpec,
                                  MemberSpec, Normalization)
from snapserve.server.config import MODEL_NAME
from snapserve.server.engine.runtime import GraphBytes
from snapserve.server.errors import ChecksumMismatch, ManifestError, MemberFileMissing

__all__ = ["AdaptiveSpec", "Manifest", "InputSpec", "Normalization", "MemberSpec", "FusedSpec", "MODEL_NAME",
           "SCHEMA_VERSION", "read_manifest", "read_verified", "verify_checksums", "sha256_file"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# The largest graph file read: protobuf's limit on one message, past which an ONNX graph keeps
# its weights in external data files. External data files are bounded by their manifest sizes
# when given, and by EXTERNAL_DATA_BYTES otherwise.
MAX_GRAPH_BYTES = 2**31 - 1
EXTERNAL_DATA_BYTES = 64 * 2**30
MANIFEST_FILE = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FusedSpec:
    """`ensemble` (optional): one graph running every member and computing the scores.

    Its outputs are named after the scores; `temperature_input` is an input the server feeds
    with the manifest's temperature. `fp16`: the same graph with FP16 members, for GPUs.
    """

    file: str
    sha256: str
    temperature_input: str = "temperature"
    fp16_file: str | None = None
    fp16_sha256: str | None = None


@dataclass(frozen=True)
class AdaptiveSpec:
    """`adaptive` (optional): the calibrated member order and stopping thresholds
    (snapserve.proto.adaptive), used when the model serves with adaptive_members."""

    order: tuple[int, ...]  # member indices
    thresholds: tuple[float, ...]  # tau_1 .. tau_{M-1}; inf where the manifest says null
    # T_1 .. T_{M-1} for the answers of k members; None (absent, or null for one k): the
    # version's, as for every answer of all M members
    temperatures: tuple[float | None, ...] | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    method: str
    input: InputSpec
    output_name: str
    classes: tuple[str, ...]
    temperature: float
    members: tuple[MemberSpec, ...]
    metrics: dict[str, float]
    text: str  # manifest.json as written, for what the fields above do not carry
    ensemble: FusedSpec | None = None
    output_kind: str = LOGITS  # what each member outputs: LOGITS or PROBABILITIES
    adaptive: AdaptiveSpec | None = None
    # `selection.members`: the served list of members (positions in `members`, repeats weigh
    # more); None (older manifests): every member once.
    selection: tuple[int, ...] | None = None

    def member_paths(self, version_dir: Path) -> list[Path]:
        return [resolve_inside(version_dir, m.file, f"members[{i}].file")
                for i, m in enumerate(self.members)]

    def fused_files(self, version_dir: Path) -> list[tuple[str, str, Path]]:
        """(field, sha256, path) of the fused graph files the manifest names (none: [])."""
        fused = self.ensemble
        if fused is None:
            return []
        files = [("ensemble.file", fused.sha256, resolve_inside(version_dir, fused.file, "ensemble.file"))]
        if fused.fp16_file is not None and fused.fp16_sha256 is not None:
            files.append(("ensemble.fp16.file", fused.fp16_sha256,
                          resolve_inside(version_dir, fused.fp16_file, "ensemble.fp16.file")))
        return files


def resolve_inside(version_dir: Path, relative: str, field: str) -> Path:
    """version_dir / relative, refusing absolute paths and any that leave the folder (.., symlinks)."""
    root = version_dir.resolve()
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise ManifestError(f"{field} {relative!r} leaves the version folder; expected a path "
                            "relative to it, such as 'members/member-000.onnx'")
    return path


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    field = f"{where}{key}"
    if key not in data:
        raise ManifestError(f"manifest field {field!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is not a number here
        raise ManifestError(f"manifest field {field!r} has type {type(value).__name__}; "
                            f"expected {getattr(kind, '__name__', kind)}")
    return value


def _metrics(value: Any, field: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"manifest field {field!r} must be an object of numbers")
    # Free-form: keep the numeric entries, skip anything else rather than refuse the model.
    return {str(k): float(v) for k, v in value.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _input_spec(data: dict[str, Any]) -> InputSpec:
    spec = _get(data, "input", dict)
    name = _get(spec, "name", str, "input.")
    dtype_name = _get(spec, "dtype", str, "input.")
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        dtype = None
    if dtype is None or dtype not in NUMPY_TO_DTYPE:
        raise ManifestError(f"manifest field 'input.dtype' {dtype_name!r} is not a supported numpy "
                            "dtype name (float32, float16, float64, int64, ...)")
    shape = _get(spec, "shape", list, "input.")
    if (not shape or shape[0] != -1 or not all(isinstance(d, int) and not isinstance(d, bool)
                                               for d in shape)
            or any(d < 1 for d in shape[1:])):
        raise ManifestError(f"manifest field 'input.shape' {shape!r} must be a list of integers "
                            "with -1 first (the batch) and sizes >= 1 after it")
    normalization = _normalization(spec.get("normalization"), len(shape))
    # Absent (versions written before graphs normalised): the client normalises, if anything.
    kind = spec.get("kind", RAW if normalization is None else NORMALIZED)
    if kind not in INPUT_KINDS:
        raise ManifestError(f"manifest field 'input.kind' is {kind!r}; expected one of "
                            f"{list(INPUT_KINDS)} (raw: the graphs apply input.normalization)")
    return InputSpec(name, dtype, tuple(shape), normalization, kind)


def _normalization(value: Any, ndim: int) -> Normalization | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError("manifest field 'input.normalization' must be an object or null")
    mean = _get(value, "mean", list, "input.normalization.")
    std = _get(value, "std", list, "input.normalization.")
    axis = value.get("axis", 1)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mean + std)
    if not numbers or not mean or len(mean) != len(std) or any(s == 0 for s in std):
        raise ManifestError("manifest field 'input.normalization' needs 'mean' and 'std' lists of "
                            "numbers of the same non-zero length, with no zero std")
    if not isinstance(axis, int) or not 0 <= axis < ndim:
        raise ManifestError(f"manifest field 'input.normalization.axis' {axis!r} must be an "
                            f"integer in [0, {ndim})")
    return Normalization(tuple(map(float, mean)), tuple(map(float, std)), axis)


def _member(value: Any, index: int) -> MemberSpec:
    where = f"members[{index}]."
    if not isinstance(value, dict):
        raise ManifestError(f"manifest field 'members[{index}]' must be an object")
    sha = _get(value, "sha256", str, where).lower()
    if not _SHA256.fullmatch(sha):
        raise ManifestError(f"manifest field '{where}sha256' must be 64 hex digits")
    return MemberSpec(
        file=_get(value, "file", str, where), sha256=sha,
        epoch=int(value.get("epoch") or 0), step=int(value.get("step") or 0),
        lr=float(value.get("lr") or 0.0), metrics=_metrics(value.get("metrics"), where + "metrics"),
        external_data=_external_data(value.get("external_data"), where + "external_data"),
        size=_size(value.get("size"), where + "size"))


def _size(value: Any, field: str) -> int | None:
    """`size` (optional): a file's length in bytes."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_GRAPH_BYTES:
        raise ManifestError(f"manifest field {field!r} must be the file's size in bytes, an "
                            f"integer in [1, {MAX_GRAPH_BYTES}]")
    return value


def _external_data(value: Any, field: str) -> tuple[tuple[str, str], ...]:
    """`external_data` (optional): [{"file", "sha256"}, ...], the graph's external-data files."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ManifestError(f"manifest field {field!r} must be a list of {{file, sha256}} objects")
    entries = []
    for index, entry in enumerate(value):
        where = f"{field}[{index}]."
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest field '{field}[{index}]' must be an object")
        entries.append((_get(entry, "file", str, where), _sha(entry, where)))
    return tuple(entries)


def _sha(value: dict[str, Any], where: str) -> str:
    sha = _get(value, "sha256", str, where).lower()
    if not _SHA256.fullmatch(sha):
        raise ManifestError(f"manifest field '{where}sha256' must be 64 hex digits")
    return sha


def _fused(value: Any) -> FusedSpec | None:
    """The optional `ensemble` entry; absent or null: the members alone, which every schema 1 version has."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError("manifest field 'ensemble' must be an object or null")
    fp16 = value.get("fp16")
    if fp16 is not None and not isinstance(fp16, dict):
        raise ManifestError("manifest field 'ensemble.fp16' must be an object or null")
    return FusedSpec(
        file=_get(value, "file", str, "ensemble."), sha256=_sha(value, "ensemble."),
        temperature_input=str(value.get("temperature_input") or "temperature"),
        fp16_file=None if fp16 is None else _get(fp16, "file", str, "ensemble.fp16."),
        fp16_sha256=None if fp16 is None else _sha(fp16, "ensemble.fp16."))


def _selection(value: Any, members: int) -> tuple[int, ...] | None:
    """The optional `selection` entry's served members; absent or null: every member once."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError("manifest field 'selection' must be an object or null")
    served = _get(value, "members", list, "selection.")
    if not served or not all(type(m) is int and 0 <= m < members for m in served):
        raise ManifestError(f"manifest field 'selection.members' {served!r} must list member positions "
                            f"in 0..{members - 1} (at least one, repeats allowed)")
    return tuple(served)


def _adaptive(value: Any, members: int) -> AdaptiveSpec | None:
    """The optional `adaptive` entry; absent or null (older manifests): every member runs."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError("manifest field 'adaptive' must be an object or null")
    order, thresholds = _get(value, "order", list, "adaptive."), _get(value, "thresholds", list, "adaptive.")
    if sorted(order) != list(range(members)) or any(isinstance(i, bool) for i in order):
        raise ManifestError(f"manifest field 'adaptive.order' {order!r} must list each member "
                            f"index 0..{members - 1} once")
    if len(thresholds) != members - 1 or not all(
            t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and t == t)
            for t in thresholds):
        raise ManifestError(f"manifest field 'adaptive.thresholds' must hold {members - 1} numbers "
                            "(or null: never stop there), one per member count 1..M-1")
    temperatures = value.get("temperatures")
    if temperatures is not None and (not isinstance(temperatures, list)
                                     or len(temperatures) != members - 1 or not all(
            t is None or (isinstance(t, (int, float)) and not isinstance(t, bool)
                          and 0 < t < math.inf) for t in temperatures)):
        raise ManifestError(f"manifest field 'adaptive.temperatures' must hold {members - 1} "
                            "numbers > 0 (or null: the version's temperature), one per member "
                            f"count 1..M-1; got {temperatures!r}"[:300])
    return AdaptiveSpec(tuple(order), tuple(math.inf if t is None else float(t) for t in thresholds),
                        None if temperatures is None else
                        tuple(None if t is None else float(t) for t in temperatures))


def parse_manifest(text: str, version_dir: Path) -> Manifest:
    """Parse and check manifest text read from `version_dir` (<model>/<integer version>)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError("manifest.json must hold a JSON object")
    schema = data.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"manifest field 'schema_version' is {schema!r}; this server reads "
                            f"{SCHEMA_VERSION}")
    output = _get(data, "output", dict)
    output_kind = output.get("kind", LOGITS)
    if output_kind not in OUTPUT_KINDS:
        raise ManifestError(f"manifest field 'output.kind' is {output_kind!r}; expected one of "
                            f"{list(OUTPUT_KINDS)}")
    classes = _get(data, "classes", list)
    if len(classes) < 1 or not all(isinstance(c, str) for c in classes):
        raise ManifestError("manifest field 'classes' must be a non-empty list of strings")
    temperature = data.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ManifestError(f"manifest field 'temperature' must be a number > 0, got {temperature!r}")
    members = _get(data, "members", list)
    if not members:
        raise ManifestError("manifest field 'members' is empty; expected at least one member")
    name, version = _get(data, "name", str), _get(data, "version", int)
    folder_name, folder_version = version_dir.parent.name, int(version_dir.name)
    if (name, version) != (folder_name, folder_version):
        # A copied or renamed folder: the folder is what clients address, so it wins.
        logger.warning("%s: manifest says %s version %d; serving it as %s version %d",
                       version_dir, name, version, folder_name, folder_version)
    manifest = Manifest(
        name=folder_name, version=folder_version,
        method=str(data.get("method", "")), input=_input_spec(data),
        output_name=_get(output, "name", str, "output."), output_kind=output_kind, classes=tuple(classes),
        temperature=float(temperature), members=tuple(_member(m, i) for i, m in enumerate(members)),
        metrics=_metrics(data.get("metrics"), "metrics"), text=text,
        ensemble=_fused(data.get("ensemble")), adaptive=_adaptive(data.get("adaptive"), len(members)),
        selection=_selection(data.get("selection"), len(members)))
    manifest.member_paths(version_dir)  # refuse paths that leave the folder before any file is read
    manifest.fused_files(version_dir)
    return manifest


def read_manifest(version_dir: Path) -> Manifest:
    """Read <version_dir>/manifest.json and check it against the contract."""
    path = version_dir / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} is missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} cannot be read: {exc}") from exc
    return parse_manifest(text, version_dir)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_checked(path: Path, expected: str, what: str, size: int | None = None,
                  limit: int = MAX_GRAPH_BYTES) -> bytes:
    """The file's bytes, read once: what is hashed is what is loaded, never re-opened between
    the check and the load (a file swapped in between would go unchecked).

    Its size is checked first, on the open file: against the manifest's `size` when it gives
    one, else against `limit`. A file that is not the published one (a 3 GiB sparse file where
    a few MB were written) is refused before a byte of it is read. The bytes are then read into
    one buffer of that size, which is hashed and handed on as it is: ONNX Runtime takes `bytes`,
    so chunks read apart would have to be joined, a second copy."""
    if not path.is_file():
        raise MemberFileMissing(f"{what} is missing")
    with path.open("rb") as file:
        length = os.fstat(file.fileno()).st_size
        if size is not None and length != size:
            raise ChecksumMismatch(f"{what} is {length} bytes, the manifest says {size}")
        if length > limit:
            raise ChecksumMismatch(f"{what} is {length} bytes, more than a graph file may be "
                                   f"({limit}: protobuf's limit; larger weights belong in "
                                   "external data files)")
        data = file.read(length + 1)  # one byte more: a file that grew since is seen
    if len(data) != length:
        raise ChecksumMismatch(f"{what} changed size while it was read ({length} bytes, then "
                               f"{len(data)})")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumMismatch(f"{what} has sha256 {actual}, the manifest says {expected}")
    return data


def _member_graph(member: MemberSpec, index: int, path: Path, version_dir: Path) -> GraphBytes:
    external = {}
    for j, (file, sha) in enumerate(member.external_data):
        data_path = resolve_inside(version_dir, file, f"members[{index}].external_data[{j}].file")
        # Keyed as the graph names it: its `location`, relative to the graph's own folder.
        external[os.path.relpath(data_path, path.parent)] = _read_checked(
            data_path, sha, f"external data file {file!r} of member {member.file!r}",
            limit=EXTERNAL_DATA_BYTES)
    return GraphBytes(path.name, _read_checked(path, member.sha256, f"member file {member.file!r}",
                                               member.size), external)


def read_verified(manifest: Manifest, version_dir: Path) -> dict[Path, GraphBytes]:
    """Every graph of the version (members, fused graphs) by its path relative to the folder,
    as bytes checked against the manifest, with its external-data files. ChecksumMismatch, or
    MemberFileMissing for a missing file."""
    graphs = {}
    for index, (member, path) in enumerate(zip(manifest.members,
                                               manifest.member_paths(version_dir))):
        graphs[Path(member.file)] = _member_graph(member, index, path, version_dir)
    # The fused graph is checked like a member: a version whose files do not match is refused.
    fused = manifest.ensemble
    relative = [] if fused is None else [fused.file] + ([fused.fp16_file] if fused.fp16_file else [])
    for file, (field, expected, path) in zip(relative, manifest.fused_files(version_dir)):
        graphs[Path(file)] = GraphBytes(path.name, _read_checked(path, expected,
                                                                 f"{field} {path.name!r}"))
    return graphs


def verify_checksums(manifest: Manifest, version_dir: Path) -> None:
    """Raise ChecksumMismatch (or ManifestError for a missing file) unless every member, its
    external data, and the fused graph when there is one, match."""
    read_verified(manifest, version_dir)
