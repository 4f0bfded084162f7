"""Client-side views of snapserve.v1 messages, and the conversions both clients share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.spec import InputSpec, Normalization
from snapserve.proto.spec import MemberSpec as MemberInfo  # the client's name for it
from snapserve.proto.tensors import DTYPE_TO_NUMPY, from_tensor, to_tensor

__all__ = ["InputSpec", "MemberInfo", "ModelInfo", "ModelSummary", "Normalization", "Prediction",
           "build_request", "decode_metadata", "decode_prediction", "decode_summary", "normalize"]


@dataclass(frozen=True)
class Prediction:
    """Scores for a batch; row i of every array is example i. Arrays are read-only views of the
    response's bytes (copy one to modify it)."""

    model: str
    version: int
    probabilities: np.ndarray         # [B, C] float32, temperature applied
    top_class: np.ndarray             # [B] int64
    top_label: np.ndarray             # [B] str
    predictive_entropy: np.ndarray    # [B] float32, H[p_mean]
    expected_entropy: np.ndarray      # [B] float32, mean_m H[p_m]
    mutual_information: np.ndarray    # [B] float32, H[p_mean] - mean_m H[p_m]
    vote_disagreement: np.ndarray     # [B] float32 in [0, 1]
    member_kl: np.ndarray             # [B, M] float32, KL(p_m || p_mean)
    member_top_class: np.ndarray      # [B, M] int64
    member_probabilities: np.ndarray | None  # [B, M, C] float32, when asked for
    request_id: str = ""

    def __len__(self) -> int:
        return len(self.top_class)

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per example."""
        records = []
        for i in range(len(self)):
            record = {
                "top_class": int(self.top_class[i]), "top_label": str(self.top_label[i]),
                "probability": float(self.probabilities[i, self.top_class[i]]),
                "probabilities": self.probabilities[i].tolist(),
                "predictive_entropy": float(self.predictive_entropy[i]),
                "expected_entropy": float(self.expected_entropy[i]),
                "mutual_information": float(self.mutual_information[i]),
                "vote_disagreement": float(self.vote_disagreement[i]),
                "member_kl": self.member_kl[i].tolist(),
                "member_top_class": self.member_top_class[i].tolist(),
            }
            if self.member_probabilities is not None:
                record["member_probabilities"] = self.member_probabilities[i].tolist()
            records.append(record)
        return records


@dataclass(frozen=True)
class ModelSummary:
    name: str
    version: int  # served by default
    versions: tuple[int, ...]
    method: str
    members: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    versions: tuple[int, ...]
    method: str
    input: InputSpec
    classes: tuple[str, ...]
    members: tuple[MemberInfo, ...]
    metrics: dict[str, float]
    temperature: float
    execution_provider: str
    max_batch_size: int
    manifest: dict[str, Any]
    # How the server runs this version: graph ("fused" or "members"), instances, graph_timing.
    runtime: dict[str, str]


def build_request(model: str, array: np.ndarray, version: int = 0,
                  member_probabilities: bool = False, request_id: str = "") -> pb.PredictRequest:
    request = pb.PredictRequest(model=model, version=version, request_id=request_id,
                                include_member_probabilities=member_probabilities)
    to_tensor(np.asarray(array), request.input)
    return request


def decode_prediction(response: pb.PredictResponse, member_probabilities: bool) -> Prediction:
    def array(field: str) -> np.ndarray:
        return from_tensor(getattr(response, field), name=field)

    return Prediction(
        model=response.model, version=response.version, request_id=response.request_id,
        probabilities=array("probabilities"), top_class=array("top_class"),
        top_label=np.asarray(list(response.top_label), dtype=str),
        predictive_entropy=array("predictive_entropy"), expected_entropy=array("expected_entropy"),
        mutual_information=array("mutual_information"), vote_disagreement=array("vote_disagreement"),
        member_kl=array("member_kl"), member_top_class=array("member_top_class"),
        member_probabilities=array("member_probabilities") if member_probabilities else None)


def decode_summary(summary: pb.ModelSummary) -> ModelSummary:
    return ModelSummary(summary.name, summary.version, tuple(summary.versions), summary.method,
                        summary.members)


def decode_metadata(meta: pb.ModelMetadata) -> ModelInfo:
    norm = meta.input.normalization if meta.input.HasField("normalization") else None
    spec = InputSpec(
        name=meta.input.name, dtype=DTYPE_TO_NUMPY[meta.input.dtype].newbyteorder("="),
        shape=tuple(meta.input.shape),
        normalization=None if norm is None else Normalization(tuple(norm.mean), tuple(norm.std), norm.axis))
    return ModelInfo(
        name=meta.name, version=meta.version, versions=tuple(meta.versions), method=meta.method,
        input=spec, classes=tuple(meta.classes),
        members=tuple(MemberInfo(m.file, m.sha256, m.epoch, m.step, m.lr, dict(m.metrics))
                      for m in meta.members),
        metrics=dict(meta.metrics), temperature=meta.temperature,
        execution_provider=meta.execution_provider, max_batch_size=meta.max_batch_size,
        manifest=json.loads(meta.manifest_json) if meta.manifest_json else {},
        runtime=dict(meta.runtime))


def normalize(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(x - mean) / std broadcast along the spec's axis, cast to the model's dtype; x unchanged
    when the model declares no normalisation."""
    x = np.asarray(x)
    if spec.normalization is None:
        return x
    norm = spec.normalization
    shape = [1] * x.ndim
    if len(norm.mean) > 1:
        if x.ndim <= norm.axis or x.shape[norm.axis] != len(norm.mean):
            raise ValueError(f"cannot normalise an input of shape {list(x.shape)}: the model has "
                             f"{len(norm.mean)} mean/std values along axis {norm.axis}")
        shape[norm.axis] = len(norm.mean)
    mean = np.asarray(norm.mean, dtype=np.float64).reshape(shape)
    std = np.asarray(norm.std, dtype=np.float64).reshape(shape)
    return ((x - mean) / std).astype(spec.dtype)
