"""`trainer train` end to end into a temporary model repository, checked against the contract
in docs/model-repository.md with ONNX Runtime and hashlib, not with the trainer's own code."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from snapserve.trainer.cli import main
from snapserve.trainer.datasets import Dataset
from snapserve.trainer.errors import RepositoryError
from snapserve.trainer.repository import VersionWriter, next_version, verify_version

TRAIN_ARGS = ["train", "--dataset", "digits", "--arch", "cnn", "--epochs", "2", "--members", "2",
              "--lr", "0.1", "--seed", "0", "--threads", "1", "--name", "digits"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two runs of the same command into one repository; returns (repository, first run's stdout)."""
    root = tmp_path_factory.mktemp("repo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*TRAIN_ARGS, "--out", str(root)]) == 0
    first = out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*TRAIN_ARGS, "--out", str(root), "--no-plots", "--no-calibrate"]) == 0
    return root, first


def test_each_run_is_a_new_complete_version(repository: tuple[Path, str]) -> None:
    root, stdout = repository
    assert sorted(p.name for p in (root / "digits").iterdir()) == ["1", "2"]  # no .tmp-* left
    for version in (1, 2):
        folder = root / "digits" / str(version)
        assert json.loads((folder / "manifest.json").read_text())["version"] == version
        assert sorted(p.name for p in (folder / "members").iterdir()) == ["member-000.onnx", "member-001.onnx"]
        report = json.loads((folder / "report" / "metrics.json").read_text())
        assert len(report["test"]["members"]) == 2 and "ensemble" in report["val"]
    assert f"wrote {root / 'digits' / '1'}" in stdout
    assert re.search(r"ensemble test accuracy 0\.\d{4}", stdout)
    assert re.search(r"calibrated \(T=\d\.\d{3}, as served\): nll 0\.\d{4}", stdout)
    report = root / "digits" / "1" / "report"
    assert {p.name for p in report.iterdir()} == {"metrics.json", "report.md", "lr.png", "training.png",
                                                  "members.png", "reliability.png", "rejection.png"}
    assert all((report / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in ("lr.png", "rejection.png"))
    markdown = (report / "report.md").read_text()
    assert "![lr](lr.png)" in markdown and "## The scores at work (test split)" in markdown
    assert re.search(r"\| mutual_information \| 0\.\d{3} \| 0\.\d{3} \|", markdown)  # errors and OOD AUROC
    assert re.search(r"\| 5% \| \S+ \| \d+\.\d% \| 0\.\d{4} \|", markdown)  # the rejection row
    assert {p.name for p in (root / "digits" / "2" / "report").iterdir()} == {"metrics.json"}  # --no-plots


def test_manifest_follows_the_contract(repository: tuple[Path, str]) -> None:
    folder = repository[0] / "digits" / "1"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["name"] == "digits" and m["method"] == "snapshot"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created_at"])
    assert m["input"]["name"] == "input" and m["input"]["dtype"] == "float32"
    assert m["input"]["shape"] == [-1, 1, 8, 8]
    norm = m["input"]["normalization"]
    assert norm["axis"] == 1 and len(norm["mean"]) == len(norm["std"]) == 1
    assert 4 < norm["mean"][0] < 6 and 5 < norm["std"][0] < 7
    assert m["output"] == {"name": "logits", "kind": "logits", "shape": [-1, 10]}
    assert m["classes"] == [str(d) for d in range(10)] and 0.05 < m["temperature"] < 20
    assert m["onnx"]["opset"] in (17, 18)
    assert {"accuracy", "nll", "brier", "ece", "nll_uncalibrated", "ece_uncalibrated",
            "members_mean_accuracy"} <= set(m["metrics"])
    assert all(isinstance(v, float) for v in m["metrics"].values())
    training = m["training"]
    assert (training["dataset"], training["arch"], training["epochs"], training["lr"], training["seed"]) == \
        ("digits", "cnn", 2, 0.1, 0)
    steps = training["steps_per_epoch"]
    for i, member in enumerate(m["members"]):
        assert member["file"] == f"members/member-{i:03d}.onnx"
        assert re.fullmatch(r"[0-9a-f]{64}", member["sha256"])
        assert member["sha256"] == hashlib.sha256((folder / member["file"]).read_bytes()).hexdigest()
        assert member["step"] == (i + 1) * steps and member["epoch"] == i + 1  # one cycle per epoch
        assert isinstance(member["lr"], float) and 0 <= member["lr"] < 1e-3  # end of a cycle
        assert set(member["metrics"]) == {"accuracy", "nll", "brier", "ece"}


def test_served_graphs_reproduce_the_manifest_metrics(repository: tuple[Path, str], digits: Dataset) -> None:
    """What a client does: send raw inputs (the graphs apply the manifest's normalisation
    themselves), run every member, average."""
    folder = repository[0] / "digits" / "1"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["input"]["kind"] == "raw" and m["input"]["normalization"] is not None
    x = digits.test.x.astype(np.float32)
    member_probs = []
    for member in m["members"]:
        session = ort.InferenceSession(str(folder / member["file"]), providers=["CPUExecutionProvider"])
        logits = session.run([m["output"]["name"]], {m["input"]["name"]: x})[0]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        member_probs.append(probs)
        assert (probs.argmax(1) == digits.test.y).mean() == pytest.approx(member["metrics"]["accuracy"], abs=0.01)
    ensemble = np.mean(member_probs, axis=0)
    assert (ensemble.argmax(1) == digits.test.y).mean() == pytest.approx(m["metrics"]["accuracy"], abs=0.01)
    assert m["metrics"]["accuracy"] > 0.8
    rows = np.arange(len(digits.test.y))
    assert -np.log(ensemble[rows, digits.test.y]).mean() == pytest.approx(m["metrics"]["nll_uncalibrated"], rel=1e-3)
    # What the server serves: softmax(log p̄ / T), with T from the manifest.
    z = np.log(ensemble) / m["temperature"]
    served = np.exp(z - z.max(1, keepdims=True))
    served /= served.sum(1, keepdims=True)
    assert -np.log(served[rows, digits.test.y]).mean() == pytest.approx(m["metrics"]["nll"], rel=1e-3)
    assert json.loads((folder.parent / "2" / "manifest.json").read_text())["temperature"] == 1.0  # --no-calibrate


def test_npz_dataset_single_method_and_mlp(tmp_path: Path, digits: Dataset) -> None:
    data = tmp_path / "my digits.npz"
    np.savez(data, x_train=digits.train.x, y_train=digits.train.y, x_test=digits.test.x, y_test=digits.test.y)
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--dataset", str(data), "--arch", "mlp", "--method", "single",
                     "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "repo")])
    assert code == 0
    m = json.loads((tmp_path / "repo" / "my-digits" / "1" / "manifest.json").read_text())
    assert m["method"] == "single" and len(m["members"]) == 1 and m["training"]["arch"] == "mlp"
    assert m["members"][0]["lr"] == pytest.approx(0.001)  # the step schedule's last value


def test_bad_settings_fail_cleanly_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 1 epoch = 17 steps cannot hold 20 cycles.
    assert main(["train", "--epochs", "1", "--members", "20", "--out", str(tmp_path)]) == 2
    assert "members=20" in capsys.readouterr().err
    assert main(["train", "--dataset", str(tmp_path / "none.npz"), "--out", str(tmp_path)]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--name", "../escape", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.rglob("*.onnx"))


def test_a_failed_write_leaves_no_trace_and_junk_is_ignored(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    for name in ("3", ".tmp-9-abc", "notes", "0"):
        (model_dir / name).mkdir(parents=True)
    assert next_version(model_dir) == 4
    with pytest.raises(RuntimeError), VersionWriter(tmp_path, "m") as writer:
        writer.member_path(0).write_bytes(b"half a model")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in model_dir.iterdir()) == [".tmp-9-abc", "0", "3", "notes"]
    with pytest.raises(RepositoryError, match="was not written"), VersionWriter(tmp_path, "m") as writer:
        writer.commit({"members": [{"file": "members/member-000.onnx"}]}, {})
    with pytest.raises(RepositoryError, match="outside the version folder"), VersionWriter(tmp_path, "m") as writer:
        writer.commit({"members": [{"file": "../3"}]}, {})
    assert sorted(p.name for p in model_dir.iterdir()) == [".tmp-9-abc", "0", "3", "notes"]


def test_python_dash_m_trainer() -> None:
    done = subprocess.run([sys.executable, "-m", "snapserve.trainer", "train", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "--members" in done.stdout and "--out" in done.stdout


def test_verify_version_catches_a_changed_member(repository: tuple[Path, str], tmp_path: Path) -> None:
    copy = tmp_path / "1"
    shutil.copytree(repository[0] / "digits" / "1", copy)
    assert verify_version(copy)["version"] == 1
    with open(copy / "members" / "member-001.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match="member-001.onnx does not match its sha256"):
        verify_version(copy)
