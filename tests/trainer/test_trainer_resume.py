"""A run SIGKILLed mid-cycle and resumed with --resume gives the same members as an unbroken run
(same seed, CPU, one thread: bitwise), and checkpoints are only ever whole files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from snapserve.trainer.checkpoint import load_checkpoint, save_checkpoint
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.datasets import Dataset
from snapserve.trainer.errors import CheckpointError
from snapserve.trainer.train import train_ensemble
from tests.support.training import KILLER, train_cli

# 4 epochs of 17 steps, two snapshot cycles of 2 epochs: members after steps 34 and 68.
ARGS = ["--dataset", "digits", "--arch", "mlp", "--method", "snapshot", "--epochs", "4", "--members", "2",
        "--seed", "5", "--no-plots", "--name", "digits"]
KILL_AT_STEP = 45  # inside epoch 3, in the middle of the second cycle



def member_logits(version: Path, digits: Dataset) -> list[np.ndarray]:
    manifest = json.loads((version / "manifest.json").read_text())
    x = digits.normalize(digits.test.x)
    return [ort.InferenceSession(str(version / m["file"]), providers=["CPUExecutionProvider"])
            .run(None, {"input": x})[0] for m in manifest["members"]]


def test_a_killed_run_resumes_to_the_same_members(tmp_path: Path, digits: Dataset) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILLER.format(kill_at=KILL_AT_STEP), "train", "--threads", "1",
         "--out", str(tmp_path / "b"), *ARGS],
        capture_output=True, text=True, timeout=180, check=False)
    assert killed.returncode == -9, killed.stderr
    (run_dir,) = (tmp_path / "b" / ".runs").iterdir()
    state = load_checkpoint(run_dir)
    assert (state["epoch"], state["step"]) == (2, 34)  # the last whole epoch before the kill
    assert [m["step"] for m in state["collector"]["members"]] == [34]
    assert not (tmp_path / "b" / "digits").exists() or not any((tmp_path / "b" / "digits").glob("[0-9]*"))

    resumed = train_cli(tmp_path / "b", *ARGS, "--resume")
    unbroken = train_cli(tmp_path / "a", *ARGS)
    assert resumed["training"]["resumed_from_step"] == 34 and unbroken["training"]["resumed_from_step"] == 0
    assert [m["step"] for m in resumed["members"]] == [m["step"] for m in unbroken["members"]] == [34, 68]
    for a, b in zip(member_logits(tmp_path / "a" / "digits" / "1", digits),
                    member_logits(tmp_path / "b" / "digits" / "1", digits)):
        np.testing.assert_array_equal(a, b)
    final_a = load_checkpoint(next((tmp_path / "a" / ".runs").iterdir()))
    final_b = load_checkpoint(run_dir)
    for ma, mb in zip(final_a["collector"]["members"], final_b["collector"]["members"]):
        assert all(torch.equal(ma["state_dict"][k], mb["state_dict"][k]) for k in ma["state_dict"])
    assert final_a["history"]["loss"] == final_b["history"]["loss"]  # the report sees every epoch


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path, digits: Dataset) -> None:
    ckpt = tmp_path / "ckpt"
    config = TrainConfig(out=str(tmp_path), arch="mlp", epochs=2, members=2, checkpoint_dir=str(ckpt),
                         resume=True, threads=1)
    other = TrainConfig(out=str(tmp_path), arch="mlp", epochs=3, members=2, threads=1)
    save_checkpoint(ckpt, {"fingerprint": other.fingerprint(), "config": other.summary(), "step": 1})
    with pytest.raises(CheckpointError, match=r"other settings \(differing: \['epochs'\]\)"):
        train_ensemble(config, digits, torch.device("cpu"))
    (ckpt / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        load_checkpoint(ckpt)
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]  # no temporary files left


def test_fge_from_an_existing_checkpoint(tmp_path: Path, digits: Dataset) -> None:
    """Pre-train with `single`, then FGE from its checkpoint: its epochs count in the budget."""
    base = TrainConfig(out=str(tmp_path), method="single", arch="mlp", epochs=2, threads=1)
    train_ensemble(base, digits, torch.device("cpu"))
    fge = TrainConfig(out=str(tmp_path), method="fge", arch="mlp", epochs=4, threads=1,
                      from_checkpoint=str(base.run_dir()))
    ensemble = train_ensemble(fge, digits, torch.device("cpu"))
    spe = ensemble.steps_per_epoch
    assert ensemble.resumed_from_step == 2 * spe and [m.step for m in ensemble.members] == [3 * spe]
    assert len(ensemble.history.loss) == 2  # only the FGE epochs ran here
    with pytest.raises(CheckpointError, match="do not fit this model"):
        train_ensemble(TrainConfig(out=str(tmp_path), method="fge", arch="cnn", epochs=4, threads=1,
                                   from_checkpoint=str(base.run_dir())), digits, torch.device("cpu"))


def test_fge_from_a_checkpoint_keeps_its_momentum_buffers(tmp_path: Path, digits: Dataset) -> None:
    """The reference's FGE starts from checkpoint-160.pt's model AND optimizer state: the same
    checkpoint gives the same members, and the same one with its momentum buffers zeroed gives
    others, so the buffers are read and carried on, not rebuilt."""
    base = TrainConfig(out=str(tmp_path), method="single", arch="mlp", epochs=2, threads=1)
    train_ensemble(base, digits, torch.device("cpu"))
    state = load_checkpoint(base.run_dir())
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert buffers and all(b.abs().sum() > 0 for b in buffers)
    for s in state["optimizer"]["state"].values():
        s["momentum_buffer"].zero_()
    save_checkpoint(tmp_path / "zeroed", state)

    def fge_members(source: Path) -> list:
        config = TrainConfig(out=str(tmp_path / "fge"), method="fge", arch="mlp", epochs=4, threads=1,
                             from_checkpoint=str(source))
        return train_ensemble(config, digits, torch.device("cpu")).members

    kept, again, zeroed = fge_members(base.run_dir()), fge_members(base.run_dir()), fge_members(tmp_path / "zeroed")
    weights = "0.1.weight" if "0.1.weight" in kept[0].state_dict else next(iter(kept[0].state_dict))
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for a, b in zip(kept, again) for k in a.state_dict)
    assert not torch.equal(kept[0].state_dict[weights], zeroed[0].state_dict[weights])
