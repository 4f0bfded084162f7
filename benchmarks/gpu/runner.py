"""The run's state and plumbing: the results, written after every step; the phases and their
times; the commands the steps run, each with its log. The steps themselves (device, training,
in_process, serving) are functions of a `Run`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks.gpu.config import NoCuda, Sizes, StepFailed
from benchmarks.gpu.report import headline, render_markdown, summary_lines


class Run:
    """Holds the results, writes them after every step, and runs the steps' commands."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args, self.sizes, self.device = args, sizes, args.device
        self.began = time.perf_counter()
        self.out = Path(args.out).resolve()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="snapserve-gpu-")).resolve()
        self.repo, self.logs = self.work / "repo", self.work / "logs"
        for folder in (self.out, self.repo, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.results: dict[str, Any] = {
            "schema": 1, "status": "running", "error": None,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "mode": "quick" if args.quick else "full", "device_asked": args.device,
            "sizes": asdict(sizes), "phases": {}, "notes": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        self.say(f"{name} ...")
        try:
            yield
        finally:
            self.results["phases"][name] = round(time.perf_counter() - began, 2)
            self.save()

    def python(self, name: str, args: Sequence[str], timeout_s: float) -> str:
        """Runs `python <args>` in the work folder; its output goes to logs/<name>.log."""
        log = self.logs / f"{name}.log"
        command = [sys.executable, *args]
        with open(log, "wb") as out:
            try:
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=self.work,
                                      env=self.env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"{name}: still running after {timeout_s:.0f} s; stopped:\n"
                                 f"{tail(log.read_text(errors='replace'))}") from None
        text = log.read_text(errors="replace")
        if done.returncode != 0:
            raise StepFailed(f"{name}: exit status {done.returncode}:\n{tail(text)}")
        return text

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        for name, text in (("results.json", json.dumps(self.results, indent=2, default=str)),
                           ("results.md", render_markdown(self.results))):
            temporary = self.out / f".{name}.tmp"
            temporary.write_text(text + "\n")
            temporary.replace(self.out / name)

    def pack_logs(self) -> None:
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as archive:
            for log in sorted(self.logs.glob("*.log")):
                archive.add(log, arcname=f"logs/{log.name}")

    def headline(self) -> None:
        self.results["headline"] = headline(self.results, self.sizes.levels[-1])
        for line in summary_lines(self.results):
            print(line, flush=True)


@contextmanager
def recorded(errors: dict[str, str], key: str) -> Iterator[None]:
    """An in-process check that fails is a finding to record, not the end of the run; a
    session on the CPU under --device cuda still is (NoCuda passes through)."""
    try:
        yield
    except NoCuda:
        raise
    except Exception as exc:  # ONNX Runtime raises its own unnamed exception types
        errors[key] = f"{type(exc).__name__}: {str(exc)[:600]}"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
