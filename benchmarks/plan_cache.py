"""The plan cache against measuring at every load: the plans chosen and the load times (issue
23, item 4).

    python -m benchmarks.plan_cache [--loads 40] [--backgrounds quiet,spin2] [--no-write]

The models are the plan-stability test's (tests/server/engine/test_planning.py): `tiny` (the
fused graph plainly faster, a lone request on the event loop) and `compute-bound` (two members of
40 chained [128, 128] matrix products: the fused graph and the members near a tie, a spread lead
whose kind busy processes have flipped, benchmarks/RESULTS.md "Plan stability: the spread's
gain"). Beside each background (plan_stability.background), each is loaded `--loads` times with
the plan cache off, then `--loads` times with it on in a fresh folder: the first of those
measures and stores, the others read back. Each load's plan is its graph, the threads of each
instance, the event-loop choice and the lead's kind, compared whole. Writes the "Plan cache: the
same plan at every start" section of benchmarks/RESULTS.md and the raw numbers to
runs/benchmarks/plan_cache.json.

Nothing else should run: the backgrounds are the load; the load average is recorded beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.plan_stability import background
from benchmarks.serve import RESULTS, replace_section

HEADING = "Plan cache: the same plan at every start"
RAW = Path("runs/benchmarks/plan_cache.json")


def _loads(version: Path, loads: int, cache: Path | None) -> list[dict[str, Any]]:
    """Each load's plan, in words, its seconds and where the plan came from."""
    from snapserve.server.engine.batcher import BatcherConfig
    from snapserve.server.engine.runtime import RuntimeConfig
    from snapserve.server.models.loading import load_version

    out = []
    for _ in range(loads):
        began = time.perf_counter()
        served = load_version(version, RuntimeConfig(device="cpu", plan_cache=cache),
                              BatcherConfig(max_batch_size=8))
        seconds = time.perf_counter() - began
        plan = served.thread_plan
        assert plan is not None
        out.append({"plan": f"{served.runtime.graph} {','.join(map(str, plan.thread_counts))}"
                            f"{' on-loop' if plan.on_loop else ''} lead: {plan.lead}",
                    "seconds": seconds, "cached": served.plan_source.startswith("the plan cache")})
        asyncio.run(served.close())
    return out


def _plans(loads: list[dict[str, Any]]) -> str:
    counted = Counter(load["plan"] for load in loads).most_common()
    return f"{len(counted)}: " + "; ".join(f"{plan} ({count})" for plan, count in counted)


def _seconds(loads: list[dict[str, Any]]) -> str:
    values = np.array([load["seconds"] for load in loads])
    return f"{values.min():.3f} / {np.median(values):.3f} / {values.max():.3f}" if len(values) \
        else "-"


def _row(model: str, kind: str, result: dict[str, list[dict[str, Any]]]) -> str:
    off, on = result["off"], result["on"]
    read_back = [load for load in on if load["cached"]]
    return (f"| {model} | {kind} | {len(off)} | {_plans(off)} | {_seconds(off)} | "
            f"{_plans(on)} | {len(read_back)} | {_seconds(read_back)} |")


def render(report: dict[str, Any]) -> str:
    lines = [f"## {HEADING}", "",
             "`python -m benchmarks.plan_cache` (issue 23, item 4): the plan-stability test's two "
             f"models loaded {report['loads']} times with the plan cache off, then "
             f"{report['loads']} times with it on in a fresh folder (the first load measures and "
             "stores, the others read back), beside each background. A plan is the graph, the "
             "threads of each instance (the lead's first), the event-loop choice and the lead's "
             "kind. Load seconds: `load_version` from the manifest to a version ready to serve "
             "(warm-up runs included). Load average before: "
             f"{report['load_average_before'][0]:.2f}. {report['machine']}.", "",
             "| model | background | loads | cache off: distinct plans (loads) | load s: min / "
             "median / max | cache on: distinct plans (loads) | read back | load s read back: "
             "min / median / max |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(model, kind, result) for model, kinds in report["models"].items()
              for kind, result in kinds.items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=40, help="loads per model, background and "
                                                              "cache setting")
    parser.add_argument("--backgrounds", default="quiet,spin2")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # every load logs its plan: they say nothing here
    from snapserve.trainer.importer import import_members
    from tests.support.models import conv_member, linear_members, save, slow_member

    report: dict[str, Any] = {"loads": args.loads, "load_average_before": os.getloadavg(),
                              "machine": f"{os.cpu_count()} CPUs", "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        models = {"tiny": [conv_member(1, opset=17), conv_member(2, opset=18),
                           *linear_members(1, seed=3)],
                  "compute-bound": [slow_member(128, 40), slow_member(128, 40)]}
        for model, members in models.items():
            version = import_members(save(members, root / model / "onnx"), root / "repo", model)
            report["models"][model] = {}
            for kind in args.backgrounds.split(","):
                with background(kind):
                    result = {"off": _loads(version, args.loads, None),
                              "on": _loads(version, args.loads, root / f"plans-{model}-{kind}")}
                report["models"][model][kind] = result
                print(_row(model, kind, result), flush=True)
    section = render(report)
    print(section)
    if not args.no_write:
        RESULTS.write_text(replace_section(RESULTS.read_text(), HEADING, section))
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
