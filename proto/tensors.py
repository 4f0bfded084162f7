"""numpy <-> `snapserve.v1.Tensor`: raw little-endian bytes with an explicit dtype and shape.

Shared by the server and the client (numpy and protobuf only). Encoding is one copy into
`bytes`; decoding is a zero-copy, read-only view over the message's bytes after checking that
dtype, shape and byte length agree. Anything that does not agree raises `TensorError` with a
message that names what was wrong and what was expected.
"""

from __future__ import annotations

import math

import numpy as np

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb

__all__ = [
    "DTYPE_TO_NUMPY",
    "NUMPY_TO_DTYPE",
    "MAX_DIMS",
    "TensorError",
    "dtype_from_name",
    "dtype_name",
    "from_tensor",
    "to_tensor",
]

# Little-endian on the wire whatever the host's byte order ("<"; "|" for one-byte types).
DTYPE_TO_NUMPY: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.INT16: np.dtype("<i2"),
    pb.INT8: np.dtype("i1"),
    pb.UINT8: np.dtype("u1"),
    pb.BOOL: np.dtype("?"),
}
# Keyed by the native-order dtype, which is what arrays built on this host carry.
NUMPY_TO_DTYPE: dict[np.dtype, int] = {v.newbyteorder("="): k for k, v in DTYPE_TO_NUMPY.items()}

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


def _supported_names() -> str:
    return ", ".join(dtype_name(k) for k in DTYPE_TO_NUMPY)


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
    """Decode a Tensor into a read-only array viewing its bytes (copy it to write).

    `name` goes into error messages ("input dtype ...") so the sender knows which field failed.
    """
    dtype = DTYPE_TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise TensorError(f"{name} dtype {dtype_name(tensor.dtype)} is not supported; "
                          f"expected one of {_supported_names()}")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{name} has {len(shape)} dimensions; expected at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise TensorError(f"{name} shape {list(shape)} has a negative dimension; "
                          "expected sizes >= 0")
    # Python integers do not overflow, so a forged shape cannot wrap around to a small product.
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(f"{name} data has {len(tensor.data)} bytes; expected {expected} "
                          f"(shape {list(shape)} x {dtype.itemsize} bytes per {dtype_name(tensor.dtype)})")
    # An empty shape such as [0, 2**62, 2**62] matches b"", but numpy refuses any shape whose
    # non-zero sizes multiply past its index type, even with no element: refuse it by name.
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise TensorError(f"{name} shape {list(shape)} is too large; expected sizes whose "
                          f"product fits in {MAX_ARRAY_BYTES} bytes")
    try:
        array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # numpy's own limits, should the check above ever miss one
        raise TensorError(f"{name} shape {list(shape)} cannot be made into an array: {exc}") from exc
    if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise TensorError(f"{name} BOOL data holds bytes other than 0 and 1")
    return array
