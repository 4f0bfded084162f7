"""Progress: a live `\\r` line on a terminal, plain log lines otherwise (no tqdm).

    epoch 3/40 [#####.......]  41%  step 97/1360  loss 0.4123  lr 0.08214  members 0  elapsed 12s  eta 2m56s

On a TTY the line is redrawn at most `refresh_s` apart (reading the loss is a device sync, so
not every step); every finished epoch is logged as a normal line either way, so logs written to
a file or collected from a non-interactive job read the same.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TextIO

import torch

__all__ = ["Progress"]

logger = logging.getLogger("snapserve.trainer.loop")  # under the loop's name: these are its lines


class Progress:
    def __init__(self, total_steps: int, steps_per_epoch: int, *, stream: TextIO | None = None,
                 live: bool | None = None, enabled: bool = True, refresh_s: float = 0.25) -> None:
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.epochs = math.ceil(total_steps / steps_per_epoch)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.live = enabled and (isatty if live is None else live) and logger.isEnabledFor(logging.INFO)
        self.refresh_s = refresh_s
        self._last = 0.0
        self._drawn = False
        # Elapsed time and the ETA count from the first step seen: a resumed run's rate is its own.
        self._began = time.monotonic()
        self._first_step: int | None = None

    def timing(self, step: int) -> str:
        """'elapsed 1m05s  eta 2m10s' at `step` (the ETA from the rate since the first step seen)."""
        if self._first_step is None:
            self._first_step = step - 1
        elapsed = time.monotonic() - self._began
        done = step - self._first_step
        left = (self.total_steps - step) * elapsed / done if done > 0 else float("nan")
        return f"elapsed {_duration(elapsed)}  eta {_duration(left)}"

    def step(self, step: int, loss: torch.Tensor, lr: float, members: int) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < self.refresh_s and step != self.total_steps:
            return
        self._last = now
        timing = self.timing(step)
        epoch = (step - 1) // self.steps_per_epoch + 1
        done = step - (epoch - 1) * self.steps_per_epoch
        width = 20
        filled = round(width * done / self.steps_per_epoch)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r\033[Kepoch {epoch}/{self.epochs} [{bar}] {100 * done / self.steps_per_epoch:3.0f}%  "
                          f"step {step}/{self.total_steps}  loss {float(loss):.4f}  lr {lr:.5f}  members {members}  {timing}")
        self.stream.flush()
        self._drawn = True

    def epoch(self, epoch: int, step: int, loss: float, accuracy: float, lr: float, members: int,
              extra: str = "") -> None:
        """One line per finished epoch (the live line, if any, is cleared first)."""
        if not self.enabled:
            return
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
        logger.info("epoch %d/%d  step %d  loss %.4f  train_acc %.4f  lr %.5f  members %d  %s%s",
                    epoch, self.epochs, step, loss, accuracy, lr, members, self.timing(step), extra)


def _duration(seconds: float) -> str:
    """'45s', '3m05s', '2h01m'; '?' before there is a rate."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
