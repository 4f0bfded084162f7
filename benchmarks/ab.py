"""Two builds or settings of the server against each other: paired runs, ratios with intervals.

    python -m benchmarks.ab --a REV [--b REV] [--flags-a "..."] [--flags-b "..."] \
        [--models digits] [--concurrency 1,8,32] [--repeats 6] [--duration 8] [--warmup 2] \
        [--api kserve] [--json FILE]

A side is a git revision of the server (`worktree`, the default, is the files as they are now)
and the flags its `ensemble-server` gets beside the defaults. A revision is exported with `git
archive` into runs/ab/<commit>/ and imported from there (an empty `snapserve/__init__.py`
over links to its top-level folders, ahead of the editable install on PYTHONPATH); the C++
front end's library is built for its own source where need be. The client is always this
tree's `ensemble-client bench` (closed loop, one example per request), so both sides get the
same load.

Each repeat starts a fresh server of each side on the model alone, side A first in even
repeats and side B first in odd ones (a drift of the machine falls on both), and runs every
level on it; beside each level the server's CPU per request (warm-up and window). For each
level it prints B over A per repeat and the geometric mean with its 95% t-interval over the
repeats (of the log ratios) for req/s, p99 and server CPU per request: "better" only where
the interval excludes 1. Never in CI: a benchmark needs a quiet machine (nothing else
running; the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks.ensembles import DIGITS, RESNET20, digits_version, resnet20_version
from benchmarks.serve import (_cpu_ticks, _free_port, _measured_level, _process, _span,
                              model_alone)

__all__ = ["Side", "main", "ratio_interval", "run"]

logger = logging.getLogger("benchmarks.ab")

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "ab"
WORKTREE = "worktree"
# The repository's top-level folders that install as snapserve's subpackages (pyproject.toml).
_SUBPACKAGES = ("proto", "server", "client", "trainer")


@dataclass(frozen=True)
class Side:
    name: str  # "A" or "B"
    revision: str  # a git revision, or WORKTREE
    flags: tuple[str, ...] = ()

    def describe(self) -> str:
        flags = " ".join(self.flags) or "(defaults)"
        return f"{self.name}: {self.revision}, {flags}"


def _commit(revision: str) -> str:
    return subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout.strip()


def import_root(revision: str) -> Path | None:
    """Where a revision's `snapserve` imports from (None: the editable install, this tree)."""
    if revision == WORKTREE:
        return None
    commit = _commit(revision)
    root = WORK / commit
    package = root / "import" / "snapserve"
    if not (package / "__init__.py").is_file():
        tree = root / "tree"
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        package.mkdir(parents=True, exist_ok=True)
        for name in _SUBPACKAGES:
            link = package / name
            if not link.exists():
                link.symlink_to(tree / name, target_is_directory=True)
        (package / "__init__.py").write_text("")  # last: marks the export complete
    return package.parent


def _environment(side: Side) -> dict[str, str]:
    env = dict(os.environ)
    root = import_root(side.revision)
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _one_server(side: Side, repository: Path, model: str, levels: Sequence[int], duration: float,
                warmup: float, api: str, workdir: Path, repeat: int) -> list[dict[str, Any]]:
    only = model_alone(repository, model, workdir)
    command = [sys.executable, "-m", "snapserve.server", "--model-repository", str(only),
               "--port", "0", "--http-port", str(_free_port()), "--device", "cpu", *side.flags]
    log = workdir / f"server-{model}-{side.name}-{repeat}.log"
    with _process(command, log, env=_environment(side)) as (process, port):
        return [_measured_level(process, port, model, f"--concurrency {c}", duration, warmup, api)
                for c in levels]


def ratio_interval(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """B over A, paired by repeat: the geometric mean of the ratios and its 95% t-interval
    (over the logs; nan below two pairs)."""
    from scipy.stats import t

    logs = [math.log(y / x) for x, y in zip(a, b) if x > 0 and y > 0]
    if not logs:
        return {"ratio": math.nan, "low": math.nan, "high": math.nan}
    mean = sum(logs) / len(logs)
    if len(logs) < 2:
        return {"ratio": math.exp(mean), "low": math.nan, "high": math.nan}
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (len(logs) - 1))
    half = float(t.ppf(0.975, len(logs) - 1)) * sd / math.sqrt(len(logs))
    return {"ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half)}


def run(sides: Sequence[Side], models: Sequence[str], levels: Sequence[int], repeats: int,
        duration: float, warmup: float, api: str) -> dict[str, Any]:
    repository = ROOT / "runs" / "benchmarks" / "repo"
    builders = {DIGITS: digits_version, RESNET20: resnet20_version}
    for model in models:
        builders[model](repository)
    for side in sides:
        import_root(side.revision)  # exported before the clock starts
    report: dict[str, Any] = {"sides": [side.describe() for side in sides], "api": api,
                              "load_before": os.getloadavg(), "duration_s": duration,
                              "warmup_s": warmup, "models": {}}
    ticks0 = _cpu_ticks()
    with tempfile.TemporaryDirectory(prefix="snapserve-ab-") as tmp:
        for model in models:
            runs: dict[str, list[list[dict[str, Any]]]] = {side.name: [] for side in sides}
            for repeat in range(repeats):
                for side in (sides if repeat % 2 == 0 else sides[::-1]):
                    levels_run = _one_server(side, repository, model, levels, duration, warmup,
                                             api, Path(tmp), repeat)
                    runs[side.name].append(levels_run)
                    logger.info("%s repeat %d %s: %s", model, repeat, side.name, ", ".join(
                        f"c={c} {r['throughput_rps']:.1f} req/s" for c, r in zip(levels, levels_run)))
            report["models"][model] = runs
    ticks1 = _cpu_ticks()
    report["load_after"] = os.getloadavg()
    report["steal_share"] = (ticks1[1] - ticks0[1]) / max(ticks1[0] - ticks0[0], 1)
    return report


_MEASURES = (("req/s", lambda r: r["throughput_rps"]), ("p99", lambda r: r["latency_ms"]["p99"]),
             ("server CPU/req", lambda r: r["server_cpu_ms_per_request"]))


def render(report: dict[str, Any], levels: Sequence[int]) -> str:
    load0, load1 = report["load_before"][0], report["load_after"][0]
    lines = ["Sides: " + "; ".join(report["sides"]),
             f"Load average (1 min) before {load0:.2f}, after {load1:.2f}; CPU time stolen by "
             f"the host {100 * report['steal_share']:.1f}%. B / A per repeat, then the geometric "
             "mean and its 95% t-interval:", "",
             "| model, c | measure | A | B | B / A per repeat | B / A (95% t) |",
             "|---|---|---:|---:|---|---|"]
    for model, runs in report["models"].items():
        for index, c in enumerate(levels):
            a = [levels_run[index] for levels_run in runs["A"]]
            b = [levels_run[index] for levels_run in runs["B"]]
            for label, get in _MEASURES:
                va, vb = [get(r) for r in a], [get(r) for r in b]
                ratio = ratio_interval(va, vb)
                per = ", ".join(f"{y / x:.2f}" for x, y in zip(va, vb))
                lines.append(f"| {model}, c={c} | {label} | {_span(va)} | {_span(vb)} | {per} | "
                             f"{ratio['ratio']:.3f} ({ratio['low']:.3f}-{ratio['high']:.3f}) |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default=WORKTREE, help="side A's git revision (default: worktree)")
    parser.add_argument("--b", default=WORKTREE, help="side B's git revision (default: worktree)")
    parser.add_argument("--flags-a", default="", help="side A's extra server flags, one string")
    parser.add_argument("--flags-b", default="", help="side B's extra server flags, one string")
    parser.add_argument("--models", nargs="+", default=[DIGITS], choices=[DIGITS, RESNET20])
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--api", default="kserve", choices=["native", "kserve"])
    parser.add_argument("--json", type=Path, help="write the runs here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sides = [Side("A", args.a, tuple(shlex.split(args.flags_a))),
             Side("B", args.b, tuple(shlex.split(args.flags_b)))]
    if sides[0].revision == sides[1].revision and sides[0].flags == sides[1].flags:
        parser.error("the two sides are the same: give --a/--b revisions or --flags-a/--flags-b")
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 for an interval")
    report = run(sides, args.models, args.concurrency, args.repeats, args.duration, args.warmup,
                 args.api)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
