"""snapserve.v1 messages <-> server objects. No logic beyond conversion."""

from __future__ import annotations

import numpy as np

from snapserve.proto.scores import EnsembleScores
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.tensors import NUMPY_TO_DTYPE, TensorError, from_tensor, to_tensor
from snapserve.proto.wire import LITTLE_ENDIAN, length_delimited, tag, varint
from snapserve.server.errors import InvalidInput
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.inputs import format_shape
from snapserve.server.models.manifest import InputSpec
from snapserve.server.models.registry import ModelRegistry

__all__ = ["decode_input", "encode_metadata", "encode_prediction", "encode_prediction_bytes",
           "encode_summary"]


def decode_input(request: pb.PredictRequest, spec: InputSpec) -> np.ndarray:
    """The request's input array; InvalidInput when absent or malformed."""
    if not request.HasField("input"):
        raise InvalidInput(f"request has no input; expected a tensor of shape "
                           f"{format_shape(spec.shape)} and dtype {spec.dtype}")
    try:
        return from_tensor(request.input, name="input")
    except TensorError as exc:
        raise InvalidInput(str(exc)) from exc


def encode_prediction(scores: EnsembleScores, served: ServedEnsemble, request_id: str,
                      include_member_probabilities: bool) -> pb.PredictResponse:
    response = pb.PredictResponse(model=served.name, version=served.version, request_id=request_id)
    to_tensor(scores.probabilities, response.probabilities)
    to_tensor(scores.top_class, response.top_class)
    classes = served.manifest.classes
    response.top_label.extend(classes[i] for i in scores.top_class.tolist())
    to_tensor(scores.predictive_entropy, response.predictive_entropy)
    to_tensor(scores.expected_entropy, response.expected_entropy)
    to_tensor(scores.mutual_information, response.mutual_information)
    to_tensor(scores.vote_disagreement, response.vote_disagreement)
    to_tensor(scores.member_kl, response.member_kl)
    to_tensor(scores.member_top_class, response.member_top_class)
    if include_member_probabilities:
        to_tensor(scores.member_probabilities, response.member_probabilities)
    return response


# The tensors of an answer, in field order, with the dtype each is sent as (EnsembleScores').
_TENSORS: tuple[tuple[str, np.dtype], ...] = (
    ("probabilities", np.dtype(np.float32)), ("top_class", np.dtype(np.int64)),
    ("predictive_entropy", np.dtype(np.float32)), ("expected_entropy", np.dtype(np.float32)),
    ("mutual_information", np.dtype(np.float32)), ("vote_disagreement", np.dtype(np.float32)),
    ("member_kl", np.dtype(np.float32)), ("member_top_class", np.dtype(np.int64)))
_MEMBER_PROBABILITIES = ("member_probabilities", np.dtype(np.float32))
_FIELDS = pb.PredictResponse.DESCRIPTOR.fields_by_name
_REQUEST_ID_TAG = tag(_FIELDS["request_id"].number)
_TOP_LABEL = _FIELDS["top_label"].number
_DATA_TAG = tag(pb.Tensor.DESCRIPTOR.fields_by_name["data"].number)


_Head = tuple[bytes, tuple[tuple[str, np.dtype, bytes], ...], tuple[bytes, ...]]


def _prediction_head(model: str, version: int, rows: int, classes: tuple[str, ...], members: int,
                     member_probabilities: bool) -> _Head:
    """What every answer of `rows` examples from this version says but its id, its labels and
    its bytes: the serialized model, version and each tensor's dtype and shape; per tensor, the
    key and lengths that start its data (a Tensor holding only `data`, merged into the head's
    by the parser); each class's top_label field."""
    shapes = {"probabilities": [rows, len(classes)], "member_kl": [rows, members],
              "member_top_class": [rows, members],
              "member_probabilities": [rows, members, len(classes)]}
    response = pb.PredictResponse(model=model, version=version)
    tensors = _TENSORS + ((_MEMBER_PROBABILITIES,) if member_probabilities else ())
    chunks = []
    for name, dtype in tensors:
        shape = shapes.get(name, [rows])
        field = getattr(response, name)
        field.dtype = NUMPY_TO_DTYPE[dtype]
        field.shape[:] = shape
        nbytes = int(np.prod(shape)) * dtype.itemsize
        data_field_length = len(_DATA_TAG) + len(varint(nbytes)) + nbytes
        chunks.append((name, dtype, tag(_FIELDS[name].number) + varint(data_field_length)
                       + _DATA_TAG + varint(nbytes)))
    labels = tuple(length_delimited(_TOP_LABEL, label.encode()) for label in classes)
    return response.SerializeToString(), tuple(chunks), labels


def encode_prediction_bytes(scores: EnsembleScores, served: ServedEnsemble, request_id: str,
                            include_member_probabilities: bool) -> bytes:
    """`encode_prediction(...).SerializeToString()`, assembled from a cached head and one
    `tobytes` per tensor (proto/wire.py): the answer is never built as a message."""
    rows, manifest = len(scores), served.manifest
    head, chunks, labels = served.answer_head(
        ("native", rows, include_member_probabilities), _prediction_head, manifest.name,
        manifest.version, rows, manifest.classes, served.runtime.members,
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


def encode_summary(registry: ModelRegistry, name: str) -> pb.ModelSummary:
    served = registry.get(name)
    return pb.ModelSummary(name=name, version=served.version, versions=registry.versions(name),
                           method=served.manifest.method, members=served.runtime.members)


def _input_spec(spec: InputSpec) -> pb.InputSpec:
    message = pb.InputSpec(name=spec.name, dtype=NUMPY_TO_DTYPE[spec.dtype], shape=spec.shape)
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
