"""fge, swa, swag, swag-diag and single end to end (trained once, in conftest.method_versions), mixed
precision on the CPU, and the clear failures: NaN loss, unwritable output, full disk."""

from __future__ import annotations

import contextlib
import errno
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from snapserve.trainer.cli import main
from snapserve.trainer.collectors import AveragingCollector
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.datasets import Dataset, load_dataset
from snapserve.trainer.methods import MethodContext, build_method
from snapserve.trainer.models import build_model
from snapserve.trainer.errors import CheckpointError, TrainingDiverged
from snapserve.trainer.train import train_ensemble


def onnx_accuracy(version: Path, member: dict, digits: Dataset, manifest: dict) -> float:
    """A member's test accuracy from its exported graph, which takes raw inputs (it applies the
    manifest's normalisation itself: input.kind raw)."""
    assert manifest["input"]["kind"] == "raw"
    x = digits.test.x.astype(np.float32)
    session = ort.InferenceSession(str(version / member["file"]), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == digits.test.y).mean())


def test_fge_takes_members_at_the_mid_cycle_minima(method_versions: tuple[Path, dict], digits: Dataset) -> None:
    root, manifests = method_versions
    m = manifests["fge"]
    spe = m["training"]["steps_per_epoch"]
    assert m["method"] == "fge" and [x["epoch"] for x in m["members"]] == [2, 4]
    assert [x["step"] for x in m["members"]] == [2 * spe, 4 * spe]
    assert all(x["lr"] == pytest.approx(0.01) for x in m["members"])  # alpha2 = lr/10
    schedule = m["training"]["schedule"]
    assert (schedule["type"], schedule["start_step"], schedule["cycle_steps"]) == ("FGESchedule", spe, 2 * spe)
    for member in m["members"]:
        acc = onnx_accuracy(root / "fge" / "1", member, digits, m)
        assert acc == pytest.approx(member["metrics"]["accuracy"], abs=0.01) and acc > 0.7


def test_swa_exports_one_averaged_member(method_versions: tuple[Path, dict], digits: Dataset) -> None:
    root, manifests = method_versions
    m = manifests["swa"]
    spe = m["training"]["steps_per_epoch"]
    (member,) = m["members"]
    assert m["method"] == "swa" and member["averaged_models"] == 3 and member["step"] == 4 * spe
    assert member["lr"] == pytest.approx(0.05)  # swa_lr = lr/2
    assert onnx_accuracy(root / "swa" / "1", member, digits, m) == pytest.approx(m["metrics"]["accuracy"], abs=0.01)
    assert m["metrics"]["accuracy"] > 0.8
    report = json.loads((root / "swa" / "1" / "report" / "metrics.json").read_text())
    assert report["member_steps"] == [2 * spe, 3 * spe, 4 * spe] and len(report["history"]["test_error"]) == 4


def test_swag_exports_distinct_samples(method_versions: tuple[Path, dict], digits: Dataset) -> None:
    root, manifests = method_versions
    m = manifests["swag"]
    assert m["method"] == "swag" and [x["sample"] for x in m["members"]] == [0, 1]
    assert all(x["averaged_models"] == 3 for x in m["members"])
    assert m["members"][0]["sha256"] != m["members"][1]["sha256"]
    assert m["training"]["swag_rank"] == 3 and m["training"]["swag_scale"] == 0.5
    for member in m["members"]:
        assert onnx_accuracy(root / "swag" / "1", member, digits, m) > 0.5


def test_swag_diag_is_a_method_of_its_own(method_versions: tuple[Path, dict], digits: Dataset) -> None:
    root, manifests = method_versions
    m = manifests["swag-diag"]
    assert m["method"] == "swag-diag" and [x["sample"] for x in m["members"]] == [0, 1]
    assert m["training"]["swag_scale"] == 1.0  # SWAG-Diag's scale (Maddox et al.); swag's is 0.5
    assert m["members"][0]["sha256"] != m["members"][1]["sha256"]
    for member in m["members"]:
        assert onnx_accuracy(root / "swag-diag" / "1", member, digits, m) > 0.5
    collector = build_method(TrainConfig(out="x", method="swag-diag", epochs=4), MethodContext(3)).collector
    assert isinstance(collector, AveragingCollector) and collector.swag_rank == 0  # no deviation columns


def test_the_batchnorm_pass_sees_every_normalized_training_input_shuffled(tmp_path: Path) -> None:
    """train.py hands SWA's BatchNorm pass the training inputs: normalized, unaugmented, all of
    them, in a seeded permutation even where the file stores them sorted by class. The classes
    here differ in brightness, so a batch of one class has a small fraction of the variance."""
    rng = np.random.default_rng(0)

    def split(n_per_class: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(10), n_per_class)
        x = (y[:, None, None, None] + rng.normal(0, 1, (len(y), 1, 8, 8))).astype(np.float32)
        order = rng.permutation(len(y)) if shuffle else np.arange(len(y))
        return x[order], y[order]

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = split(64, False), split(10, True), split(10, True)
    path = tmp_path / "sorted.npz"  # 10 batches of 64, each one class in stored order
    np.savez(path, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test)
    data = load_dataset(str(path))
    config = TrainConfig(out=str(tmp_path), method="swa", dataset=str(path), arch="cnn", width=8, epochs=2,
                         swa_start=0.5, threads=1)
    (member,) = train_ensemble(config, data, torch.device("cpu")).members
    model = build_model("cnn", data.input_shape, data.num_classes, width=8)
    model.load_state_dict(member.state_dict)
    with torch.no_grad():  # what the first BatchNorm layer sees: the first convolution's output
        h = model[0](torch.from_numpy(data.normalize(data.train.x))).transpose(0, 1).reshape(8, -1)
    # equal batches: the mean of the batch means is the mean over all the normalized inputs
    torch.testing.assert_close(member.state_dict["1.running_mean"], h.mean(1), rtol=0, atol=1e-4)
    ratio = member.state_dict["1.running_var"] / h.var(1)
    assert ratio.min() > 0.85 and ratio.max() < 1.15, ratio  # in stored order: below 0.5


def test_keep_last_exports_the_last_members_and_reports_all(tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--out", str(tmp_path), "--dataset", "digits", "--arch", "mlp", "--epochs", "3",
                     "--members", "3", "--keep-last", "2", "--threads", "1", "--no-plots"]) == 0
    version = tmp_path / "digits" / "1"
    m = json.loads((version / "manifest.json").read_text())
    assert [x["epoch"] for x in m["members"]] == [2, 3]
    report = json.loads((version / "report" / "metrics.json").read_text())
    assert len(report["test"]["members"]) == 3 and len(report["test"]["ensemble_by_size"]["backward"]) == 3
    # the ensemble is the last 2 (the "backward" curve at m = 2)
    assert report["test"]["ensemble"] == report["test"]["ensemble_by_size"]["backward"][1]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_keeps_the_average_in_float32(amp: str, digits: Dataset, tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path), method="swa", arch="cnn", width=8, epochs=2, swa_start=0.5,
                         amp=amp, threads=1)
    ensemble = train_ensemble(config, digits, torch.device("cpu"))
    collector = ensemble.method.collector
    assert isinstance(collector, AveragingCollector) and collector.mean.dtype == torch.float32
    assert all(v.dtype == torch.float32 for k, v in ensemble.members[0].state_dict.items() if "num_batches" not in k)
    assert all(np.isfinite(ensemble.history.loss)) and ensemble.history.test_error[-1] < 0.5
    checkpoint = torch.load(config.run_dir() / "checkpoint.pt", weights_only=True)
    assert (checkpoint["scaler"] is not None) == (amp == "fp16")


def test_a_nan_loss_stops_the_run_naming_epoch_and_step(digits: Dataset, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    config = TrainConfig(out=str(tmp_path), method="single", arch="mlp", epochs=2, lr=1e12, nesterov=False, threads=1)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 1, step \d+") as info:
        train_ensemble(config, digits, torch.device("cpu"))
    assert info.value.epoch == 1
    assert not (config.run_dir() / "checkpoint.pt").exists()  # the bad epoch is never checkpointed
    assert main(["train", "--out", str(tmp_path), "--method", "single", "--arch", "mlp", "--epochs", "1",
                 "--lr", "1e12", "--no-nesterov", "--threads", "1"]) == 1
    assert "at epoch 1, step" in capsys.readouterr().err


def test_unwritable_output_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", "--out", str(blocker / "repo"), "--epochs", "1", "--members", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot write to the output folder (--out)" in err and "Not a directory" in err
    assert main(["train", "--out", str(tmp_path / "ok"), "--checkpoint-dir", str(blocker / "ckpt"),
                 "--epochs", "1", "--members", "1"]) == 1
    assert "cannot write to the checkpoint folder" in capsys.readouterr().err


def test_a_full_disk_is_a_clear_checkpoint_error(digits: Dataset, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("snapserve.trainer.checkpoint.torch.save", full)
    config = TrainConfig(out=str(tmp_path), method="single", arch="mlp", epochs=1, threads=1)
    with pytest.raises(CheckpointError, match="cannot write the checkpoint .*No space left on device"):
        train_ensemble(config, digits, torch.device("cpu"))
    assert not list(config.run_dir().iterdir())  # no temporary file left behind


def test_progress_is_a_live_line_on_a_terminal_and_log_lines_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    from snapserve.trainer.progress import Progress

    caplog.set_level("INFO", logger="snapserve.trainer")
    terminal = io.StringIO()
    live = Progress(total_steps=4, steps_per_epoch=2, stream=terminal, live=True, refresh_s=0.0)
    for step in (1, 2):
        live.step(step, torch.tensor(0.5), 0.1, 0)
    live.epoch(1, 2, 0.5, 0.9, 0.1, 1)
    text = terminal.getvalue()
    assert "\r\x1b[Kepoch 1/2 [##########..........]  50%  step 1/4  loss 0.5000  lr 0.10000  members 0" in text
    assert text.endswith("\r\x1b[K")  # the live line is cleared before the epoch's log line
    plain = io.StringIO()
    quiet = Progress(total_steps=4, steps_per_epoch=2, stream=plain)  # a StringIO is not a TTY
    quiet.step(1, torch.tensor(0.5), 0.1, 0)
    quiet.epoch(1, 2, 0.5, 0.9, 0.1, 1)
    assert plain.getvalue() == ""
    assert sum("epoch 1/2  step 2  loss 0.5000  train_acc 0.9000" in r.message for r in caplog.records) == 2
