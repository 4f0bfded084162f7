"""The tensor codec both APIs share: one dtype table, and bytes <-> numpy with every check.

Shared by the server, the client and the load generator (numpy and protobuf only: no gRPC, no
torch). `WIRE_TYPES` is the one table of element types, one row per type with every name it goes
by (numpy, the native `snapserve.v1.DataType`, KServe v2, ONNX Runtime); the dicts below it are
its inverses. `array_from_bytes` turns (bytes, dtype, shape, name) into an array for both APIs:
the native Tensor's `data` and KServe's `raw_input_contents`. Decoding is a zero-copy, read-only
view over the message's bytes; encoding (`to_tensor`) is one copy into `bytes`. Anything that does
not agree raises `TensorError` with a message that names what was wrong and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb

__all__ = [
    "DTYPE_TO_NUMPY",
    "KSERVE_CONTENTS",
    "KSERVE_TO_NUMPY",
    "MAX_ARRAY_BYTES",
    "MAX_DIMS",
    "NUMPY_TO_DTYPE",
    "NUMPY_TO_KSERVE",
    "ONNX_TO_NUMPY",
    "WIRE_TYPES",
    "TensorError",
    "WireType",
    "array_from_bytes",
    "check_fits",
    "check_shape",
    "dtype_from_name",
    "dtype_name",
    "from_tensor",
    "to_tensor",
    "wire_type",
]


@dataclass(frozen=True)
class WireType:
    """One element type and its name on every wire."""

    numpy: np.dtype  # as sent: little-endian whatever the host ("|" for one-byte types)
    native: int | None  # snapserve.v1.DataType; None where the native API has no such type
    kserve: str  # KServe v2 datatype
    onnx: str  # ONNX Runtime's NodeArg.type
    kserve_contents: str | None  # the InferTensorContents field carrying it; None: raw only


WIRE_TYPES: tuple[WireType, ...] = (
    WireType(np.dtype("<f4"), pb.FLOAT32, "FP32", "tensor(float)", "fp32_contents"),
    WireType(np.dtype("<f8"), pb.FLOAT64, "FP64", "tensor(double)", "fp64_contents"),
    WireType(np.dtype("<f2"), pb.FLOAT16, "FP16", "tensor(float16)", None),
    WireType(np.dtype("<i8"), pb.INT64, "INT64", "tensor(int64)", "int64_contents"),
    WireType(np.dtype("<i4"), pb.INT32, "INT32", "tensor(int32)", "int_contents"),
    WireType(np.dtype("<i2"), pb.INT16, "INT16", "tensor(int16)", "int_contents"),
    WireType(np.dtype("i1"), pb.INT8, "INT8", "tensor(int8)", "int_contents"),
    WireType(np.dtype("u1"), pb.UINT8, "UINT8", "tensor(uint8)", "uint_contents"),
    WireType(np.dtype("?"), pb.BOOL, "BOOL", "tensor(bool)", "bool_contents"),
    WireType(np.dtype("<u2"), None, "UINT16", "tensor(uint16)", "uint_contents"),
    WireType(np.dtype("<u4"), None, "UINT32", "tensor(uint32)", "uint_contents"),
    WireType(np.dtype("<u8"), None, "UINT64", "tensor(uint64)", "uint64_contents"),
)

# Wire names -> the little-endian wire dtype. Keyed the other way by the native-order dtype,
# which is what arrays built on this host carry.
DTYPE_TO_NUMPY: dict[int, np.dtype] = {t.native: t.numpy for t in WIRE_TYPES if t.native is not None}
NUMPY_TO_DTYPE: dict[np.dtype, int] = {v.newbyteorder("="): k for k, v in DTYPE_TO_NUMPY.items()}
KSERVE_TO_NUMPY: dict[str, np.dtype] = {t.kserve: t.numpy for t in WIRE_TYPES}
NUMPY_TO_KSERVE: dict[np.dtype, str] = {v.newbyteorder("="): k for k, v in KSERVE_TO_NUMPY.items()}
KSERVE_CONTENTS: dict[str, str] = {t.kserve: t.kserve_contents for t in WIRE_TYPES
                                   if t.kserve_contents is not None}
# ONNX Runtime computes in the host's byte order.
ONNX_TO_NUMPY: dict[str, np.dtype] = {t.onnx: t.numpy.newbyteorder("=") for t in WIRE_TYPES}
_BY_NATIVE = {t.native: t for t in WIRE_TYPES if t.native is not None}
_BY_KSERVE = {t.kserve: t for t in WIRE_TYPES}

# numpy itself allows 64 dimensions; no model input here needs more than a handful.
MAX_DIMS = 32
# numpy's own bound on an array's size in bytes (its index type, intp).
MAX_ARRAY_BYTES = np.iinfo(np.intp).max


class TensorError(ValueError):
    """A tensor (or array) that cannot be converted: unknown dtype, bad shape, wrong byte length."""


def dtype_name(dtype: int) -> str:
    """The enum name of a wire dtype ("FLOAT32"), or "unknown dtype N" for a value not in the enum."""
    try:
        return pb.DataType.Name(dtype)
    except ValueError:
        return f"unknown dtype {dtype}"


def _label(dtype: int | str) -> str:
    """A dtype as its API spells it: FLOAT32 (native enum) or FP32 (KServe)."""
    return dtype if isinstance(dtype, str) else dtype_name(dtype)


def wire_type(dtype: int | str, name: str) -> WireType:
    """The row of a native DataType (int) or a KServe datatype (str); TensorError naming `name`."""
    if isinstance(dtype, str):
        known, field, sent = _BY_KSERVE, "datatype", repr(dtype)
    else:
        known, field, sent = _BY_NATIVE, "dtype", dtype_name(dtype)
    row = known.get(dtype)  # type: ignore[call-overload]
    if row is None:
        raise TensorError(f"{name} {field} {sent} is not supported; expected one of "
                          + ", ".join(_label(k) for k in known))
    return row


def dtype_from_name(name: str) -> int:
    """The wire dtype for a numpy dtype name ("float32" -> FLOAT32), as manifests spell them."""
    try:
        native = np.dtype(name).newbyteorder("=")
    except TypeError as exc:
        raise TensorError(f"unknown dtype name {name!r}; expected a numpy name such as 'float32'") from exc
    if native not in NUMPY_TO_DTYPE:
        raise TensorError(f"dtype {name!r} is not supported; expected one of "
                          + ", ".join(str(d) for d in NUMPY_TO_DTYPE))
    return NUMPY_TO_DTYPE[native]


def check_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    """The shape as a tuple if numpy could hold it (rank, sizes >= 0); TensorError naming `name`."""
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{name} has {len(shape)} dimensions; expected at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise TensorError(f"{name} shape {list(shape)} has a negative dimension; "
                          "expected sizes >= 0")
    return shape


def check_fits(shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
    """An empty shape such as [0, 2**62, 2**62] holds no byte, but numpy refuses any shape whose
    non-zero sizes multiply past its index type, even with no element: refuse it by name."""
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise TensorError(f"{name} shape {list(shape)} is too large; expected sizes whose "
                          f"product fits in {MAX_ARRAY_BYTES} bytes")


def array_from_bytes(data: bytes, dtype: int | str, shape: Sequence[int], name: str,
                     field: str = "data") -> np.ndarray:
    """A read-only array viewing `data` (copy it to write), after every check: the dtype is one
    of WIRE_TYPES (a native DataType or a KServe datatype), the shape is sane, the byte length
    matches, BOOL bytes are 0 or 1.

    `name` (the tensor) and `field` (where its bytes came: "data", "raw contents") go into error
    messages, so the sender knows which part of its request failed.
    """
    wire = wire_type(dtype, name).numpy
    shape = check_shape(shape, name)
    # Python integers do not overflow, so a forged shape cannot wrap around to a small product.
    expected = math.prod(shape) * wire.itemsize
    if len(data) != expected:
        verb = "hold" if field.endswith("contents") else "has"  # "data has", "contents hold"
        raise TensorError(f"{name} {field} {verb} {len(data)} bytes; expected {expected} (shape "
                          f"{list(shape)} x {wire.itemsize} bytes per {_label(dtype)})")
    check_fits(shape, wire, name)
    try:
        array = np.frombuffer(data, dtype=wire).reshape(shape)
    except ValueError as exc:  # numpy's own limits, should the checks above ever miss one
        raise TensorError(f"{name} shape {list(shape)} cannot be made into an array: {exc}") from exc
    if wire.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise TensorError(f"{name} BOOL data holds bytes other than 0 and 1")
    return array


def to_tensor(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array (any byte order or memory layout) as a Tensor; fill `out` when given.

    `out` lets a caller write straight into a field of a larger message
    (`to_tensor(a, response.probabilities)`) instead of building a Tensor and copying it in.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in NUMPY_TO_DTYPE:
        raise TensorError(f"array dtype {array.dtype} cannot be sent; expected one of "
                          + ", ".join(str(d) for d in NUMPY_TO_DTYPE))
    code = NUMPY_TO_DTYPE[native]
    wire = array.astype(DTYPE_TO_NUMPY[code], copy=False)  # a no-op on little-endian hosts
    tensor = pb.Tensor() if out is None else out
    tensor.dtype = code
    tensor.shape[:] = wire.shape
    tensor.data = wire.tobytes(order="C")  # row-major whatever the memory layout
    return tensor


def from_tensor(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Decode a Tensor into a read-only array viewing its bytes (copy it to write)."""
    return array_from_bytes(tensor.data, tensor.dtype, tensor.shape, name)
