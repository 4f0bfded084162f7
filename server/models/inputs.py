"""Checking a request's input array against a model's input spec, before it joins a batch.

Every refusal is an InvalidInput whose message says what was wrong and what was expected, so a
client can fix its request without reading server logs.
"""

from __future__ import annotations

import numpy as np

from snapserve.server.errors import InvalidInput
from snapserve.server.models.manifest import InputSpec

__all__ = ["conform_input", "format_shape"]


def format_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _conform_dtype(array: np.ndarray, expected: np.dtype) -> np.ndarray:
    if array.dtype == expected:
        return array
    # Float widths convert losslessly enough for inference, integers that widen exactly
    # (int32 ids into an int64 input) too; anything else (ints into a float model, bools) would
    # mean the client sent the wrong data, e.g. raw uint8 pixels to a normalised float model.
    if array.dtype.kind == "f" and expected.kind == "f":
        with np.errstate(over="ignore"):  # float64 beyond float32's range: Inf, refused below
            return array.astype(expected)
    if array.dtype.kind in "iu" and expected.kind in "iu" and np.can_cast(array.dtype, expected):
        return array.astype(expected)
    accepted = f"{expected}" + (" (float16 and float64 are converted)" if expected.kind == "f"
                                else " (narrower integers are converted)" if expected.kind in "iu"
                                else "")
    raise InvalidInput(f"input dtype {array.dtype} is not accepted; the model takes {accepted}")


def _check_finite(array: np.ndarray, sent: np.ndarray) -> None:
    # One pass over the input, small next to inference; NaN or Inf would come back as NaN
    # probabilities (or quietly wrong ones), which a client may not notice.
    finite = np.isfinite(array)
    if np.logical_and.reduce(finite, axis=None):  # the ufunc itself: .all() adds a Python layer
        return
    bad = np.argwhere(~finite)
    first = tuple(bad[0].tolist())
    if np.isfinite(sent[first]):  # finite as sent: too large for the model's dtype
        raise InvalidInput(f"input holds {len(bad)} values beyond the range of {array.dtype}, "
                           f"the first at index {list(first)} ({sent[first]}); the model expects "
                           f"finite {array.dtype} numbers (|x| <= {np.finfo(array.dtype).max:.4g})")
    raise InvalidInput(f"input holds {len(bad)} non-finite values (NaN or Inf), the first at "
                       f"index {list(first)} ({sent[first]}); the model expects finite "
                       "numbers (a server started with --allow-nonfinite passes them on)")


def conform_input(array: np.ndarray, spec: InputSpec, max_batch_size: int,
                  allow_nonfinite: bool = False) -> np.ndarray:
    """The array the model should see for this request, or InvalidInput saying why there is none.

    NaN and Inf in a float input are refused unless `allow_nonfinite`.
    """
    shape = tuple(array.shape)
    expected = spec.shape
    if len(shape) != len(expected) or any(e != -1 and d != e for d, e in zip(shape, expected)):
        raise InvalidInput(f"input shape {format_shape(shape)} does not match the model's "
                           f"{format_shape(expected)}")
    batch = shape[0]
    if batch == 0:
        raise InvalidInput(f"input batch is empty (0 examples); expected 1 to {max_batch_size} "
                           f"examples of shape {format_shape(expected)}")
    if batch > max_batch_size:
        raise InvalidInput(f"input batch of {batch} examples exceeds the server's max batch size "
                           f"{max_batch_size}; split it into requests of at most {max_batch_size}")
    conformed = _conform_dtype(array, spec.dtype)
    if not allow_nonfinite and conformed.dtype.kind == "f":
        _check_finite(conformed, array)
    return conformed
