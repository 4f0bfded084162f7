"""The ceiling: the same ensemble in-process with ONNX Runtime, no gRPC, no batcher, no client.

For each batch size, three ways of computing a batch, each timed as the median of repeated runs
after a warm-up run:

- `members`: the M member sessions, one run each (logits only, no scores): raw ONNX Runtime;
- `members+scores`: the same plus the server's numpy scores (server/scores.py);
- `fused`: the version's ensemble.onnx (every member and every score in one run).

in three set-ups: one caller with 1 intra-op thread, one caller with every core's thread, and
one single-threaded caller per core running at once, each with sessions of its own (what the
server's instances do). The ceiling at a batch size is the most examples/s of any of these: what
this machine can do with the model and nothing else, the limit the server should approach. Its
batch-1 latency is the fastest single call.

    python -m benchmarks.ceiling --version-dir runs/benchmarks/repo/resnet20/1 --max-batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from snapserve.proto.scores import ensemble_scores, softmax

__all__ = ["Ceiling", "Timing", "default_batch_sizes", "format_table", "measure_ceiling", "setups"]

WAYS = ("members", "members+scores", "fused")


@dataclass(frozen=True)
class Timing:
    way: str
    threads: int  # intra-op threads per session
    callers: int  # callers computing at once, each on sessions of its own
    batch_size: int
    seconds: float  # per batch, per caller: the median of one caller, the mean of several

    @property
    def examples_per_s(self) -> float:
        return self.callers * self.batch_size / self.seconds

    @property
    def setup(self) -> str:
        return f"{self.way}, {self.callers}x{self.threads} thr"


@dataclass(frozen=True)
class Ceiling:
    model: str
    timings: tuple[Timing, ...]
    # The fastest batch-1 way again, each call after a 1 ms sleep, as a served request comes
    # after the work of receiving it: caches and the core have cooled down in between.
    batch1_after_gap_s: float | None = None

    def best(self, batch_size: int, single_caller: bool = False) -> Timing:
        """The set-up with the most examples/s at a measured batch size (`single_caller`: of
        those computing one batch at a time)."""
        return max((t for t in self.timings if t.batch_size == batch_size
                    and (t.callers == 1 or not single_caller)), key=lambda t: t.examples_per_s)

    def latency(self, batch_size: int = 1) -> Timing:
        """The fastest single call at a measured batch size (one caller)."""
        return min((t for t in self.timings if t.batch_size == batch_size and t.callers == 1),
                   key=lambda t: t.seconds)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({t.batch_size for t in self.timings})

    def seconds_per_example(self, batch_size: int, single_caller: bool = False) -> float:
        """The machine's time per example at a batch size, at the ceiling's rate: measured, or
        interpolated linearly between the nearest measured sizes."""
        sizes = self.batch_sizes
        per_example = [1 / self.best(b, single_caller).examples_per_s for b in sizes]
        return float(np.interp(batch_size, sizes, per_example))

    def examples_per_s_for_mix(self, batches: dict[int, int], single_caller: bool = False) -> float:
        """Examples/s the ceiling reaches on the same mix of batch sizes (size -> count)."""
        examples = sum(size * count for size, count in batches.items())
        seconds = sum(self.seconds_per_example(size, single_caller) * size * count
                      for size, count in batches.items())
        return examples / seconds

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "timings": [asdict(t) for t in self.timings],
                "batch1_after_gap_s": self.batch1_after_gap_s}


def default_batch_sizes(max_batch: int) -> list[int]:
    """Every size to 8, then a few between: enough to interpolate the rest."""
    sizes = set(range(1, min(max_batch, 8) + 1))
    sizes |= {b for b in (12, 16, 24, 32, 48, 64, 96, 128) if b <= max_batch}
    return sorted(sizes | {max_batch})


def _session(path: Path, threads: int) -> ort.InferenceSession:
    # The server's settings (server/runtime.py session_options), so only gRPC, the batcher and
    # the client separate the two.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median(fn: Callable[[], Any], budget_s: float, min_runs: int = 5, max_runs: int = 200) -> float:
    fn()  # warm-up: the first run of a shape plans and allocates
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _ways(version_dir: Path, manifest: dict[str, Any], threads: int,
          ) -> dict[str, Callable[[np.ndarray], Any]]:
    spec, output = manifest["input"], manifest["output"]["name"]
    temperature = float(manifest.get("temperature", 1.0))
    members = [_session(version_dir / m["file"], threads) for m in manifest["members"]]

    def member_logits(x: np.ndarray) -> list[np.ndarray]:
        return [s.run([output], {spec["name"]: x})[0] for s in members]

    def with_scores(x: np.ndarray) -> Any:
        return ensemble_scores(softmax(np.stack(member_logits(x), axis=1)), temperature)

    ways: dict[str, Callable[[np.ndarray], Any]] = {"members": member_logits,
                                                    "members+scores": with_scores}
    fused = manifest.get("ensemble")
    if fused:
        session = _session(version_dir / fused["file"], threads)
        t = np.array(temperature, dtype=np.float32)
        feed_name = fused.get("temperature_input", "temperature")
        ways["fused"] = lambda x: session.run(None, {spec["name"]: x, feed_name: t})
    return ways


def _after_gap(fn: Callable[[], Any], budget_s: float, gap_s: float = 0.001) -> float:
    """Median seconds of fn when each call follows `gap_s` of sleep."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s + 50 * gap_s
    while len(times) < 20 or (time.perf_counter() < deadline and len(times) < 500):
        time.sleep(gap_s)
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _concurrent(fns: Sequence[Callable[[], Any]], budget_s: float) -> float:
    """Mean seconds per call with every fn called in a loop by a thread of its own at once
    (ONNX Runtime releases the GIL, as in the server's inference threads)."""
    for fn in fns:
        fn()  # warm-up
    stop = time.perf_counter() + max(budget_s, 0.05)
    counts = [0] * len(fns)

    def loop(index: int) -> None:
        while time.perf_counter() < stop or counts[index] < 3:
            fns[index]()
            counts[index] += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(fns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - began) * len(fns) / sum(counts)


def setups(cores: int) -> list[tuple[int, int]]:
    """(intra-op threads, callers): one caller with 1 and with every core, one caller per core."""
    return sorted({(1, 1), (cores, 1), (1, cores)})


def measure_ceiling(version_dir: Path, batch_sizes: Sequence[int], cores: int | None = None,
                    budget_s: float = 0.3, progress: Callable[[Timing], None] | None = None,
                    ) -> Ceiling:
    """Time every way at every batch size in every set-up (`setups`)."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    spec = manifest["input"]
    rng = np.random.default_rng(0)
    timings = []
    for threads, callers in setups(cores or os.cpu_count() or 1):
        instances = [_ways(version_dir, manifest, threads) for _ in range(callers)]
        for size in batch_sizes:
            x = rng.normal(0, 1, (size, *spec["shape"][1:])).astype(spec["dtype"])
            for way in instances[0]:
                fns = [functools.partial(ways[way], x) for ways in instances]
                seconds = (_median(fns[0], budget_s) if callers == 1
                           else _concurrent(fns, budget_s))
                timing = Timing(way, threads, callers, size, seconds)
                timings.append(timing)
                if progress is not None:
                    progress(timing)
    ceiling = Ceiling(manifest["name"], tuple(timings))
    if 1 not in batch_sizes:
        return ceiling
    fastest = ceiling.latency(1)
    fn = _ways(version_dir, manifest, fastest.threads)[fastest.way]
    x = rng.normal(0, 1, (1, *spec["shape"][1:])).astype(spec["dtype"])
    return dataclasses.replace(ceiling, batch1_after_gap_s=_after_gap(lambda: fn(x), budget_s))


def format_table(ceiling: Ceiling) -> str:
    """Examples/s per batch size: each way in its best set-up, and the ceiling."""
    ways = sorted({t.way for t in ceiling.timings}, key=WAYS.index)
    lines = [f"{'batch':>5} " + " ".join(f"{w + ' ex/s':>20}" for w in ways)
             + f" {'ceiling ex/s':>13} {'best set-up':<26} {'1-call ms':>9}"]
    for size in ceiling.batch_sizes:
        cells = []
        for way in ways:
            best = max((t for t in ceiling.timings if t.way == way and t.batch_size == size),
                       key=lambda t: t.examples_per_s)
            cells.append(f"{best.examples_per_s:>20.1f}")
        best = ceiling.best(size)
        lines.append(f"{size:>5} " + " ".join(cells) + f" {best.examples_per_s:>13.1f} "
                     f"{best.setup:<26} {1e3 * ceiling.latency(size).seconds:>9.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version-dir", type=Path, required=True, help="<repository>/<model>/<version>")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--cores", type=int, default=None, help="cores to use (default: all)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of runs per point")
    parser.add_argument("--json", type=Path, default=None, help="also write the timings here")
    args = parser.parse_args()
    ceiling = measure_ceiling(args.version_dir, default_batch_sizes(args.max_batch), args.cores,
                              args.budget)
    print(format_table(ceiling))
    if ceiling.batch1_after_gap_s is not None:
        print(f"batch 1 after a 1 ms idle gap: {1e3 * ceiling.batch1_after_gap_s:.3f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps(ceiling.to_json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
