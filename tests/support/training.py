"""Helpers for tests that run the trainer: the CLI in-process, and a run killed mid-training."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from snapserve.trainer.cli import main

__all__ = ["KILLER", "train_cli"]

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


def train_cli(out: Path, *args: str) -> dict:
    """`trainer train ... --out out` in this process; returns the written manifest."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["train", "--threads", "1", "--out", str(out), *args])
    assert code == 0, buffer.getvalue()
    version = re.search(r"wrote (\S+) ", buffer.getvalue()).group(1)
    return json.loads((Path(version) / "manifest.json").read_text())
