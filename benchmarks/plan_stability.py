"""The spread lead's predicted gain, measured at many loads beside other work (issue 23, item 4).

    python -m benchmarks.plan_stability [--loads 40] [--backgrounds quiet,spin2,spin3,matmul2]
        [--no-write]

The model is the plan-stability test's compute-bound one (tests/server/engine/test_planning.py):
two members of 40 chained [128, 128] matrix products, so a lone example splits into two equal
groups and its true spread gain is 2x, past the lead's 1.5x margin, while intra-op threads
barely speed it up. For each background (none; N processes spinning in Python; N processes of
one-thread matrix products, which share the cores' caches and hyperthread siblings), the
version is loaded `--loads` times; each load's timed rounds are kept: (the example on one
thread, each group of members) by CPU time, and (the example on one thread, on every core's
intra-op threads) by wall time. Two estimates of each gain are taken from them
(`planning.gain_estimates`: the fastest run of each side, and the median of each round's own
ratio) and the plan's: the larger for the spread (`planning.spread_gain`), the fastest of each
for intra-op (`planning.intra_op_gain`), which the spread must pass by 1.25x; with the lead each
load chose and the chosen lead's wall-time gain once loaded. Writes the "Plan stability: the
spread's gain" section of benchmarks/RESULTS.md and the raw numbers to
runs/benchmarks/plan_stability.json.

Nothing else should run: the backgrounds are the load; the load average is recorded beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from benchmarks.serve import RESULTS, replace_section

HEADING = "Plan stability: the spread's gain"
RAW = Path("runs/benchmarks/plan_stability.json")
MARGIN = 1.5  # engine/cores.py: 1 + LEAD_MARGIN
OVER_INTRA = 1.25  # engine/cores.py: 1 + PLAN_MARGIN, what the spread must pass intra-op by
_MATMUL = ("import os\nos.environ['OMP_NUM_THREADS'] = '1'\nimport numpy as np\n"
           "a = np.random.rand(512, 512).astype(np.float32)\nwhile True:\n    a @ a\n")


@contextmanager
def background(kind: str) -> Iterator[None]:
    """`quiet`, `spinN` or `matmulN`: N processes of that work for the block's length."""
    count = int(kind.lstrip("abcdefghijklmnopqrstuvwxyz") or 0)
    code = "while True: pass" if kind.startswith("spin") else _MATMUL
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(count)]
    try:
        time.sleep(1.0 if workers else 0.0)
        yield
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def measure(version: Path, loads: int) -> list[dict[str, Any]]:
    """Each load's spread rounds, both estimates and the plan chosen."""
    from snapserve.server.engine import planning
    from snapserve.server.engine.batcher import BatcherConfig
    from snapserve.server.engine.runtime import RuntimeConfig
    from snapserve.server.models.loading import load_version

    kept: list[np.ndarray] = []
    timed = planning.times_in_turn

    def keeping(fns: Sequence[Any], *args: Any, **kwargs: Any) -> np.ndarray:
        times = timed(fns, *args, **kwargs)
        kept.append(times)
        return times

    planning.times_in_turn = keeping  # the spread's rounds, as the plan saw them
    try:
        out = []
        for _ in range(loads):
            kept.clear()
            served = load_version(version, RuntimeConfig(device="cpu"),
                                  BatcherConfig(max_batch_size=8))
            intra, spread = kept[-2], kept[-1]  # the plan times intra-op's lead first
            # What the chosen lead then gains in wall time on a lone example, the way it serves
            # one: what the spread's prediction (CPU times of each group alone) stands for.
            example = np.zeros((1, *served.manifest.input.shape[1:]),
                               dtype=served.manifest.input.dtype)
            realized = timed((served.runtime.scores, served.instances[0].scores), example, 0.2, 1)
            fastest, paired = planning.gain_estimates(spread)
            intra_fastest, intra_paired = planning.gain_estimates(intra)
            gain, intra_gain = planning.spread_gain(spread), planning.intra_op_gain(intra)
            out.append({"fastest_of_each": fastest, "median_round": paired,
                        "plan": gain, "rounds": len(spread),
                        "intra_fastest_of_each": intra_fastest, "intra_median_round": intra_paired,
                        "intra_plan": intra_gain, "intra_smaller": min(intra_fastest, intra_paired),
                        "intra_rounds": len(intra), "spread_over_intra": gain / intra_gain,
                        "lead_wall_gain": max(planning.gain_estimates(realized)),
                        "lead": served.thread_plan.lead, "why": served.thread_plan.why})
            asyncio.run(served.close())
        return out
    finally:
        planning.times_in_turn = timed


def _stats(loads: list[dict[str, Any]], key: str, under: float | None = None,
           over: float | None = None) -> str:
    """min / p5 / median / max of a key over the loads, then how many sit at or under `under`
    (or over `over`)."""
    values = np.array([load[key] for load in loads])
    text = (f"{values.min():.2f} / {np.percentile(values, 5):.2f} / {np.median(values):.2f} / "
            f"{values.max():.2f}")
    if under is not None:
        text += f" | {(values <= under).sum()}"
    if over is not None:
        text += f" | {(values > over).sum()}"
    return text


def _row(kind: str, loads: list[dict[str, Any]]) -> str:
    plans = sorted({load["lead"] for load in loads})
    return (f"| {kind} | {len(loads)} | {_stats(loads, 'fastest_of_each', MARGIN)} | "
            f"{_stats(loads, 'median_round', MARGIN)} | {_stats(loads, 'plan', MARGIN)} | "
            f"{'; '.join(plans)} |")


def _lead_row(kind: str, loads: list[dict[str, Any]]) -> str:
    leads = sorted(Counter(load["lead"] for load in loads).items())
    return (f"| {kind} | {len(loads)} | {_stats(loads, 'intra_fastest_of_each', over=MARGIN)} | "
            f"{_stats(loads, 'intra_median_round', over=MARGIN)} | "
            f"{_stats(loads, 'intra_smaller', over=MARGIN)} | "
            f"{_stats(loads, 'spread_over_intra', OVER_INTRA)} | "
            f"{'; '.join(f'{lead}: {count}' for lead, count in leads)} | "
            f"{_stats(loads, 'lead_wall_gain')} |")


def render(report: dict[str, Any]) -> str:
    lines = [f"## {HEADING}", "",
             "`python -m benchmarks.plan_stability` (issue 23, item 4): the plan-stability test's "
             "compute-bound model (two equal members, a true spread gain of 2x, intra-op threads "
             f"barely faster) loaded {report['loads']} times beside each background. "
             f"Load average before: {report['load_average_before'][0]:.2f}. "
             f"{report['machine']}.", "",
             "The spread's gain as the fastest run of each side gives it, as the median round's "
             "own ratio gives it, and as the plan takes it (`planning.spread_gain`: the larger of "
             f"the two); 'at or under {MARGIN}' counts the loads where the lead's margin would "
             "lose the spread.", "",
             "| background | loads | fastest of each: min / p5 / median / max | at or under "
             f"{MARGIN} | median round: min / p5 / median / max | at or under {MARGIN} | "
             f"the plan's (the larger) | at or under {MARGIN} | lead chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(kind, loads) for kind, loads in report["backgrounds"].items()]
    lines += ["", "Intra-op's gain (wall time, every core's threads against one) by the same two "
              "estimates (the plan takes the fastest of each, `planning.intra_op_gain`) and the "
              f"smaller of them; 'over {MARGIN}' counts the loads where it alone would earn an "
              "intra-op lead; the spread's gain over intra-op's, both as the plan takes them, "
              f"which must pass {OVER_INTRA} for the spread to lead ('at or under {OVER_INTRA}': "
              "the loads it would not); the leads chosen; and what the chosen lead gains in wall "
              "time on a lone example once loaded (the larger of the two estimates, one thread "
              "against the lead, in turn).", "",
              "| background | loads | intra-op, fastest of each: min / p5 / median / max | "
              f"over {MARGIN} | median round | over {MARGIN} | the smaller of the two | "
              f"over {MARGIN} | the spread's over intra-op's | at or under {OVER_INTRA} | "
              "leads chosen | the lead's wall-time gain |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_lead_row(kind, loads) for kind, loads in report["backgrounds"].items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=40, help="loads per background")
    parser.add_argument("--backgrounds", default="quiet,spin2,spin3,matmul2")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # a load logs its plan: 160 of them say nothing here
    from snapserve.trainer.importer import import_members
    from tests.support.models import save, slow_member

    report: dict[str, Any] = {"loads": args.loads, "load_average_before": os.getloadavg(),
                              "machine": f"{os.cpu_count()} CPUs", "backgrounds": {}}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        members = save([slow_member(128, 40), slow_member(128, 40)], root / "onnx")
        version = import_members(members, root / "repo", "compute-bound")
        for kind in args.backgrounds.split(","):
            with background(kind):
                report["backgrounds"][kind] = measure(version, args.loads)
            print(_row(kind, report["backgrounds"][kind]), flush=True)
            print(_lead_row(kind, report["backgrounds"][kind]), flush=True)
    section = render(report)
    print(section)
    if not args.no_write:
        RESULTS.write_text(replace_section(RESULTS.read_text(), HEADING, section))
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
