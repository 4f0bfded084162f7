"""Shared fixtures for the trainer tests: real data (scikit-learn digits), real torch, no mocks."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from snapserve.trainer.cli import main
from snapserve.trainer.data import Dataset, load_dataset

# The test machine's CPU is shared: small models gain nothing from more threads.
torch.set_num_threads(1)


# A script that runs `trainer` and dies by SIGKILL (no cleanup, no finally blocks) right before
# update {kill_at}: `python -c KILLER.format(kill_at=N) train ...`, or a file for torchrun.
KILLER = """
import os, signal, sys
import snapserve.trainer.loop as loop
real_step, done = loop.train_step, [0]
def step(*args, **kwargs):
    done[0] += 1
    if done[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(*args, **kwargs)
loop.train_step = step
from snapserve.trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")


def train_cli(out: Path, *args: str) -> dict:
    """`trainer train ... --out out` in this process; returns the written manifest."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["train", "--threads", "1", "--out", str(out), *args])
    assert code == 0, buffer.getvalue()
    version = re.search(r"wrote (\S+) ", buffer.getvalue()).group(1)
    return json.loads((Path(version) / "manifest.json").read_text())


@pytest.fixture(scope="session")
def method_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """fge, swa and swag versions of small digits models in one repository (trained once)."""
    root = tmp_path_factory.mktemp("methods")
    common = ["--dataset", "digits", "--arch", "cnn", "--width", "8", "--seed", "0", "--no-plots"]
    return root, {
        # 1 pre-training epoch, then two 2-epoch cycles: members at the ends of epochs 2 and 4
        "fge": train_cli(root, *common, "--method", "fge", "--epochs", "5", "--fge-start", "0.2",
                         "--name", "fge"),
        # averaging the weights at the ends of epochs 2, 3 and 4
        "swa": train_cli(root, *common, "--method", "swa", "--epochs", "4", "--swa-start", "0.5",
                         "--name", "swa"),
        "swag": train_cli(root, *common, "--method", "swag", "--epochs", "4", "--swa-start", "0.5",
                          "--members", "2", "--swag-rank", "3", "--name", "swag"),
    }
