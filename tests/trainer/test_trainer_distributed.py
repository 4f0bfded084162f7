"""`torchrun --nproc_per_node 2 -m trainer train ...` on the CPU (gloo): a run killed mid-way and
resumed writes a complete version, in line with a one-process run of the same settings."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapserve.trainer.checkpoint import load_checkpoint
from tests.support.training import KILLER, train_cli

# swa: BatchNorm statistics of the average are all-reduced over the processes.
ARGS = ["--dataset", "digits", "--arch", "cnn", "--width", "8", "--method", "swa", "--epochs", "4",
        "--swa-start", "0.5", "--seed", "1", "--no-plots", "--name", "digits", "--threads", "1"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    runner = Path(sys.executable).with_name("torchrun")
    command = [str(runner)] if runner.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free rendezvous port, so parallel test runs do not collide on 29500
    return subprocess.run([*command, "--standalone", "--nproc_per_node", "2", *args], capture_output=True,
                          text=True, timeout=240, env=env, cwd=Path(__file__).resolve().parents[2], check=False)


@pytest.mark.slow
def test_two_processes_with_gloo_match_one(tmp_path: Path) -> None:
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(kill_at=40))  # inside epoch 3 of 4 (17 steps per epoch)
    killed = torchrun(str(killer), "train", "--out", str(tmp_path / "ddp"), *ARGS)
    assert killed.returncode != 0
    (run_dir,) = (tmp_path / "ddp" / ".runs").iterdir()
    assert load_checkpoint(run_dir)["epoch"] == 2

    done = torchrun("-m", "snapserve.trainer", "train", "--out", str(tmp_path / "ddp"), *ARGS, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # only process 0 writes and reports
    version = tmp_path / "ddp" / "digits" / "1"
    assert sorted(p.name for p in (tmp_path / "ddp" / "digits").iterdir()) == ["1"]
    ddp = json.loads((version / "manifest.json").read_text())
    assert ddp["training"]["processes"] == 2 and ddp["training"]["resumed_from_step"] == 34
    for member in ddp["members"]:
        assert hashlib.sha256((version / member["file"]).read_bytes()).hexdigest() == member["sha256"]
    assert (version / "report" / "metrics.json").is_file() and ddp["members"][0]["averaged_models"] == 3

    single = train_cli(tmp_path / "one", *ARGS)
    # The same global batches and steps; only BatchNorm's batch statistics are per process.
    assert ddp["training"]["total_steps"] == single["training"]["total_steps"]
    assert abs(ddp["metrics"]["accuracy"] - single["metrics"]["accuracy"]) < 0.05
    assert ddp["metrics"]["accuracy"] > 0.85
