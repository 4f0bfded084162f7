"""KServe v2 REST bodies <-> arrays and scores. Conversion and checks only.

The REST front end (api/http.py) decodes a request's tensors straight to numpy arrays and hands
them to the one pipeline (api/pipeline.py); the checks against the model and the outputs asked
for are the KServe protocol's own (api/kserve_messages.py), so both transports answer alike.

- Before a body is read, its length is held to what the model can take (`model_body_bound`);
  once its JSON is parsed, each input's declared shape and datatype are checked against the
  model's input and `max_batch_size` before its data becomes an array (`check_declared`).
- An infer request's JSON `data` (flat or nested, row-major) becomes an array here, with its
  own checks (count against shape, numbers of the datatype's kind and range); binary tensors
  (Triton's binary tensor data extension: a JSON header of `Inference-Header-Content-Length`
  bytes, then each input's `binary_data_size` bytes in order) are sliced from the body as is,
  and viewed as arrays once the model's input is known.
- An infer response goes back as JSON, each output's `data` flat and row-major, or, for the
  outputs asked for that way (`binary_data` per output, `binary_data_output` for all), as raw
  bytes after the JSON header, whose length the `Inference-Header-Content-Length` header says.
- Every other answer is its message in proto3's JSON form with the .proto's field names and
  64-bit integers as numbers (what Triton's REST API returns, and tritonclient.http reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from snapserve.proto.scores import EnsembleScores
from snapserve.proto.tensors import (KSERVE_TO_NUMPY, NUMPY_TO_KSERVE, TensorError,
                                     array_from_bytes, check_fits, check_shape, wire_type)
from snapserve.server.api.kserve_messages import check_input_names, choose_outputs
from snapserve.server.api.pipeline import InferRequest
from snapserve.server.errors import InvalidInput
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.inputs import conform_input, format_shape

__all__ = ["BINARY_HEADER", "JSON_TYPE", "BINARY_TYPE", "RestInferRequest", "RestTensor",
           "check_declared", "decode_infer_request", "decode_json", "decode_rest", "encode_rest",
           "error_body", "json_data_array", "message_json", "model_body_bound"]

# Triton's binary tensor data extension: the length of the JSON part of a body that continues
# with raw tensor bytes.
BINARY_HEADER = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                          FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                          FieldDescriptor.TYPE_SFIXED64})
# Which JSON values a datatype of each numpy kind takes: integers into a float tensor are
# fine (JSON writers write 1.0 as 1), fractions into an integer tensor are not.
_ACCEPTED_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}
_KIND_NAMES = {"f": "numbers", "i": "integers", "u": "integers", "b": "true/false"}
_SENT_NAMES = {"f": "fractional numbers", "i": "integers", "u": "integers", "b": "booleans"}
# The most a JSON value of any datatype takes with its separator ("-1.2345678901234567e-308,"),
# above a binary tensor's 8 bytes; and what a body holds besides its data (id, names, outputs).
JSON_VALUE_BYTES = 32
BODY_OVERHEAD_BYTES = 64 * 1024


def model_body_bound(served: ServedEnsemble) -> tuple[int, str]:
    """The largest body a request to `served` can need (JSON or binary), and what sets it."""
    spec = served.manifest.input
    values = served.max_batch_size * math.prod(d for d in spec.shape[1:])
    bound = values * JSON_VALUE_BYTES + BODY_OVERHEAD_BYTES
    return bound, (f"model {served.name!r} takes at most {served.max_batch_size} examples "
                   f"(max_batch_size) of shape {format_shape(spec.shape[1:])}, which no body "
                   f"needs more than {bound} bytes for")


def check_declared(shape: tuple[int, ...], datatype: str, served: ServedEnsemble,
                   label: str) -> None:
    """InvalidInput unless the model takes an input of this shape and datatype: checked on a
    zero-stride view, before the input's data is read."""
    wire = wire_type(datatype, label).numpy
    conform_input(np.broadcast_to(np.zeros((), wire), shape), served.manifest.input,
                  served.max_batch_size, allow_nonfinite=True)


@dataclass(frozen=True)
class RestTensor:
    """One input of a REST request: its JSON `data` as an array, or its binary bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | memoryview


@dataclass(frozen=True)
class RestInferRequest:
    """A decoded REST infer request: its tensors and what it asks of the answer."""

    id: str
    inputs: tuple[RestTensor, ...]
    # (name, asks for the classification extension), in request order (choose_outputs).
    outputs: tuple[tuple[str, bool], ...]
    # An output's own `binary_data` parameter, where it has one; else `binary_data_output`.
    binary_outputs: dict[str, bool]
    binary_output_default: bool
    timeout_s: float | None  # the `timeout` parameter (microseconds, as Triton's)

    def binary(self, output: str) -> bool:
        """Whether this output goes as raw bytes after the JSON header."""
        return self.binary_outputs.get(output, self.binary_output_default)


def error_body(message: str) -> bytes:
    """The protocol's error answer."""
    return orjson.dumps({"error": message})


def decode_json(body: bytes | memoryview, what: str = "the request body") -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a JSON array, got {type(value).__name__}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    return value


def _split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """(the JSON part, the binary tensor bytes after it)."""
    if header_length is None:
        return memoryview(body), memoryview(b"")
    if not header_length.isascii() or not header_length.isdigit():
        raise InvalidInput(f"{BINARY_HEADER} {header_length!r} is not a byte count")
    size = int(header_length)
    if size > len(body):
        raise InvalidInput(f"{BINARY_HEADER} is {size} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return view[:size], view[size:]


def json_data_array(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor's JSON `data` (flat or nested) as an array of `datatype` and `shape`."""
    wire = wire_type(datatype, name).numpy
    try:
        values = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise InvalidInput(f"{name} data is not a flat or evenly nested array of numbers: "
                           f"{exc}") from exc
    count = math.prod(shape)
    if values.size != count:
        raise InvalidInput(f"{name} data holds {values.size} values; shape {list(shape)} needs "
                           f"{count}")
    if values.size and values.dtype.kind not in _ACCEPTED_KINDS[wire.kind]:
        sent = _SENT_NAMES.get(values.dtype.kind, "values that are not numbers")
        raise InvalidInput(f"{name} data holds {sent}; datatype {datatype} takes "
                           f"{_KIND_NAMES[wire.kind]}")
    if values.size and wire.kind in "iuf" and _holds_bool(data):
        raise InvalidInput(f"{name} data mixes true/false with numbers; datatype {datatype} "
                           f"takes {_KIND_NAMES[wire.kind]} only")
    if values.size and wire.kind in "iuf":
        info = np.iinfo(wire) if wire.kind in "iu" else np.finfo(wire)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise InvalidInput(f"{name} data has values outside {datatype}'s range "
                               f"[{info.min:.6g}, {info.max:.6g}]")
    return values.astype(wire.newbyteorder("="), copy=False).reshape(shape)


def _holds_bool(data: Any) -> bool:
    """Whether JSON data (flat or evenly nested lists) holds a true/false: np.asarray makes
    [1.0, true] numbers, so a boolean among numbers is only seen in the lists themselves."""
    if type(data) is not list:
        return type(data) is bool
    if data and type(data[0]) is list:
        return any(_holds_bool(row) for row in data)
    return bool in set(map(type, data))


def _decode_input(tensor: Any, index: int, binary: memoryview, offset: int,
                  served: ServedEnsemble | None) -> tuple[RestTensor, int]:
    """One input tensor; the offset of the next binary tensor."""
    tensor = _object(tensor, f"inputs[{index}]")
    name = _string(tensor.get("name"), f"inputs[{index}].name")
    label = f"input {name!r}"
    datatype = _string(tensor.get("datatype"), f"{label} datatype")
    shape_json = _list(tensor.get("shape"), f"{label} shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape_json):
        raise InvalidInput(f"{label} shape must be a list of integers, got {shape_json}")
    try:
        shape = check_shape(shape_json, label)
        check_fits(shape, wire_type(datatype, label).numpy, label)
        if served is not None and name == served.manifest.input.name:
            check_declared(tuple(shape), datatype, served, label)
    except TensorError as exc:
        raise InvalidInput(str(exc)) from exc
    parameters = _object(tensor.get("parameters", {}), f"{label} parameters")
    size = parameters.get("binary_data_size")
    data: np.ndarray | memoryview
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{label} binary_data_size must be a byte count, got {size!r}")
        if offset + size > len(binary):
            raise InvalidInput(f"{label} binary_data_size {size} runs past the body's "
                               f"{len(binary)} bytes of binary tensor data")
        data = binary[offset:offset + size]
        offset += size
    elif "data" in tensor:
        try:
            data = json_data_array(tensor["data"], datatype, shape, label)
        except TensorError as exc:
            raise InvalidInput(str(exc)) from exc
    else:
        raise InvalidInput(f"{label} has neither data nor parameters.binary_data_size")
    return RestTensor(name, datatype, tuple(shape), data), offset


def _decode_outputs(outputs: Any) -> tuple[tuple[tuple[str, bool], ...], dict[str, bool]]:
    """The requested outputs (name, asks for classification); their own `binary_data`."""
    requested, binary = [], {}
    for index, output in enumerate(_list(outputs, "outputs")):
        output = _object(output, f"outputs[{index}]")
        name = _string(output.get("name"), f"outputs[{index}].name")
        parameters = _object(output.get("parameters", {}), f"output {name!r} parameters")
        # The classification extension is refused by the protocol's own check, as on gRPC.
        requested.append((name, "classification" in parameters))
        if isinstance(parameters.get("binary_data"), bool):
            binary[name] = parameters["binary_data"]
    return tuple(requested), binary


def _timeout(parameters: dict[str, Any]) -> float | None:
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise InvalidInput(f"parameters.timeout must be a positive number of microseconds, "
                           f"got {timeout!r}")
    return timeout / 1e6


def decode_infer_request(body: bytes, header_length: str | None,
                         served: ServedEnsemble | None = None) -> RestInferRequest:
    """An infer request's body (JSON, or JSON + binary tensors), its tensors as arrays or bytes;
    with `served`, each input's declared shape and datatype checked against it first."""
    header, binary = _split_body(body, header_length)
    request = _object(decode_json(header), "the request body")
    request_id = _string(request.get("id", ""), "id")
    parameters = _object(request.get("parameters", {}), "parameters")
    offset, inputs = 0, []
    for index, tensor in enumerate(_list(request.get("inputs"), "inputs")):
        decoded, offset = _decode_input(tensor, index, binary, offset, served)
        inputs.append(decoded)
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes of binary tensor data "
                           "that no input's binary_data_size accounts for")
    outputs, binary_outputs = _decode_outputs(request.get("outputs", []))
    return RestInferRequest(request_id, tuple(inputs), outputs, binary_outputs,
                            parameters.get("binary_data_output") is True, _timeout(parameters))


def decode_rest(request: RestInferRequest, served: ServedEnsemble) -> np.ndarray:
    """The pipeline's decode step for a REST request (api/pipeline.py): its one input as an
    array, with the checks a KServe gRPC request gets; the outputs it names are checked too."""
    check_input_names([tensor.name for tensor in request.inputs], served.manifest.input)
    tensor = request.inputs[0]
    x = tensor.data
    if isinstance(x, memoryview):
        try:
            x = array_from_bytes(x, tensor.datatype, tensor.shape,  # type: ignore[arg-type]
                                 f"input {tensor.name!r}", field="raw contents")
        except TensorError as exc:
            raise InvalidInput(str(exc)) from exc
    choose_outputs(list(request.outputs))
    return x


def encode_rest(scores: EnsembleScores, served: ServedEnsemble,
                request: InferRequest[RestInferRequest]) -> tuple[bytes, int | None]:
    """The pipeline's encode step for a REST request: the answer's body and, when it carries
    binary tensors, the length of its JSON part."""
    rest = request.message
    outputs, blobs = [], []
    for name in choose_outputs(list(rest.outputs)):
        array = np.asarray(getattr(scores, name))
        datatype = NUMPY_TO_KSERVE[array.dtype.newbyteorder("=")]
        wire = np.ascontiguousarray(array.astype(KSERVE_TO_NUMPY[datatype], copy=False))
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if rest.binary(name):
            raw = wire.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:  # orjson writes the array itself: float32 as float32, no Python floats between
            entry["data"] = wire.reshape(-1)
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": served.name, "model_version": str(served.version)}
    if request.request_id:
        answer["id"] = request.request_id
    answer["outputs"] = outputs
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _numbers(field: FieldDescriptor, value: Any) -> Any:
    if field.type in _INT64_TYPES:
        return int(value)
    if field.message_type is not None and isinstance(value, dict):
        return _with_numbers(field.message_type, value)
    return value


def _with_numbers(descriptor: Descriptor, obj: dict[str, Any]) -> dict[str, Any]:
    """proto3's JSON writes 64-bit integers as strings; the REST API writes numbers."""
    for field in descriptor.fields:
        if field.name not in obj:
            continue
        value = obj[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            obj[field.name] = {k: _numbers(entry, v) for k, v in value.items()}
        elif field.is_repeated:  # protobuf 6.31+
            obj[field.name] = [_numbers(field, v) for v in value]
        else:
            obj[field.name] = _numbers(field, value)
    return obj


def message_json(message: Message) -> dict[str, Any]:
    """A protocol message as the REST API's JSON: the .proto's field names, every field
    (defaults too), 64-bit integers as numbers."""
    obj = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _with_numbers(message.DESCRIPTOR, obj)
