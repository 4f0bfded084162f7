"""Client-side views of snapserve.v1 messages, and the conversions both clients share."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar

import numpy as np

from snapserve.proto.scores import SCORES, ScoreSpec
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.spec import NORMALIZED, RAW, InputSpec, Normalization
from snapserve.proto.spec import MemberSpec as MemberInfo  # the client's name for it
from snapserve.proto.tensors import DTYPE_TO_NUMPY, from_tensor, to_tensor

logger = logging.getLogger(__name__)

__all__ = ["InputSpec", "MemberInfo", "ModelInfo", "ModelSummary", "Normalization", "Prediction",
           "PredictionFields", "build_request", "decode_metadata", "decode_prediction",
           "decode_summary", "normalize", "prediction_type"]


class PredictionFields:
    """What every Prediction has beside its fields (which `prediction_type` makes from the score
    table), so a new score reaches the client as a field, in `to_records` and in decoding."""

    specs: ClassVar[tuple[ScoreSpec, ...]]
    # The fields read by name here, declared for type checkers; the dataclass holds them.
    probabilities: np.ndarray
    top_class: np.ndarray
    top_label: np.ndarray

    def __len__(self) -> int:
        return len(self.top_class)

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per example: its top class and label, the probability of that
        class, then every score the answer carries."""
        records = []
        for i in range(len(self)):
            top = self.top_class[i]
            record: dict[str, Any] = {"top_class": int(top), "top_label": str(self.top_label[i]),
                                      "probability": float(self.probabilities[i, top])}
            for spec in self.specs:
                value = getattr(self, spec.name)
                if value is not None:  # an on-request score nobody asked for
                    record.setdefault(spec.name, value[i].tolist())
            records.append(record)
        return records

    @classmethod
    def from_response(cls, response: Any, member_probabilities: bool) -> PredictionFields:
        """The Prediction in a PredictResponse; the scores sent only on request (member
        probabilities) are None unless `member_probabilities` asked for them."""
        scores = {spec.name: (from_tensor(getattr(response, spec.name), name=spec.name)
                              if member_probabilities or not spec.on_request else None)
                  for spec in cls.specs}
        return cls(model=response.model, version=response.version, request_id=response.request_id,
                   top_label=np.asarray(list(response.top_label), dtype=str), **scores)


def prediction_type(specs: Sequence[ScoreSpec]) -> type:
    """A frozen dataclass of a batch's answer: model, version, one field per score of `specs`
    (with `top_label`, the labels of `top_class`, after it) and the request id."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [("model", str), ("version", int)]
    for spec in specs:
        fields.append((spec.name, np.ndarray | None if spec.on_request else np.ndarray))
        if spec.name == "top_class":
            fields.append(("top_label", np.ndarray))
    fields.append(("request_id", str, field(default="")))
    doc = "\n".join(f"    {spec.name}: [{', '.join(spec.dims)}] {spec.dtype}, {spec.description}"
                    + (" (when asked for)" if spec.on_request else "") for spec in specs)
    return make_dataclass(
        "Prediction", fields, bases=(PredictionFields,), frozen=True,
        namespace={"specs": tuple(specs), "__module__": __name__,
                   "__doc__": "Scores for a batch; row i of every array is example i. Arrays are "
                              "read-only views of the response's bytes (copy one to modify it).\n\n"
                              + doc})


Prediction = prediction_type(SCORES)


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
    """The Prediction in `response` (see PredictionFields.from_response)."""
    return Prediction.from_response(response, member_probabilities)


def decode_summary(summary: pb.ModelSummary) -> ModelSummary:
    return ModelSummary(summary.name, summary.version, tuple(summary.versions), summary.method,
                        summary.members)


def decode_metadata(meta: pb.ModelMetadata) -> ModelInfo:
    norm = meta.input.normalization if meta.input.HasField("normalization") else None
    spec = InputSpec(
        name=meta.input.name, dtype=DTYPE_TO_NUMPY[meta.input.dtype].newbyteorder("="),
        shape=tuple(meta.input.shape),
        normalization=None if norm is None else Normalization(tuple(norm.mean), tuple(norm.std), norm.axis),
        kind=meta.input.kind or NORMALIZED)  # a server older than the field: the client normalises
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
    """(x - mean) / std broadcast along the spec's axis, cast to the model's dtype, for a
    version whose clients normalise (input kind normalized); x unchanged when the model declares
    no normalisation or its graphs apply it (kind raw: normalising here would do it twice)."""
    x = np.asarray(x)
    if spec.kind == RAW and spec.normalization is not None:
        # A no-op, not an error: code written for older versions keeps working, with the right
        # answer, when a newer version of the same model becomes the default.
        logger.warning("normalize=True is not needed: model input %r is normalised inside the "
                       "model's graphs; sending the raw values", spec.name)
    norm = spec.client_normalization
    if norm is None:
        return x
    shape = [1] * x.ndim
    if len(norm.mean) > 1:
        if x.ndim <= norm.axis or x.shape[norm.axis] != len(norm.mean):
            raise ValueError(f"cannot normalise an input of shape {list(x.shape)}: the model has "
                             f"{len(norm.mean)} mean/std values along axis {norm.axis}")
        shape[norm.axis] = len(norm.mean)
    mean = np.asarray(norm.mean, dtype=np.float64).reshape(shape)
    std = np.asarray(norm.std, dtype=np.float64).reshape(shape)
    return ((x - mean) / std).astype(spec.dtype)
