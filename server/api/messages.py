"""snapserve.v1 messages <-> server objects. No logic beyond conversion.

The answer's tensors follow the score table (proto/scores.py `SCORES`): a new score is a row
there and a field in ensemble.proto, no edit here.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from snapserve.proto.scores import SCORES, EnsembleScores, ScoreSpec
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.tensors import NUMPY_TO_DTYPE, TensorError, from_tensor, to_tensor
from snapserve.proto.wire import LITTLE_ENDIAN, length_delimited, tag, varint
from snapserve.server.api.pipeline import InferRequest
from snapserve.server.errors import InvalidInput
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.inputs import format_shape
from snapserve.server.models.manifest import InputSpec
from snapserve.server.models.registry import ModelRegistry

__all__ = ["answer_scores", "decode_input", "decode_predict", "encode_metadata", "encode_predict",
           "encode_prediction", "encode_prediction_bytes", "encode_summary"]


def decode_input(request: pb.PredictRequest, spec: InputSpec) -> np.ndarray:
    """The request's input array; InvalidInput when absent or malformed."""
    if not request.HasField("input"):
        raise InvalidInput(f"request has no input; expected a tensor of shape "
                           f"{format_shape(spec.shape)} and dtype {spec.dtype}")
    try:
        return from_tensor(request.input, name="input")
    except TensorError as exc:
        raise InvalidInput(str(exc)) from exc


def answer_scores(include_member_probabilities: bool) -> tuple[ScoreSpec, ...]:
    """The scores a native answer carries, in SCORES' order (the answer's field order): every
    one but those sent on request, and those too when asked."""
    return SCORES if include_member_probabilities else _DEFAULT_SCORES


_DEFAULT_SCORES = tuple(spec for spec in SCORES if not spec.on_request)


def encode_prediction(scores: EnsembleScores, served: ServedEnsemble, request_id: str,
                      include_member_probabilities: bool) -> pb.PredictResponse:
    response = pb.PredictResponse(model=served.name, version=served.version, request_id=request_id)
    for spec in answer_scores(include_member_probabilities):
        to_tensor(getattr(scores, spec.name), getattr(response, spec.name))
    classes = served.manifest.classes
    response.top_label.extend(classes[i] for i in scores.top_class.tolist())
    return response


_FIELDS = pb.PredictResponse.DESCRIPTOR.fields_by_name
_REQUEST_ID_TAG = tag(_FIELDS["request_id"].number)
_TOP_LABEL = _FIELDS["top_label"].number
_DATA_TAG = tag(pb.Tensor.DESCRIPTOR.fields_by_name["data"].number)
# Heads of every version together: batch sizes x with or without member probabilities.
_HEADS = 1024


_Head = tuple[bytes, tuple[tuple[str, np.dtype, bytes], ...], tuple[bytes, ...]]


@functools.lru_cache(maxsize=_HEADS)
def _prediction_head(model: str, version: int, rows: int, classes: tuple[str, ...], members: int,
                     member_probabilities: bool) -> _Head:
    """What every answer of `rows` examples from this version says but its id, its labels and
    its bytes: the serialized model, version and each tensor's dtype and shape; per tensor, the
    key and lengths that start its data (a Tensor holding only `data`, merged into the head's
    by the parser); each class's top_label field. A pure function of its arguments, so cached
    by them: no entry refers to a served version, and a retired one leaves nothing behind."""
    response = pb.PredictResponse(model=model, version=version)
    chunks = []
    for spec in answer_scores(member_probabilities):
        shape = spec.shape(rows, members, len(classes))
        field = getattr(response, spec.name)
        field.dtype = NUMPY_TO_DTYPE[spec.dtype]
        field.shape[:] = shape
        nbytes = math.prod(shape) * spec.dtype.itemsize
        data_field_length = len(_DATA_TAG) + len(varint(nbytes)) + nbytes
        chunks.append((spec.name, spec.dtype, tag(_FIELDS[spec.name].number)
                       + varint(data_field_length) + _DATA_TAG + varint(nbytes)))
    labels = tuple(length_delimited(_TOP_LABEL, label.encode()) for label in classes)
    return response.SerializeToString(), tuple(chunks), labels


def encode_prediction_bytes(scores: EnsembleScores, served: ServedEnsemble, request_id: str,
                            include_member_probabilities: bool) -> bytes:
    """`encode_prediction(...).SerializeToString()`, assembled from a cached head and one
    `tobytes` per tensor (proto/wire.py): the answer is never built as a message."""
    rows, manifest = len(scores), served.manifest
    head, chunks, labels = _prediction_head(manifest.name, manifest.version, rows,
                                            manifest.classes, served.runtime.members,
                                            include_member_probabilities)
    identifier = request_id.encode()
    parts = [head, _REQUEST_ID_TAG, varint(len(identifier)), identifier]
    for name, dtype, prefix in chunks:
        array = getattr(scores, name)
        if array.dtype != dtype or not LITTLE_ENDIAN:  # not its declared type: the slow path
            return encode_prediction(scores, served, request_id,
                                     include_member_probabilities).SerializeToString()
        parts += (prefix, array.tobytes())
    parts += [labels[i] for i in scores.top_class.tolist()]
    return b"".join(parts)


def decode_predict(request: pb.PredictRequest, served: ServedEnsemble) -> np.ndarray:
    """The pipeline's decode step for a native request (api/pipeline.py)."""
    return decode_input(request, served.manifest.input)


def encode_predict(scores: EnsembleScores, served: ServedEnsemble,
                   request: InferRequest[pb.PredictRequest]) -> bytes:
    """The pipeline's encode step for a native request: the serialized answer."""
    return encode_prediction_bytes(scores, served, request.request_id,
                                   request.message.include_member_probabilities)


def encode_summary(registry: ModelRegistry, name: str) -> pb.ModelSummary:
    served = registry.get(name)
    return pb.ModelSummary(name=name, version=served.version, versions=registry.versions(name),
                           method=served.manifest.method, members=served.runtime.members)


def _input_spec(spec: InputSpec) -> pb.InputSpec:
    message = pb.InputSpec(name=spec.name, dtype=NUMPY_TO_DTYPE[spec.dtype], shape=spec.shape,
                           kind=spec.kind)
    if spec.normalization is not None:
        norm = spec.normalization
        message.normalization.CopyFrom(pb.Normalization(mean=norm.mean, std=norm.std, axis=norm.axis))
    return message


def encode_metadata(registry: ModelRegistry, served: ServedEnsemble) -> pb.ModelMetadata:
    manifest = served.manifest
    return pb.ModelMetadata(
        name=served.name, version=served.version, versions=registry.versions(served.name),
        method=manifest.method, input=_input_spec(manifest.input), classes=manifest.classes,
        members=[pb.Member(file=m.file, sha256=m.sha256, epoch=m.epoch, step=m.step, lr=m.lr,
                           metrics=m.metrics) for m in manifest.members],
        metrics=manifest.metrics, temperature=manifest.temperature,
        execution_provider=served.runtime.provider, max_batch_size=served.max_batch_size,
        manifest_json=manifest.text, runtime=served.runtime_parameters)
