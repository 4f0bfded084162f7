"""ONNX export of one member, checked against PyTorch with ONNX Runtime.

torch 2.13 still accepts `dynamo=False` (the TorchScript exporter) but warns that it will be
removed, so we use the torch.export-based exporter. Opset 18 is its lowest native opset: asking
for 17 goes through a version converter. Graphs take `input` [batch, ...] (dynamic batch) and
return `logits` [batch, C]. Given the dataset's normalisation, a graph takes raw inputs and
applies it itself (`Normalized`, a Sub and a Div at the front), so every client on every
transport sends raw data; the manifest records it as `input.kind: raw`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from snapserve.proto.scores import softmax
from snapserve.trainer.errors import ExportParityError

__all__ = ["INPUT_NAME", "ONNX_OPSET", "OUTPUT_NAME", "PARITY_TOLERANCE", "Normalized",
           "check_parity", "export_onnx", "onnx_logits", "torch_logits"]

ONNX_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_TOLERANCE = 1e-4  # max abs difference of probabilities; float32 graphs agree to ~1e-6


class Normalized(nn.Module):
    """`model` on (x - mean) / std, broadcast as the manifest's `input.normalization` says
    (per channel along `axis`, or one scalar pair): the exported graph takes raw inputs."""

    def __init__(self, model: nn.Module, normalization: Mapping[str, object], ndim: int) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(normalization["mean"], dtype=torch.float32)
        std = torch.tensor(normalization["std"], dtype=torch.float32)
        shape = [1] * ndim  # the input's rank, batch included
        if mean.numel() > 1:
            shape[int(normalization.get("axis", 1))] = mean.numel()  # type: ignore[call-overload]
        self.register_buffer("mean", mean.reshape(shape))
        self.register_buffer("std", std.reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about torchvision ops and deprecations that do not concern us."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int],
                opset: int = ONNX_OPSET, normalization: Mapping[str, object] | None = None) -> None:
    """Writes `model` (a CPU copy in eval mode; the original is untouched) to `path`; with
    `normalization` (the manifest's), the graph takes raw inputs and normalises them first."""
    cpu_model: nn.Module = copy.deepcopy(model).to("cpu").eval()
    if normalization is not None:
        cpu_model = Normalized(cpu_model, normalization, 1 + len(input_shape)).eval()
    # A batch of 2 in the example: a batch of 1 could be specialized into the graph.
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    with _quiet_exporter():
        program = torch.onnx.export(
            cpu_model, (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    proto = program.model_proto
    onnx.checker.check_model(proto)
    Path(path).write_bytes(proto.SerializeToString())


def torch_logits(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu",
                 batch_size: int = 1024) -> np.ndarray:
    """Eval-mode logits of a float32 [N, ...] array, in chunks; restores the model's mode."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
            out.append(model(chunk).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def onnx_session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path: str | Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    session = onnx_session(path, threads)
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


def check_parity(model: nn.Module, path: str | Path, batches: Sequence[np.ndarray],
                 tolerance: float = PARITY_TOLERANCE, threads: int = 1,
                 normalize: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """Max abs difference of ONNX Runtime vs PyTorch (CPU, eval) probabilities over `batches`.

    With `normalize` (the trainer's own, e.g. Dataset.normalize) the batches are raw: the graph
    gets them as they are and PyTorch gets `normalize(x)`, as in training and evaluation, so the
    graph's normalisation is checked too. Raises ExportParityError, naming the batch and the
    difference, beyond `tolerance`.
    """
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    session = onnx_session(path, threads)
    worst = 0.0
    for x in batches:
        x = np.ascontiguousarray(x, dtype=np.float32)
        model_x = x if normalize is None else np.ascontiguousarray(normalize(x), dtype=np.float32)
        expected = softmax(torch_logits(cpu_model, model_x).astype(np.float64))
        got = softmax(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float64))
        if got.shape != expected.shape:
            raise ExportParityError(str(path), len(x), float("inf"), tolerance)
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= tolerance:  # also catches NaN
            raise ExportParityError(str(path), len(x), diff, tolerance)
        worst = max(worst, diff)
    return worst
