"""Example files for the clients: a .npy array or a CSV of one example per row, read and checked
before any call, and fitted to a model's input (`ensemble-client predict --input`,
`ensemble-client bench --input-data`)."""

from __future__ import annotations

import numpy as np

from snapserve.proto.spec import InputSpec

__all__ = ["InputFileError", "fit_input", "read_csv", "read_input"]


class InputFileError(Exception):
    """An input file is missing, not a numeric .npy array, or does not fit the model."""


_CSV_SUFFIXES = (".csv", ".tsv", ".txt")


def read_csv(path: str) -> np.ndarray:
    """A CSV (or TSV) of numbers, one example per row; a header line is skipped."""
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
        header = any(c.isalpha() and c not in "eE" for c in first) or "nan" in first.lower()
        x = np.loadtxt(path, delimiter=delimiter, skiprows=1 if header else 0, ndmin=2,
                       dtype=np.float64)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read {path} as CSV (numbers, one example per row, "
                             f"'{delimiter}'-separated): {exc}") from exc
    return x


def read_input(path: str) -> np.ndarray:
    """The --input array, checked before any call: a readable .npy (or CSV) of real numbers."""
    if path.lower().endswith(_CSV_SUFFIXES):
        x = read_csv(path)
        if x.size == 0:
            raise InputFileError(f"{path} holds no numbers; expected one example per row")
        return x
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        if _is_text(path):
            raise InputFileError(f"{path} is text, not a .npy array: name it .csv to read it as "
                                 "CSV (one example per row), or save it with np.save") from exc
        raise InputFileError(f"cannot read {path} as a .npy array: {exc}") from exc
    if not isinstance(x, np.ndarray):  # an .npz archive
        raise InputFileError(f"{path} is an .npz archive; save one array with np.save")
    if x.dtype.kind not in "biuf" or x.size == 0 or x.ndim == 0:
        raise InputFileError(f"{path} holds a {x.dtype} array of shape {list(x.shape)}; "
                             "expected a non-empty array of numbers")
    return x


def _is_text(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    return bool(head) and not head.startswith(b"\x93NUMPY") and all(
        32 <= b < 127 or b in b"\t\r\n" for b in head)


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(e == -1 or s == e for s, e in zip(shape, expected))


def _with_unit_axes(shape: tuple[int, ...], expected: tuple[int, ...]) -> tuple[int, ...] | None:
    """`shape` ([B, ...]) as `expected`, with the size-1 axes it lacks put back; None: no fit."""
    if _fits(shape, expected):
        return shape
    batch, *rest = shape
    sizes = iter(rest)
    full = (batch, *(1 if d == 1 else next(sizes, 0) for d in expected[1:]))
    return full if next(sizes, None) is None and _fits(full, expected) else None


def fit_input(x: np.ndarray, spec: InputSpec, path: str = "input") -> np.ndarray:
    """`x` as a batch of the model's input ([B, ...], its dtype). Also accepted: one example
    without the batch axis, and either without the model's size-1 axes (for a [-1, 1, 8, 8]
    model: [B, 8, 8], [1, 8, 8] or [8, 8])."""
    features = tuple(spec.shape[1:])
    flat = (x.shape[0], int(np.prod(features))) if x.ndim == 2 and -1 not in features else None
    for shape in (x.shape, (1, *x.shape)):  # a batch, else one example
        full = _with_unit_axes(shape, spec.shape)
        if full is not None:
            return x.reshape(full).astype(spec.dtype, copy=False)
    if flat is not None and x.shape == flat:  # rows of flat features (a CSV): reshaped
        return x.reshape(x.shape[0], *features).astype(spec.dtype, copy=False)
    raise InputFileError(f"{path} has shape {list(x.shape)}; the model takes {list(spec.shape)} "
                         f"(-1: the batch), or one example of {list(spec.shape[1:])}")
