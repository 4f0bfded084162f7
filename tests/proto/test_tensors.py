"""proto/tensors.py: numpy <-> Tensor round trips and the validation of what comes off the wire."""

from __future__ import annotations

import re

import numpy as np
import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.tensors import (DTYPE_TO_NUMPY, TensorError, dtype_from_name, from_tensor, to_tensor)


@pytest.mark.parametrize("dtype", [np.dtype(d).newbyteorder("=") for d in DTYPE_TO_NUMPY.values()])
def test_round_trip_every_dtype(dtype: np.dtype) -> None:
    x = (np.arange(24) % 2 if dtype.kind == "b" else np.arange(24)).astype(dtype).reshape(2, 3, 4)
    back = from_tensor(to_tensor(x))
    assert back.dtype == dtype and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, x)


def test_wire_is_little_endian_and_row_major_whatever_the_input() -> None:
    x = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian, Fortran order
    t = to_tensor(x)
    assert t.dtype == pb.FLOAT32 and list(t.shape) == [3, 2]
    assert t.data == np.ascontiguousarray(x, dtype="<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(t), x)


def test_decoded_array_is_a_read_only_view() -> None:
    arr = from_tensor(to_tensor(np.ones(3, np.float32)))
    with pytest.raises(ValueError):
        arr[0] = 2


def test_empty_and_scalar() -> None:
    assert from_tensor(to_tensor(np.zeros((0, 4), np.float32))).shape == (0, 4)
    assert from_tensor(to_tensor(np.float32(3.5))).shape == ()


@pytest.mark.parametrize("tensor, message", [
    (pb.Tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4),
     "input dtype DATA_TYPE_UNSPECIFIED is not supported; expected one of FLOAT32"),
    (pb.Tensor(dtype=42, shape=[1], data=b"\0" * 4), "unknown dtype 42"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, -3], data=b""), "negative dimension"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=b"\0" * 20),
     "input data has 20 bytes; expected 24 (shape [2, 3] x 4 bytes per FLOAT32)"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2**62, 2**62], data=b"\0" * 4),
     f"input data has 4 bytes; expected {2**124 * 4}"),
    (pb.Tensor(dtype=pb.UINT8, shape=[1] * 40, data=b"\0"), "40 dimensions; expected at most 32"),
    (pb.Tensor(dtype=pb.BOOL, shape=[2], data=b"\x01\x07"), "other than 0 and 1"),
])
def test_bad_tensors_raise_tensor_error_naming_the_problem(tensor: pb.Tensor, message: str) -> None:
    with pytest.raises(TensorError, match=re.escape(message)):
        from_tensor(tensor, name="input")


def test_unsupported_array_dtype() -> None:
    with pytest.raises(TensorError, match="complex64 cannot be sent"):
        to_tensor(np.zeros(2, np.complex64))


def test_dtype_names() -> None:
    assert dtype_from_name("float32") == pb.FLOAT32
    assert dtype_from_name("int64") == pb.INT64
    with pytest.raises(TensorError):
        dtype_from_name("complex128")
    with pytest.raises(TensorError):
        dtype_from_name("not-a-dtype")
