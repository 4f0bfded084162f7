"""Adaptive member evaluation measured (issue 27, item 3): the full ensemble against adaptive
serving of the same members, beside the tuned Triton running the full ensemble, in one run.

    python -m benchmarks.adaptive render [--json FILE]   # the section again from saved numbers
    python -m benchmarks.adaptive [--seeds 0,1,2] [--epochs 40] [--width 640] [--members 5]
        [--duration 10] [--warmup 2] [--concurrency 1,8,32] [--repo DIR] [--no-write]
        [--no-triton] [--triton-sweep-duration 3] [--triton-sweep-delays 0,100,500]
        [--triton-sweep-instances 1,2] [--triton-sweep-threads 1,2]

1. Trains (`trainer train --arch cnn1d --width W`, one seed after another, `--threads 1`) or takes
   from `--repo` one calibrated ensemble per seed (a model's newest version whose manifest has
   `adaptive`). Models trained here land in runs/benchmarks/adaptive/repo and are reused.
2. Says whether compute dominates request handling: the in-process CPU time of one example
   through every member (ONNX Runtime, one thread, the ceiling's `members` way; the fastest run
   by the calling thread's CPU clock, which a busy machine delays but does not lengthen) against
   the server's CPU per request on a cheap model (one linear member over the same input), and
   the members' share of the full server's CPU per example.
3. Starts two `ensemble-server` processes one after the other on the same repository: full (every
   member, the server's own choice of graph) and `--adaptive-members`. On each, for every seed:
   the whole test split through the native API (the server's own answers: probabilities,
   entropy, mutual information, members_evaluated), then closed loops of one-example requests
   at each concurrency over KServe v2 gRPC (as Triton is driven), driven by the project's load
   generator (client/bench.py, its `--input-data`) over the test inputs in a fixed shuffled
   order: an adaptive server's cost depends on the inputs, so a load of one repeated input
   would say nothing. Server CPU per example from /proc.
4. Then, after both (not interleaved), the tuned Triton (benchmarks/peers/triton.py; on unless
   `--no-triton`, skipped with a note when its venv cannot be made): `tritonserver` whose python
   backend runs each version's fused ensemble.onnx. Its settings (dynamic-batcher delay,
   instances, ONNX Runtime threads) are swept on the first seed's model alone, to keep the run
   short, with the same cycling test-input load through KServe v2 gRPC (Triton has no native
   API); the best by `best_setting` (geometric mean of examples/s over the levels) then serves
   every seed's model for the full plan. Server CPU counts Triton's whole process tree (the
   python backend runs each instance in a stub process).
5. Reports full against adaptive, paired on the same test examples: accuracy, NLL, the error-
   flagging AUROC of the entropy and of the mutual information, mean members evaluated, and
   examples/s and server CPU per example at each concurrency, and both against Triton;
   differences and ratios as a paired t-interval over seeds. Writes the "Adaptive member
   evaluation" section of benchmarks/RESULTS.md and the raw numbers to runs/benchmarks/adaptive/results.json.

Throughput shares the machine with whatever else runs: the load average and the other
processes' share of the CPU go beside the numbers. Accuracy and the scores do not depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from benchmarks.ceiling import _ways
from benchmarks.ensembles import latest_version
from benchmarks.serve import (ServerSettings, _busy_seconds, _fmt, _machine, _own_seconds,
                              _process, replace_section)
from snapserve.server.engine.runtime import compute_clock, fastest_in_turn

if TYPE_CHECKING:
    from benchmarks.peers.triton import TritonSetting

__all__ = ["TritonArm", "main", "paired_interval", "render", "run", "triton_lines"]

logger = logging.getLogger("benchmarks.adaptive")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
WORK = ROOT / "runs" / "benchmarks" / "adaptive"
SECTION = "Adaptive member evaluation"
CHEAP = "handling-probe"  # the cheap model: its compute is negligible beside its handling
GOAL_SPEEDUP = 2.5  # adaptive examples/s over full at the goal's concurrency
GOAL_CONCURRENCY = 32
GOAL_ACCURACY_POINTS = 0.1
GOAL_AUROC = 0.01
GOAL_COMPUTE_RATIO = 5.0
# Triton's sweep by default: no wait up to a quarter of snapserve's default delay, one instance
# or one per core, one thread or every core's. Shorter than benchmarks/peers/triton.py's sweep
# (no 2000 µs): its settings x levels points add to every run of this benchmark.
TRITON_DELAYS_US, TRITON_INSTANCES, TRITON_THREADS = (0, 100, 500), (1, 2), (1, 2)
# The server's load-time line: its graph, instances and its own compute-vs-handling estimate.
_GRAPH = re.compile(r"(\S+) version \d+: serving the (\w+) graph on (.*?)(?:; measured .*)?$")


@dataclass(frozen=True)
class TritonArm:
    """The tuned Triton beside the two snapserve servers: the settings swept on the first
    seed's model, and each sweep point's measured seconds per level (after
    benchmarks/peers/triton.py's SWEEP_WARMUP_S unmeasured)."""

    settings: tuple[TritonSetting, ...]
    sweep_duration_s: float = 3.0  # per level and setting: long enough to rank, short enough
    # that the sweep (settings x levels points) stays a fraction of the run

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError("settings must hold at least one Triton setting")
        if not self.sweep_duration_s > 0:
            raise ValueError(f"sweep_duration_s must be > 0, got {self.sweep_duration_s}")


# --- models -------------------------------------------------------------------------------------

def _calibrated(model_dir: Path, **training: Any) -> Path | None:
    """The newest version of a model when it carries a calibration and was trained with the
    `training` settings given (manifest `training`), else None."""
    version = latest_version(model_dir)
    if version is None:
        return None
    manifest = json.loads((version / "manifest.json").read_text())
    recorded = manifest.get("training") or {}
    if not manifest.get("adaptive") or any(recorded.get(k) != v for k, v in training.items()):
        return None
    return version


def train_models(repo: Path, seeds: Sequence[int], dataset: str, width: int, epochs: int,
                 members: int) -> dict[str, Path]:
    """One calibrated ensemble per seed in `repo` (trained unless already there): name -> version."""
    versions = {}
    for seed in seeds:
        name = f"cnn1d-w{width}-e{epochs}-s{seed}"
        settings = {"dataset": dataset, "arch": "cnn1d", "width": width, "epochs": epochs,
                    "members": members, "seed": seed}
        version = _calibrated(repo / name, **settings)
        if version is None:
            logger.info("training %s (trainer train, %d epochs, one thread)", name, epochs)
            subprocess.run([sys.executable, "-m", "snapserve.trainer", "-q", "train", "--dataset",
                            dataset, "--arch", "cnn1d", "--width", str(width), "--epochs",
                            str(epochs), "--members", str(members), "--seed", str(seed),
                            "--threads", "1", "--no-plots", "--out", str(repo), "--name", name],
                           check=True, cwd=ROOT)
            version = _calibrated(repo / name, **settings)
            if version is None:
                raise RuntimeError(f"{name}: the trainer wrote no calibrated version")
        versions[name] = version
    return versions


def existing_models(repo: Path) -> dict[str, Path]:
    """Every model in `repo` whose newest version carries a calibration: name -> version."""
    found = {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        version = _calibrated(model_dir)
        if version is not None:
            found[model_dir.name] = version
    if not found:
        raise SystemExit(f"{repo}: no model with a calibrated (manifest 'adaptive') version")
    return found


def cheap_model(repo: Path, input_shape: Sequence[int], classes: int) -> Path:
    """A one-member model over the same input (flatten, one matrix product): what the server
    costs per request when the model costs next to nothing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from snapserve.trainer.importer import import_members

    existing = latest_version(repo / CHEAP)
    if existing is not None:
        return existing
    features = int(np.prod(input_shape))
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(0, 0.1, (features, classes)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])], "probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, path)
        return import_members([path], repo, CHEAP)


def test_split(version_dir: Path, dataset: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The test split the version was trained beside (raw inputs, as the served graph takes)."""
    from snapserve.trainer.datasets import load_dataset

    manifest = json.loads((version_dir / "manifest.json").read_text())
    training = manifest.get("training") or {}
    spec = dataset or training.get("dataset")
    if not spec:
        raise SystemExit(f"{version_dir}: the manifest names no dataset; give --dataset")
    data = load_dataset(spec, split_seed=int(training.get("split_seed", 0)))
    x, spec = data.test.x, manifest["input"]
    norm = spec.get("normalization")
    if spec.get("kind") != "raw" and norm:  # older graphs take inputs normalised by the caller
        shape = [1] * x.ndim
        shape[int(norm.get("axis", 1))] = -1
        x = (x - np.reshape(norm["mean"], shape)) / np.reshape(norm["std"], shape)
    return np.ascontiguousarray(x, dtype=np.float32), data.test.y


def in_process_ms(version_dir: Path, batch: int, budget_s: float) -> float:
    """CPU ms per example of every member (one thread, logits only) at one batch size.

    Timed as the server times its graphs at load (engine/runtime.py): the fastest run by the
    calling thread's CPU clock. A one-thread session computes on the calling thread alone, so
    other processes can delay a run but not lengthen it, and a busy machine does not inflate
    compute over handling (whose handling side is CPU time too)."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    run_members = _ways(version_dir, manifest, 1)["members"]
    x = np.random.default_rng(0).normal(0, 1, (batch, *manifest["input"]["shape"][1:])).astype(np.float32)
    clock = compute_clock(1, "CPUExecutionProvider")
    return 1e3 * fastest_in_turn([run_members], x, budget_s, clock=clock)[0] / batch


# --- load: the project's load generator over many inputs ----------------------------------------

def _server_cpu(step: dict[str, Any]) -> Callable[[int], float]:
    """The reader of a server's CPU seconds for a plan step: the process alone, or with
    `process_tree` its whole tree (Triton's python backend computes in stub processes)."""
    if step.get("process_tree"):
        from benchmarks.peers.triton import _tree_cpu_seconds

        return _tree_cpu_seconds
    from benchmarks.serve import _cpu_seconds

    return _cpu_seconds


async def _drive(target: str, plan: Sequence[dict[str, Any]], server_pid: int, duration: float,
                 warmup: float) -> list[dict[str, Any]]:
    """Each planned level in turn (model, inputs .npy, concurrency, optional api and
    process_tree), with the server's CPU over it from /proc: one client process for them all,
    started once."""
    from snapserve.client.bench import BenchConfig, _level, _open_target, prepared_requests
    from snapserve.client.credentials import Security

    results = []
    for step in plan:
        # The load generator's --input-data: one example per request, the test inputs in turn.
        config = BenchConfig(target=target, model=step["model"], concurrency=(step["concurrency"],),
                             duration_s=duration, warmup_s=warmup, api=step.get("api", "native"),
                             input_data=step["inputs"])
        cpu_seconds = _server_cpu(step)
        async with _open_target(config, Security(), None) as bench_target:
            requests = await prepared_requests(bench_target, config)
            bench_target.check(await bench_target.call(requests.payloads[0]), 1)
            cpu0, began = cpu_seconds(server_pid), time.perf_counter()
            result = asdict(await _level(bench_target, requests, config, step["concurrency"]))
            cpu, wall = cpu_seconds(server_pid) - cpu0, time.perf_counter() - began
        answered = result["requests"] + sum(result["errors"].values())
        # Over warm-up and window together: the rate is about the same in both.
        result["server_cpu_ms_per_example"] = 1e3 * cpu / max(answered * (duration + warmup) / duration, 1)
        result["server_cpu_share"] = cpu / wall
        results.append({**step, "result": result})
    return results


def _measured_levels(pid: int, port: int, plan: Sequence[dict[str, Any]], duration: float,
                     warmup: float) -> list[dict[str, Any]]:
    """The plan's levels from a client process of its own (its CPU is not the server's, and
    nothing of this process competes with it)."""
    with tempfile.NamedTemporaryFile(suffix=".json", mode="w") as plan_file, \
            tempfile.NamedTemporaryFile(suffix=".json") as out:
        json.dump(list(plan), plan_file)
        plan_file.flush()
        subprocess.run([sys.executable, "-m", "benchmarks.adaptive", "drive", "--target",
                        f"127.0.0.1:{port}", "--server-pid", str(pid), "--plan", plan_file.name,
                        "--duration", str(duration), "--warmup", str(warmup), "--out", out.name],
                       check=True, cwd=ROOT)
        return json.loads(Path(out.name).read_text())


# --- the test split, as served ------------------------------------------------------------------

def served_answers(port: int, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    from snapserve.client.sync_client import EnsembleClient

    with EnsembleClient(f"127.0.0.1:{port}") as client:
        p = client.predict(model, x)
    return {"probabilities": np.asarray(p.probabilities, dtype=np.float64),
            "predictive_entropy": np.asarray(p.predictive_entropy, dtype=np.float64),
            "mutual_information": np.asarray(p.mutual_information, dtype=np.float64),
            "members_evaluated": np.asarray(p.members_evaluated, dtype=np.int64)}


def split_metrics(answers: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float | None]:
    from snapserve.trainer.metrics import auroc

    probs = answers["probabilities"]
    rows = np.arange(len(labels))
    errors = np.argmax(probs, axis=1) != labels
    return {"accuracy": float(1 - errors.mean()),
            "nll": float(-np.log(np.clip(probs[rows, labels], 1e-12, None)).mean()),
            "entropy_auroc": auroc(answers["predictive_entropy"], errors),
            "mi_auroc": auroc(answers["mutual_information"], errors),
            "mean_members_evaluated": float(answers["members_evaluated"].mean()),
            "errors": int(errors.sum())}


def paired_interval(differences: Sequence[float], level: float = 0.95) -> dict[str, float | None]:
    """Mean of per-seed paired differences and its t-interval (None below two seeds)."""
    d = np.asarray([v for v in differences if v is not None], dtype=np.float64)
    if len(d) == 0:
        return {"mean": None, "low": None, "high": None, "seeds": 0}
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "low": None, "high": None, "seeds": 1}
    from scipy.stats import t

    half = float(t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": int(len(d))}


# --- the run ------------------------------------------------------------------------------------

def _serve(repo: Path, models: Sequence[str], adaptive: bool, settings: ServerSettings,
           tests: dict[str, tuple[np.ndarray, np.ndarray]], inputs_files: dict[str, Path],
           levels: Sequence[int], duration: float, warmup: float, workdir: Path,
           cheap: bool) -> dict[str, Any]:
    label = "adaptive" if adaptive else "full"
    command = [sys.executable, "-m", "snapserve.server", "--model-repository", str(repo),
               "--port", "0", *settings.flags(),
               "--adaptive-members" if adaptive else "--no-adaptive-members"]
    log = workdir / f"server-{label}.log"
    out: dict[str, Any] = {"models": {}}
    with _process(command, log) as (process, port):
        for model in models:
            x, y = tests[model]
            answers = served_answers(port, model, x)
            out["models"][model] = {"test": split_metrics(answers, y), "levels": {},
                                    "answers": {k: v.tolist() for k, v in answers.items()
                                                if k != "probabilities"}}
        # KServe v2 gRPC, as Triton is driven: the ratios against it compare servers, not APIs.
        plan = [{"model": CHEAP, "inputs": str(inputs_files[models[0]]), "concurrency": c,
                 "api": "kserve"} for c in (sorted({1, max(levels)}) if cheap else ())]
        plan += [{"model": model, "inputs": str(inputs_files[model]), "concurrency": c,
                  "api": "kserve"} for model in models for c in levels]
        for step in _measured_levels(process.pid, port, plan, duration, warmup):
            level, c = step["result"], step["concurrency"]
            if step["model"] == CHEAP:
                out.setdefault("cheap", {})[c] = level
                continue
            out["models"][step["model"]]["levels"][c] = level
            logger.info("%s %s c=%d: %.1f ex/s, server %.3f ms CPU/example", label, step["model"],
                        c, level["examples_per_s"], level["server_cpu_ms_per_example"])
    out["log"] = [line for line in log.read_text(errors="replace").splitlines()
                  if "serving the" in line or "adaptive" in line][:20]
    return out


def _triton_server(arm: TritonArm, versions: dict[str, Path], workdir: Path,
                   ) -> tuple[Path, Path, Path] | str:
    """(tritonserver, backends, model repository) ready to start, or why Triton cannot run
    here: its venv is made on first use (pip), which an offline machine cannot do."""
    from benchmarks.peers import triton as peer

    try:
        tritonserver = peer._install()
        backends = peer._backends(tritonserver, workdir / "triton-backends")
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        logger.warning("Triton left out: %s", exc)
        return f"Triton could not be installed or set up ({exc})"
    return tritonserver, backends, peer._triton_repo(versions, arm.settings, workdir / "triton-repo")


def _triton_plan(names: dict[str, str], inputs_files: dict[str, Path],
                 levels: Sequence[int]) -> list[dict[str, Any]]:
    """The snapserve levels' load for Triton's models (seed -> Triton model name): the same
    cycling test inputs, through KServe v2 gRPC, CPU over Triton's whole process tree."""
    return [{"model": triton_name, "seed": name, "inputs": str(inputs_files[name]),
             "concurrency": c, "api": "kserve", "process_tree": True}
            for name, triton_name in names.items() for c in levels]


def _serve_triton(arm: TritonArm, server: tuple[Path, Path, Path], versions: dict[str, Path],
                  inputs_files: dict[str, Path], levels: Sequence[int], duration: float,
                  warmup: float, workdir: Path) -> dict[str, Any]:
    """The sweep on the first seed's model, then every seed's model at the best setting."""
    from benchmarks.peers import triton as peer

    first = next(iter(versions))
    by_key = {s.key: s for s in arm.settings}
    sweep: dict[str, Any] = {"model": first, "duration_s": arm.sweep_duration_s,
                             "warmup_s": peer.SWEEP_WARMUP_S,
                             "settings": [asdict(s) | {"key": s.key} for s in arm.settings],
                             "points": {}, "geomean_examples_per_s": {}}
    out: dict[str, Any] = {"sweep": sweep, "models": {name: {} for name in versions}}
    with peer._triton(*server, workdir / "triton.log") as triton:
        pid, port = triton.process.pid, triton.grpc_port
        for setting in arm.settings:
            name = peer._triton_name(first, setting)
            with triton.loaded([name]):
                steps = _measured_levels(pid, port, _triton_plan({first: name}, inputs_files, levels),
                                         arm.sweep_duration_s, peer.SWEEP_WARMUP_S)
            sweep["points"][setting.key] = [step["result"] for step in steps]
            sweep["geomean_examples_per_s"][setting.key] = peer._geomean(
                step["result"]["examples_per_s"] for step in steps)
            logger.info("triton sweep %s %s: %s ex/s", first, setting.describe(), " / ".join(
                f"{step['result']['examples_per_s']:.0f}" for step in steps))
        key, why = peer.best_setting(sweep["points"])
        best = by_key[key]
        out["best"] = {"key": key, **asdict(best), "why": why, "described": best.describe()}
        logger.info("Triton's best setting on %s: %s (%s)", first, best.describe(), why)
        names = {name: peer._triton_name(name, best) for name in versions}
        with triton.loaded(list(names.values())):
            for step in _measured_levels(pid, port, _triton_plan(names, inputs_files, levels),
                                         duration, warmup):
                level, c = step["result"], step["concurrency"]
                out["models"][step["seed"]][c] = level
                logger.info("triton %s c=%d: %.1f ex/s, server tree %.3f ms CPU/example",
                            step["seed"], c, level["examples_per_s"], level["server_cpu_ms_per_example"])
    return out


def run(versions: dict[str, Path], levels: Sequence[int], duration: float, warmup: float,
        settings: ServerSettings, dataset: str | None, workdir: Path, budget_s: float = 0.5,
        triton: TritonArm | None = None) -> dict[str, Any]:
    machine = _machine()
    logger.info("load average before %s", machine["load_average_before"])
    busy0, own0, began = _busy_seconds(), _own_seconds(), time.monotonic()
    repo = workdir / "repo"  # the models and the cheap one, by link: nothing else loads
    repo.mkdir()
    tests, inputs_files = {}, {}
    for name, version in versions.items():
        (repo / name / version.name).parent.mkdir()
        (repo / name / version.name).symlink_to(version.resolve(), target_is_directory=True)
        x, y = test_split(version, dataset)
        tests[name] = (x, y)
        inputs_files[name] = workdir / f"{name}-inputs.npy"
        np.save(inputs_files[name], x[np.random.default_rng(0).permutation(len(x))])
    first = next(iter(versions.values()))
    manifest = json.loads((first / "manifest.json").read_text())
    cheap_model(repo, manifest["input"]["shape"][1:], len(manifest["classes"]))
    compute = {1: in_process_ms(first, 1, budget_s), max(levels): in_process_ms(first, max(levels), budget_s)}
    logger.info("in-process, every member, one thread: %s CPU ms per example by batch size", compute)
    # Set up before the snapserve servers run, so a Triton that cannot run here says so at once.
    triton_server = None if triton is None else _triton_server(triton, versions, workdir)
    full = _serve(repo, list(versions), False, settings, tests, inputs_files, levels, duration,
                  warmup, workdir, cheap=True)
    adaptive = _serve(repo, list(versions), True, settings, tests, inputs_files, levels, duration,
                      warmup, workdir, cheap=False)
    peer: dict[str, Any] | None = None
    if isinstance(triton_server, str):
        peer = {"skipped": triton_server}
    elif triton is not None and triton_server is not None:
        peer = _serve_triton(triton, triton_server, versions, inputs_files, levels, duration,
                             warmup, workdir)
    machine["load_average_after"] = os.getloadavg()
    others = max(_busy_seconds() - busy0 - (_own_seconds() - own0), 0.0)
    machine["others_cpu_share"] = others / (time.monotonic() - began) / (os.cpu_count() or 1)
    return summarize(versions, compute, full, adaptive, levels, machine, duration, warmup, settings,
                     peer)


def _rate_ratio(level: dict[str, Any], over: dict[str, Any]) -> float | None:
    """examples/s of one level over another's; None when the other answered nothing."""
    return level["examples_per_s"] / over["examples_per_s"] if over["examples_per_s"] > 0 else None


def _beside_triton(seeds: dict[str, Any], triton: dict[str, Any] | None,
                   levels: Sequence[int]) -> dict[str, Any]:
    """Triton's levels into each seed's, the full and adaptive examples/s over Triton's per
    seed and level, and their paired t-intervals over seeds: label -> level -> interval."""
    if not triton or "models" not in triton:
        return {}
    for name, seed in seeds.items():
        for c in levels:
            seed["levels"][c]["triton"] = triton["models"][name][c]
        seed["over_triton"] = {label: {c: _rate_ratio(seed["levels"][c][label],
                                                      seed["levels"][c]["triton"])
                                       for c in levels} for label in ("full", "adaptive")}
    return {f"{label}_over_triton": {c: paired_interval([s["over_triton"][label][c]
                                                         for s in seeds.values()])
                                     for c in levels} for label in ("full", "adaptive")}


def summarize(versions: dict[str, Path], compute: dict[int, float], full: dict[str, Any],
              adaptive: dict[str, Any], levels: Sequence[int], machine: dict[str, Any],
              duration: float, warmup: float, settings: ServerSettings,
              triton: dict[str, Any] | None = None) -> dict[str, Any]:
    top = max(levels)
    cheap = full["cheap"]
    handling = {c: cheap[c]["server_cpu_ms_per_example"] for c in cheap}
    seeds: dict[str, Any] = {}
    for name, version in versions.items():
        f, a = full["models"][name], adaptive["models"][name]
        trained = json.loads((version / "report" / "metrics.json").read_text()).get("adaptive", {}) \
            if (version / "report" / "metrics.json").is_file() else {}
        seeds[name] = {
            "version_dir": str(version), "full": f["test"], "adaptive": a["test"],
            "trainer_test": trained.get("test"), "calibration": {
                k: trained.get(k) for k in ("order", "thresholds", "tolerance", "validation")},
            "levels": {c: {"full": f["levels"][c], "adaptive": a["levels"][c]} for c in levels},
            "speedup": {c: a["levels"][c]["examples_per_s"] / max(f["levels"][c]["examples_per_s"], 1e-9)
                        for c in levels},
            "share_of_full_server_cpu_c1": compute[1] / f["levels"][min(levels)]["server_cpu_ms_per_example"],
        }
    def delta(key: str) -> list[float | None]:
        return [None if s["adaptive"][key] is None or s["full"][key] is None
                else s["adaptive"][key] - s["full"][key] for s in seeds.values()]
    intervals = {key: paired_interval(delta(key)) for key in
                 ("accuracy", "nll", "entropy_auroc", "mi_auroc", "mean_members_evaluated")}
    intervals["speedup"] = {c: paired_interval([s["speedup"][c] for s in seeds.values()]) for c in levels}
    intervals.update(_beside_triton(seeds, triton, levels))
    return {"machine": machine, "settings": settings.__dict__, "duration_s": duration,
            "warmup_s": warmup, "levels": list(levels),
            "compute_ms_per_example": compute, "handling_ms_per_request": handling,
            "compute_over_handling": {c: compute[c] / handling[c] for c in compute if c in handling},
            "cheap_levels": cheap, "seeds": seeds, "intervals": intervals,
            "server_log": {"full": full["log"], "adaptive": adaptive["log"]},
            "top": top, "triton": None if triton is None else
            {k: v for k, v in triton.items() if k != "models"}}


# --- the report ---------------------------------------------------------------------------------

def _interval(i: dict[str, Any], scale: float = 1.0, digits: int = 3, signed: bool = True) -> str:
    sign = "+" if signed else ""
    if i["mean"] is None:
        return "n/a"
    if i["low"] is None:
        return f"{scale * i['mean']:{sign}.{digits}f} (one seed)"
    return (f"{scale * i['mean']:{sign}.{digits}f} [{scale * i['low']:{sign}.{digits}f}, "
            f"{scale * i['high']:{sign}.{digits}f}]")


def _at_least(value: float | None, bound: float) -> bool | None:
    """`value >= bound`, up to floating-point rounding: an accuracy difference is a count over
    the test split, and a mean of them that is exactly the bound (-1 answer in 1,000 over three
    seeds: -0.1 points) comes out of float arithmetic a hair below it."""
    return None if value is None else value >= bound - 1e-9 * max(1.0, abs(bound))


def goals(report: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(goal, met, the numbers) for each of the issue's targets on this run, judged on the mean
    over seeds (each line gives the interval too)."""
    iv, top = report["intervals"], report["top"]
    speed = iv["speedup"].get(GOAL_CONCURRENCY) or iv["speedup"][top]
    acc, ent = iv["accuracy"], iv["entropy_auroc"]
    ratio = report["compute_over_handling"].get(1)
    points = None if acc["mean"] is None else 100 * acc["mean"]
    return [(f"compute ≥ {GOAL_COMPUTE_RATIO:g}× request handling (batch 1)",
             _at_least(ratio, GOAL_COMPUTE_RATIO), f"{_fmt(ratio, 1)}×"),
            (f"adaptive ≥ {GOAL_SPEEDUP:g}× full examples/s at c={GOAL_CONCURRENCY}",
             _at_least(speed["mean"], GOAL_SPEEDUP),
             f"{_interval(speed, 1, 2, signed=False)}× (mean over seeds [95% t-interval])"),
            (f"test accuracy no more than {GOAL_ACCURACY_POINTS:g} points below full",
             _at_least(points, -GOAL_ACCURACY_POINTS), f"Δ {_interval(acc, 100, 2)} points"),
            (f"entropy error-AUROC no more than {GOAL_AUROC:g} below full",
             _at_least(ent["mean"], -GOAL_AUROC), f"Δ {_interval(ent)}")]


def busy(machine: dict[str, Any]) -> bool:
    """Whether others used enough of the machine that throughput is not a clean number: their
    share of the CPU over the run, measured. The load average before it is no test: it still
    counts, decaying over minutes, whatever ran just before (this benchmark's own training or a
    previous run's servers)."""
    return machine["others_cpu_share"] > 0.1


def _sweep_rows(report: dict[str, Any]) -> list[str]:
    """Triton's sweep: each setting's examples/s per level, the kept one in bold."""
    sweep, levels = report["triton"]["sweep"], report["levels"]
    chosen = report["triton"]["best"]["key"]
    lines = [f"Triton's sweep on {sweep['model']} ({sweep['duration_s']:g} s per level after "
             f"{sweep['warmup_s']:g} s unmeasured; examples/s; **bold**: the setting kept, by the "
             "highest geometric mean over the levels, near-ties to the lowest tail latency):", "",
             "| delay µs | instances x threads | "
             + " | ".join(f"c={c} ex/s" for c in levels) + " | geometric mean ex/s |",
             "|---:|---:|" + "---:|" * (len(levels) + 1)]
    for setting in sweep["settings"]:
        key = setting["key"]
        mark = "**" if key == chosen else ""
        cells = [_fmt(level["examples_per_s"]) for level in sweep["points"][key]]
        cells.append(_fmt(sweep["geomean_examples_per_s"][key]))
        lines.append(f"| {setting['delay_us']} | {setting['instances']} x {setting['threads']} | "
                     + " | ".join(f"{mark}{cell}{mark}" for cell in cells) + " |")
    return lines


def triton_lines(report: dict[str, Any]) -> list[str]:
    """The section's Triton part: its sweep and setting, its levels beside full and adaptive per
    seed, and the ratios over seeds; one line saying why when Triton is not in the run."""
    peer, levels = report.get("triton"), report["levels"]
    if not peer:
        return ["Not in this run: the tuned Triton (benchmarks/peers/triton.py), left out by "
                "`--no-triton`.", ""]
    if "skipped" in peer:
        return [f"Not in this run: the tuned Triton. {peer['skipped']}.", ""]
    best = peer["best"]
    lines = ["**Beside the tuned Triton.** `tritonserver` from nvidia-pytriton, its python backend "
             "running each version's fused ensemble.onnx (every member) in ONNX Runtime "
             "(benchmarks/peers/triton_model.py) behind its dynamic batcher; the same one-example "
             "load over the same shuffled test inputs, through KServe v2 gRPC (Triton has no "
             "native API; the snapserve rows go through it too). Triton runs after both snapserve "
             "servers, not interleaved with them, so a change in the machine's load between them "
             "moves these ratios. Its server CPU counts the whole process tree (the python backend "
             "computes in stub processes).", "", *_sweep_rows(report), "",
             f"Triton's setting for every seed: {best['described']}; {best['why']}.", "",
             "| model | c | Triton ex/s | full ex/s | adaptive ex/s | full / Triton | adaptive / Triton | Triton CPU ms/ex | full CPU ms/ex | adaptive CPU ms/ex | Triton p50 ms | Triton errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, seed in report["seeds"].items():
        for c in levels:
            row, over = seed["levels"][c], {k: v[c] for k, v in seed["over_triton"].items()}
            t, f, a = row["triton"], row["full"], row["adaptive"]
            lines.append(f"| {name} | {c} | {_fmt(t['examples_per_s'])} | {_fmt(f['examples_per_s'])} | "
                         f"{_fmt(a['examples_per_s'])} | {_fmt(over['full'], 2)}× | "
                         f"**{_fmt(over['adaptive'], 2)}×** | {_fmt(t['server_cpu_ms_per_example'], 3)} | "
                         f"{_fmt(f['server_cpu_ms_per_example'], 3)} | "
                         f"{_fmt(a['server_cpu_ms_per_example'], 3)} | "
                         f"{_fmt(t['latency_ms'].get('p50'), 2)} | {sum(t['errors'].values())} |")
    iv = report["intervals"]
    lines += ["", "Over Triton's examples/s, per seed then mean over seeds and 95% t-interval:", ""]
    for label in ("adaptive", "full"):
        lines.append(f"- {label} / Triton: " + ", ".join(
            f"c={c} {_interval(iv[f'{label}_over_triton'][c], 1, 2, signed=False)}×" for c in levels))
    return lines + [""]


def render(report: dict[str, Any], command: str) -> str:
    m, s, levels = report["machine"], report["settings"], report["levels"]
    load = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = [f"## {SECTION}", "",
             f"Written by `{command}` on {report.get('written_at') or time.strftime('%Y-%m-%d %H:%M %Z')} (benchmarks/adaptive.py). "
             "Full: every member, the server's own graph choice; adaptive: the same versions with "
             "`--adaptive-members` (issue 27). One-example requests over the test inputs in a fixed "
             "shuffled order, closed loop, KServe v2 gRPC; the client is a process of its own. "
             "Order: the full server, then the adaptive one"
             + (", then the tuned Triton (below)" if (report.get("triton") or {}).get("best") else "")
             + ", one after another, not interleaved.", "",
             f"- Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}",
             f"- Load average (1/5/15 min) before: {load(m['load_average_before'])}; after: "
             f"{load(m['load_average_after'])}. Other processes used "
             f"{100 * m['others_cpu_share']:.1f}% of the machine's CPU during the run.",
             f"- Server: `--device cpu --instances {s['instances']} --intra-op-threads "
             f"{s['intra_op_threads']} --max-batch-size {s['max_batch_size']} --max-queue-delay-ms "
             f"{s['max_queue_delay_ms']} --graph {s['graph']}`; each level "
             f"{report['warmup_s']:g} s warm-up, then {report['duration_s']:g} s measured", ""]
    if busy(m):
        lines += ["**Busy machine: throughput ratios are not a clean run.** Other processes held "
                  "the cores (load average and their CPU share above), so examples/s and CPU per "
                  "example are of a shared machine, and the speed-up with them. The test-split "
                  "numbers (accuracy, NLL, AUROC, members evaluated) do not depend on load.", ""]
    compute, handling = report["compute_ms_per_example"], report["handling_ms_per_request"]
    shares = [v["share_of_full_server_cpu_c1"] for v in report["seeds"].values()]
    lines += ["**Does compute dominate request handling?** In-process, every member, one thread "
              "(the ceiling's `members` way), CPU time: the fastest run by the calling thread's "
              "CPU clock, which other processes delay but do not lengthen: " + ", ".join(
                  f"{_fmt(compute[c], 3)} ms per example at batch {c}" for c in sorted(compute))
              + ". The server's CPU per request on a cheap model (one linear member, same input): "
              + ", ".join(f"{_fmt(handling[c], 3)} ms at c={c}" for c in sorted(handling))
              + ". Compute over handling: " + ", ".join(
                  f"**{_fmt(v, 1)}×** (batch {c} vs c={c})"
                  for c, v in sorted(report["compute_over_handling"].items()))
              + f"; the members' share of the full server's CPU per example at c={min(levels)}: "
              + ", ".join(f"{100 * v:.0f}%" for v in shares) + " (per seed).", ""]
    for label in ("full", "adaptive"):
        for line in report["server_log"][label]:
            found = _GRAPH.search(line)
            if found and found.group(1) != CHEAP:
                lines.append(f"- {label} server, {found.group(1)}: the {found.group(2)} graph "
                             f"({found.group(3)})")
                break
    lines += ["", "Throughput and server CPU per example, per seed (full → adaptive):", "",
              "| model | c | full ex/s | adaptive ex/s | speed-up | full CPU ms/ex | adaptive CPU ms/ex | p50 ms full / adaptive | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, seed in report["seeds"].items():
        for c in levels:
            f, a = seed["levels"][c]["full"], seed["levels"][c]["adaptive"]
            errors = sum(f["errors"].values()) + sum(a["errors"].values())
            lines.append(f"| {name} | {c} | {_fmt(f['examples_per_s'])} | {_fmt(a['examples_per_s'])} | "
                         f"**{_fmt(seed['speedup'][c], 2)}×** | {_fmt(f['server_cpu_ms_per_example'], 3)} | "
                         f"{_fmt(a['server_cpu_ms_per_example'], 3)} | "
                         f"{_fmt(f['latency_ms'].get('p50'), 2)} / {_fmt(a['latency_ms'].get('p50'), 2)} | {errors} |")
    lines += ["", "The test split as served (the servers' own answers; entropy and MI: AUROC of "
              "flagging the served answer's errors):", "",
              "| model | acc. full | acc. adaptive | NLL full | NLL adaptive | entropy AUROC full | entropy AUROC adaptive | MI AUROC full | MI AUROC adaptive | members evaluated |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, seed in report["seeds"].items():
        f, a = seed["full"], seed["adaptive"]
        lines.append(f"| {name} | {_fmt(100 * f['accuracy'], 2)} | {_fmt(100 * a['accuracy'], 2)} | "
                     f"{_fmt(f['nll'], 4)} | {_fmt(a['nll'], 4)} | {_fmt(f['entropy_auroc'], 4)} | "
                     f"{_fmt(a['entropy_auroc'], 4)} | {_fmt(f['mi_auroc'], 4)} | {_fmt(a['mi_auroc'], 4)} | "
                     f"{_fmt(a['mean_members_evaluated'], 3)} of {_fmt(f['mean_members_evaluated'], 0)} |")
    iv = report["intervals"]
    lines += ["", "Adaptive minus full, paired on the same test examples; mean over seeds and 95% "
              "t-interval over seeds:", "",
              f"- accuracy: {_interval(iv['accuracy'], 100, 2)} points",
              f"- NLL: {_interval(iv['nll'], 1, 4)}",
              f"- entropy error-AUROC: {_interval(iv['entropy_auroc'], 1, 4)}",
              f"- mutual-information error-AUROC: {_interval(iv['mi_auroc'], 1, 4)} (rows answered "
              "by one member have MI 0: no disagreement is observable there)",
              f"- members evaluated: {_interval(iv['mean_members_evaluated'], 1, 3)}",
              "- speed-up (adaptive over full examples/s): " + ", ".join(
                  f"c={c} {_interval(iv['speedup'][c], 1, 2, signed=False)}×" for c in levels), ""]
    consistent = [name for name, seed in report["seeds"].items() if seed["trainer_test"]
                  and abs(seed["trainer_test"]["mean_members_evaluated"]
                          - seed["adaptive"]["mean_members_evaluated"]) < 1e-9]
    lines += [f"The served members-evaluated equal the trainer's own test-split numbers (report "
              f"metrics.json `adaptive.test`) for {len(consistent)} of {len(report['seeds'])} seeds.", "",
              "Goals (issue 27) on this run:", ""]
    for goal, met, numbers in goals(report):
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"- {goal}: {numbers} — **{verdict}**")
    return "\n".join(lines + [""] + triton_lines(report))


# --- command line -------------------------------------------------------------------------------

def _drive_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.adaptive drive")
    parser.add_argument("--target", required=True)
    parser.add_argument("--server-pid", type=int, required=True, help="whose CPU to read")
    parser.add_argument("--plan", type=Path, required=True,
                        help="JSON list of {model, inputs (.npy of single examples), concurrency}")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = asyncio.run(_drive(args.target, json.loads(args.plan.read_text()), args.server_pid,
                                 args.duration, args.warmup))
    args.out.write_text(json.dumps(results, default=str))
    return 0


def _csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def _triton_arm(args: argparse.Namespace) -> TritonArm:
    # Imported here: benchmarks/peers is optional, and a run without Triton never touches it.
    from benchmarks.peers.triton import sweep_settings

    def ints(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    settings = sweep_settings(ints(args.triton_sweep_delays), ints(args.triton_sweep_instances),
                              ints(args.triton_sweep_threads))
    return TritonArm(tuple(settings), args.triton_sweep_duration)


def _render_main(argv: Sequence[str]) -> int:
    """`render [--json FILE]`: the section again from a run's saved numbers (after a change to
    how it is written), into RESULTS.md; the run's own command and time are kept."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive render")
    parser.add_argument("--json", type=Path, default=WORK / "results.json")
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text())
    # JSON keys are strings: the levels and per-concurrency maps are keyed by ints in a run.
    section = render(_int_keys(report), report.get("command", "python -m benchmarks.adaptive"))
    RESULTS.write_text(replace_section(RESULTS.read_text(), SECTION, section))
    print(section)
    return 0


def _int_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_int_keys(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["drive"]:
        return _drive_main(argv[1:])
    if argv[:1] == ["render"]:
        return _render_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=None,
                        help="take the calibrated models here (one per seed) instead of training")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (without --repo)")
    parser.add_argument("--dataset", default=None,
                        help="training data (default mnist1d); with --repo, the test split's "
                             "source (default: the manifest's)")
    parser.add_argument("--width", type=int, default=640,
                        help="cnn1d channels: wide enough that compute dominates request handling")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop levels")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    parser.add_argument("--instances", default=ServerSettings.instances)
    parser.add_argument("--intra-op-threads", default=ServerSettings.intra_op_threads)
    parser.add_argument("--max-batch-size", type=int, default=ServerSettings.max_batch_size)
    parser.add_argument("--max-queue-delay-ms", type=float, default=ServerSettings.max_queue_delay_ms)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per in-process timing")
    parser.add_argument("--json", type=Path, default=WORK / "results.json", help="raw numbers")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    parser.add_argument("--no-triton", action="store_true",
                        help="leave out the tuned Triton (on by default; its venv runs/peers/venv "
                             "is made with pip on first use)")
    parser.add_argument("--triton-sweep-duration", type=float, default=TritonArm.sweep_duration_s,
                        help="measured seconds per level of each Triton sweep point")
    parser.add_argument("--triton-sweep-delays", default=_csv(TRITON_DELAYS_US),
                        help="Triton's max_queue_delay_microseconds values to try")
    parser.add_argument("--triton-sweep-instances", default=_csv(TRITON_INSTANCES),
                        help="Triton model instances to try")
    parser.add_argument("--triton-sweep-threads", default=_csv(TRITON_THREADS),
                        help="ONNX Runtime intra-op threads per Triton instance to try")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        triton = None if args.no_triton else _triton_arm(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repo is not None:
        versions = existing_models(args.repo)
    else:
        versions = train_models(WORK / "repo", [int(s) for s in args.seeds.split(",")],
                                args.dataset or "mnist1d", args.width, args.epochs, args.members)
    settings = ServerSettings(args.instances, args.intra_op_threads, args.max_batch_size,
                              args.max_queue_delay_ms)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        report = run(versions, levels, args.duration, args.warmup, settings, args.dataset,
                     Path(workdir), args.budget, triton)
    command = "python -m benchmarks.adaptive " + " ".join(argv)
    report["written_at"] = time.strftime("%Y-%m-%d %H:%M %Z")
    report["command"] = command.strip()
    section = render(report, command.strip())
    print(section)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not args.no_write:
        RESULTS.write_text(replace_section(RESULTS.read_text() if RESULTS.exists() else "",
                                           SECTION, section))
        logger.info("wrote %s and %s", RESULTS, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
