"""KServe v2 (`inference.*`) messages <-> server objects. No logic beyond conversion and checks.

Inputs arrive as `raw_input_contents` (little-endian bytes, what tritonclient sends) or as typed
`contents`; either way they become one numpy array, and the ServedEnsemble checks it against the
model (shape, batch, dtype: floats of any width are converted, other mismatches refused).
Outputs always go back as `raw_output_contents`, which is what tritonclient reads by default.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import model_config_pb2 as mc
from snapserve.proto.scores import SCORE_SPECS, SCORES, EnsembleScores
from snapserve.proto.tensors import (KSERVE_CONTENTS, KSERVE_TO_NUMPY, NUMPY_TO_KSERVE, TensorError,
                                     array_from_bytes, check_fits, check_shape, wire_type)
from snapserve.proto.wire import LITTLE_ENDIAN, tag, varint
from snapserve.server.api.pipeline import InferRequest, parse_version
from snapserve.server.errors import InvalidInput
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.inputs import format_shape
from snapserve.server.models.manifest import InputSpec
from snapserve.server.models.policy import RepositoryConfig
from snapserve.server.models.registry import ModelRegistry
from snapserve.server.models.statistics import Duration

__all__ = ["DEFAULT_OUTPUTS", "OUTPUTS", "PLATFORM", "check_input_names", "choose_outputs", "decode_infer",
           "decode_infer_input", "encode_infer", "encode_infer_bytes", "encode_infer_response",
           "encode_infer_response_bytes", "encode_model_config", "encode_model_metadata",
           "encode_statistics", "parse_version", "payload_bytes", "requested_outputs"]

PLATFORM = "snapserve_ensemble"


@dataclass(frozen=True)
class OutputSpec:
    datatype: str
    dims: tuple[str, ...]  # after the batch: "classes", "members" (ScoreSpec.dims)


# The KServe outputs are the score table's rows (proto/scores.py SCORES), named like the
# EnsembleScores fields they come from; docs/protocol.md describes each. `top_class` is left
# out: KServe clients take the top class from `probabilities`, as Triton's do.
_NOT_OUTPUTS = frozenset({"top_class"})
OUTPUTS: dict[str, OutputSpec] = {
    spec.name: OutputSpec(NUMPY_TO_KSERVE[spec.dtype], spec.dims[1:])
    for spec in SCORES if spec.name not in _NOT_OUTPUTS}
# Large ones ([batch, members, classes]) are sent only when a request names them.
DEFAULT_OUTPUTS: tuple[str, ...] = tuple(
    spec.name for spec in SCORES if spec.name in OUTPUTS and not spec.on_request)


def output_dims(served: ServedEnsemble, name: str) -> list[int]:
    """An output's shape after the batch dimension, for this model version."""
    return list(SCORE_SPECS[name].shape(1, served.runtime.members,
                                         len(served.manifest.classes))[1:])


def config_type(datatype: str) -> int:
    """Triton's model-config enum for a KServe datatype: the same name behind TYPE_."""
    return mc.DataType.Value(f"TYPE_{datatype}")


def _check_capacity(count: int, spec: InputSpec, max_batch_size: int | None, what: str) -> None:
    """Refuse typed contents holding more values than the model can take in one request, before
    any is converted: converting them is a Python-level pass (seconds for 60 MB)."""
    features = spec.shape[1:]
    if max_batch_size is None or any(d < 1 for d in features):  # symbolic sizes: no bound
        return
    limit = max_batch_size * math.prod(features)
    if count > limit:
        raise InvalidInput(f"{what} holds {count} values; the model takes at most {limit} "
                           f"({max_batch_size} examples of shape {format_shape(features)})")


def _from_contents(tensor: kpb.ModelInferRequest.InferInputTensor, name: str, spec: InputSpec,
                   max_batch_size: int | None) -> np.ndarray:
    """The typed `contents` of a tensor, with the checks raw bytes get (proto.tensors)."""
    dtype = wire_type(tensor.datatype, name).numpy.newbyteorder("=")
    shape = check_shape(tensor.shape, name)
    check_fits(shape, dtype, name)
    field = KSERVE_CONTENTS.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"{name}: {tensor.datatype} has no typed contents field; send it in "
                           "raw_input_contents")
    values = getattr(tensor.contents, field)
    _check_capacity(len(values), spec, max_batch_size, f"{name} contents.{field}")
    if len(values) != math.prod(shape):
        raise InvalidInput(f"{name} contents.{field} holds {len(values)} values; shape "
                           f"{list(shape)} needs {math.prod(shape)}")
    if dtype.kind in "iu":  # int_contents is int32 on the wire: INT8/INT16 must fit
        wide = np.asarray(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"{name} contents.{field} has values outside "
                               f"{tensor.datatype}'s range [{info.min}, {info.max}]")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def check_input_names(sent: list[str], spec: InputSpec) -> None:
    """InvalidInput unless the request's inputs, by name, are the model's one input."""
    if len(sent) != 1 or sent[0] != spec.name:
        raise InvalidInput(f"the model takes one input named {spec.name!r} (datatype "
                           f"{NUMPY_TO_KSERVE.get(spec.dtype, spec.dtype)}, shape "
                           f"{format_shape(spec.shape)}); the request has inputs {sent}")


def _check_one_input(request: kpb.ModelInferRequest, spec: InputSpec) -> None:
    check_input_names([t.name for t in request.inputs], spec)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(f"raw_input_contents has {len(request.raw_input_contents)} entries "
                               f"for {len(request.inputs)} inputs; expected one per input")
        if request.inputs[0].HasField("contents"):
            raise InvalidInput(f"input {spec.name!r} has both contents and raw_input_contents; "
                               "send one of them")


def payload_bytes(request: kpb.ModelInferRequest) -> int:
    """The bytes decoding the request's inputs goes through: raw contents and typed contents."""
    return (sum(len(raw) for raw in request.raw_input_contents)
            + sum(tensor.contents.ByteSize() for tensor in request.inputs))


def decode_infer_input(request: kpb.ModelInferRequest, spec: InputSpec,
                       max_batch_size: int | None = None) -> np.ndarray:
    """The one input array of a ModelInferRequest; InvalidInput saying what is wrong. Typed
    contents beyond `max_batch_size` examples are refused before they are converted."""
    _check_one_input(request, spec)
    tensor = request.inputs[0]
    name = f"input {tensor.name!r}"
    try:
        if request.raw_input_contents:
            return array_from_bytes(request.raw_input_contents[0], tensor.datatype, tensor.shape,
                                    name, field="raw contents")
        return _from_contents(tensor, name, spec, max_batch_size)
    except TensorError as exc:
        raise InvalidInput(str(exc)) from exc


def requested_outputs(request: kpb.ModelInferRequest) -> tuple[str, ...]:
    """The outputs to send, in request order: those named, or DEFAULT_OUTPUTS."""
    return choose_outputs([(output.name, "classification" in output.parameters)
                           for output in request.outputs])


def choose_outputs(requested: list[tuple[str, bool]]) -> tuple[str, ...]:
    """The outputs to send, from (name, asks for classification) in request order, for either
    transport: those named, or DEFAULT_OUTPUTS when none is."""
    if not requested:
        return DEFAULT_OUTPUTS
    names: list[str] = []
    for name, classification in requested:
        if name not in OUTPUTS:
            raise InvalidInput(f"unknown output {name!r}; outputs are {', '.join(OUTPUTS)}")
        if classification:
            raise InvalidInput(f"output {name!r}: the classification extension is not "
                               "supported; ask for 'probabilities' and take the top classes")
        if name in names:
            raise InvalidInput(f"output {name!r} is asked for twice; name each output once")
        names.append(name)
    return tuple(names)


def encode_infer_response(scores: EnsembleScores, served: ServedEnsemble, request_id: str,
                          outputs: tuple[str, ...]) -> kpb.ModelInferResponse:
    response = kpb.ModelInferResponse(model_name=served.name, model_version=str(served.version),
                                      id=request_id)
    for name in outputs:
        array = np.asarray(getattr(scores, name))
        datatype = NUMPY_TO_KSERVE[array.dtype.newbyteorder("=")]
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        wire = array.astype(KSERVE_TO_NUMPY[datatype], copy=False)  # a no-op on little-endian
        response.raw_output_contents.append(wire.tobytes(order="C"))
    return response


_RESPONSE_FIELDS = kpb.ModelInferResponse.DESCRIPTOR.fields_by_name
_ID_TAG = tag(_RESPONSE_FIELDS["id"].number)
_RAW_OUTPUT_TAG = tag(_RESPONSE_FIELDS["raw_output_contents"].number)
# Heads of every version together: batch sizes x output selections (named in any order).
_HEADS = 1024


@functools.lru_cache(maxsize=_HEADS)
def _infer_response_head(model: str, version: int, outputs: tuple[str, ...], rows: int,
                         classes: int, members: int
                         ) -> tuple[bytes, tuple[tuple[str, bytes, np.dtype], ...]]:
    """What every answer of `rows` examples from this version says but its id and its bytes:
    the serialized name, version and output specs; per output, the key and length that start
    its raw contents, and the dtype its array must have. A pure function of its arguments,
    so cached by them: no entry refers to a served version."""
    response = kpb.ModelInferResponse(model_name=model, model_version=str(version))
    chunks = []
    for name in outputs:
        spec = SCORE_SPECS[name]
        shape = spec.shape(rows, members, classes)
        response.outputs.add(name=name, datatype=OUTPUTS[name].datatype, shape=shape)
        chunks.append((name, _RAW_OUTPUT_TAG + varint(math.prod(shape) * spec.dtype.itemsize),
                       spec.dtype))
    return response.SerializeToString(), tuple(chunks)


def encode_infer_response_bytes(scores: EnsembleScores, served: ServedEnsemble, request_id: str,
                                outputs: tuple[str, ...]) -> bytes:
    """`encode_infer_response(...).SerializeToString()`, assembled from a cached head and one
    `tobytes` per output (proto/wire.py): the answer is never built as a message."""
    rows, manifest = len(scores), served.manifest
    head, chunks = _infer_response_head(manifest.name, manifest.version, outputs, rows,
                                        len(manifest.classes), served.runtime.members)
    identifier = request_id.encode()
    parts = [head, _ID_TAG, varint(len(identifier)), identifier]
    for name, prefix, dtype in chunks:
        array = getattr(scores, name)
        if array.dtype != dtype or not LITTLE_ENDIAN:  # not its declared type: the slow path
            return encode_infer_response(scores, served, request_id, outputs).SerializeToString()
        parts += (prefix, array.tobytes())
    return b"".join(parts)


def decode_infer(request: kpb.ModelInferRequest, served: ServedEnsemble) -> np.ndarray:
    """The pipeline's decode step for a KServe request (api/pipeline.py): its input array; the
    outputs it names are checked here too, before it is queued."""
    x = decode_infer_input(request, served.manifest.input, served.max_batch_size)
    requested_outputs(request)
    return x


def encode_infer(scores: EnsembleScores, served: ServedEnsemble,
                 request: InferRequest[kpb.ModelInferRequest]) -> kpb.ModelInferResponse:
    """The pipeline's encode step for a KServe request, as a message (streams)."""
    return encode_infer_response(scores, served, request.request_id,
                                 requested_outputs(request.message))


def encode_infer_bytes(scores: EnsembleScores, served: ServedEnsemble,
                       request: InferRequest[kpb.ModelInferRequest]) -> bytes:
    """The pipeline's encode step for a unary KServe call: the serialized answer."""
    return encode_infer_response_bytes(scores, served, request.request_id,
                                       requested_outputs(request.message))


def _input_datatype(spec: InputSpec) -> str:
    return NUMPY_TO_KSERVE[spec.dtype.newbyteorder("=")]


def encode_model_metadata(registry: ModelRegistry,
                          served: ServedEnsemble) -> kpb.ModelMetadataResponse:
    spec = served.manifest.input
    tensor = kpb.ModelMetadataResponse.TensorMetadata
    return kpb.ModelMetadataResponse(
        name=served.name, versions=[str(v) for v in registry.versions(served.name)],
        platform=PLATFORM,
        inputs=[tensor(name=spec.name, datatype=_input_datatype(spec), shape=spec.shape)],
        outputs=[tensor(name=name, datatype=out.datatype, shape=[-1, *output_dims(served, name)])
                 for name, out in OUTPUTS.items()])


def input_parameters(spec: InputSpec) -> dict[str, str]:
    """What a KServe client must know to send this version's input (ModelConfig parameters):
    `input_kind` raw (send raw values: the graphs normalise) or normalized (apply
    `input_normalization`, JSON {mean, std, axis}, before sending)."""
    norm = spec.normalization
    return {"input_kind": spec.kind,
            "input_normalization": "null" if norm is None else json.dumps(
                {"mean": list(norm.mean), "std": list(norm.std), "axis": norm.axis})}


def _version_policy(config: RepositoryConfig, name: str) -> mc.ModelVersionPolicy:
    if config.version_policy == "all":
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if config.version_policy == "specific":
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(
            versions=config.pinned.get(name, ())))
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1))


def encode_model_config(served: ServedEnsemble, config: RepositoryConfig) -> mc.ModelConfig:
    """Triton's view of a model version: input/output dims without the batch dimension."""
    manifest, batching = served.manifest, served.batcher.config
    on_gpu = served.runtime.provider.startswith("CUDA")
    model_config = mc.ModelConfig(
        name=served.name, platform=PLATFORM, backend="onnxruntime",
        version_policy=_version_policy(config, served.name),
        max_batch_size=batching.max_batch_size,
        input=[mc.ModelInput(name=manifest.input.name,
                             data_type=config_type(_input_datatype(manifest.input)),
                             dims=manifest.input.shape[1:])],
        output=[mc.ModelOutput(name=name, data_type=config_type(out.datatype),
                               dims=output_dims(served, name)) for name, out in OUTPUTS.items()],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=round(batching.max_queue_delay_s * 1e6)),
        instance_group=[mc.ModelInstanceGroup(
            name=served.name, count=len(served.instances),
            kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU)])
    for key, value in {"version": str(served.version), "method": manifest.method,
                       "members": str(served.runtime.members),
                       "classes": json.dumps(list(manifest.classes)),
                       "temperature": repr(manifest.temperature),
                       **input_parameters(manifest.input), "output_kind": manifest.output_kind,
                       "execution_provider": served.runtime.provider,
                       "max_queue_size": str(batching.max_queue_size),
                       **served.runtime_parameters}.items():  # graph (fused/members), instances
        model_config.parameters[key].string_value = value
    return model_config


def _duration(d: Duration) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=d.count, ns=d.ns)


def encode_statistics(served: ServedEnsemble) -> kpb.ModelStatistics:
    """Triton's statistics: compute_infer is a whole batch (members and scores); the
    input/output copies are part of it, and reported as zero."""
    stats = served.statistics
    zero = kpb.StatisticDuration()
    return kpb.ModelStatistics(
        name=served.name, version=str(served.version), last_inference=stats.last_inference_ms,
        inference_count=stats.examples, execution_count=stats.compute.count,
        inference_stats=kpb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail),
            queue=_duration(stats.queue), compute_input=zero,
            compute_infer=_duration(stats.compute), compute_output=zero),
        batch_stats=[kpb.InferBatchStatistics(batch_size=size, compute_input=zero,
                                              compute_infer=_duration(d), compute_output=zero)
                     for size, d in sorted(stats.batches.items())])
