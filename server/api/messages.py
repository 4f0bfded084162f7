"""snapserve.v1 messages <-> server objects. No logic beyond conversion."""

from __future__ import annotations

import numpy as np

from snapserve.proto.scores import EnsembleScores
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.tensors import NUMPY_TO_DTYPE, TensorError, from_tensor, to_tensor
from snapserve.server.errors import InvalidInput
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.inputs import format_shape
from snapserve.server.models.manifest import InputSpec
from snapserve.server.models.registry import ModelRegistry

__all__ = ["decode_input", "encode_metadata", "encode_prediction", "encode_summary"]


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
