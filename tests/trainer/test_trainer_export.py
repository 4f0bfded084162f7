"""Each exported member reproduces PyTorch in ONNX Runtime: real export, real inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from snapserve.trainer.collectors import StepCollector
from snapserve.trainer.datasets import Dataset
from snapserve.trainer.errors import ExportParityError
from snapserve.trainer.export import (INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, check_parity, export_onnx,
                            onnx_logits, onnx_session, torch_logits)
from snapserve.trainer.loop import TensorBatches, train_loop
from snapserve.trainer.models import build_model
from snapserve.trainer.schedules import CyclicCosineSchedule


def trained(arch: str, digits: Dataset) -> nn.Module:
    """Two epochs of training: BatchNorm running statistics are no longer the identity."""
    torch.manual_seed(0)
    model = build_model(arch, digits.input_shape, digits.num_classes)
    batches = TensorBatches(torch.from_numpy(digits.normalize(digits.train.x)),
                            torch.from_numpy(digits.train.y), batch_size=64, seed=0)
    schedule = CyclicCosineSchedule(lr0=0.1, total_steps=2 * len(batches), cycles=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_loop(model, optimizer, batches, schedule, StepCollector([]))
    return model


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_onnx_matches_pytorch_on_real_batches(arch: str, digits: Dataset, tmp_path: Path) -> None:
    model = trained(arch, digits)
    path = tmp_path / "member.onnx"
    export_onnx(model, path, digits.input_shape)
    assert model.training  # export works on a copy; the caller's model is untouched

    graph = onnx.load(path)
    assert {o.domain: o.version for o in graph.opset_import}[""] == ONNX_OPSET
    session = onnx_session(path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 8, 8]  # dynamic batch

    x = digits.normalize(digits.test.x)
    worst = check_parity(model, path, [x, x[:1], x[:7]])
    assert worst < 1e-4
    logits = onnx_logits(path, x[:7])
    assert logits.shape == (7, 10)
    np.testing.assert_allclose(logits, torch_logits(model, x[:7]), atol=1e-4)
    assert (onnx_logits(path, x).argmax(1) == digits.test.y).mean() > 0.8


def test_a_graph_exported_with_the_normalization_takes_raw_inputs(digits: Dataset, tmp_path: Path) -> None:
    """The graph applies (x - mean) / std itself: raw pixels in, the trainer's own logits out."""
    model = trained("cnn", digits)
    path = tmp_path / "member.onnx"
    export_onnx(model, path, digits.input_shape, normalization=digits.normalization())
    raw = digits.test.x
    assert check_parity(model, path, [raw, raw[:1], raw[:7]], normalize=digits.normalize) < 1e-4
    np.testing.assert_allclose(onnx_logits(path, raw[:7]), torch_logits(model, digits.normalize(raw[:7])),
                               atol=1e-4)
    # A graph without the normalisation fails the same raw-input check, loudly.
    export_onnx(model, tmp_path / "bare.onnx", digits.input_shape)
    with pytest.raises(ExportParityError):
        check_parity(model, tmp_path / "bare.onnx", [raw], normalize=digits.normalize)


def test_parity_failure_names_the_numbers(digits: Dataset, tmp_path: Path) -> None:
    model = trained("cnn", digits)
    path = tmp_path / "member.onnx"
    export_onnx(model, path, digits.input_shape)
    with torch.no_grad():  # the weights move after export: the graph no longer matches
        model[-1].bias.add_(torch.linspace(-3, 3, digits.num_classes))
    x = digits.normalize(digits.test.x)
    with pytest.raises(ExportParityError, match=r"differ by .* \(tolerance 0.0001\) on a batch of 360") as info:
        check_parity(model, path, [x, x[:1]])
    assert info.value.max_abs_diff > 1e-2 and info.value.batch_size == 360
