"""Side by side with NVIDIA Triton: the same ensembles, the same load, Triton at its best setting.

    python -m benchmarks.peers.triton [--models digits resnet20] [--concurrency 1,8,32] \
        [--duration 10] [--warmup 2] [--runs 2] [--sweep-duration 4] \
        [--sweep-delays 0,100,500,2000] [--sweep-instances 1,2] [--sweep-threads 1,2] [--cpp] \
        [--no-write]

Optional, never run in CI, imported by no test. It:

1. makes its own venv (runs/peers/venv) with `nvidia-pytriton` (which ships `tritonserver` and
   the python backend), numpy<2 (what that backend's stubs are built against) and onnxruntime;
2. copies the python backend and the backend stub built for this Python version into
   runs/peers/backends/python/;
3. writes a Triton model repository (runs/peers/triton-repo): per model and per setting of the
   sweep (Triton's dynamic-batcher queue delay, instances, ONNX Runtime intra-op threads), the
   python backend running the version's fused ensemble.onnx with ONNX Runtime
   (benchmarks/peers/triton_model.py; Triton has no ONNX Runtime backend in that wheel), max
   batch 32 as snapserve's default;
4. starts tritonserver with explicit model control and sweeps: each setting's models are loaded,
   driven at every concurrency for `--sweep-duration` seconds, and unloaded; per model the best
   setting is kept (`best_setting`: the highest geometric mean of req/s over the concurrency
   levels, the tail latency breaking near-ties);
5. `--runs` times, back to back: loads Triton's best setting of each model, starts
   `ensemble-server` (no tuning flags: its defaults; with `--cpp`, a C++ front end port as
   well, driven as a third server, and its gRPC port then grpc.aio's: the two front ends
   `grpc_frontend auto` chooses between, where the C++ one is built or not) on 127.0.0.1, and drives them with the same
   closed-loop load, `ensemble-client bench --api kserve` (KServe v2 gRPC, one image per
   request), at each concurrency for `--duration` seconds, snapserve and Triton alternately so
   both see the same machine; server CPU per request counts each server's whole process tree
   (Triton's python backend runs each instance in a stub process of its own);
6. measures the in-process batch-1 ceiling (benchmarks/ceiling.py) and the echo server
   (benchmarks/echo_server.py) in the same run, and writes the "Side by side: Triton" section of
   benchmarks/RESULTS.md (the sweep as a table, every ratio against the best setting) and
   benchmarks/results-peers.json (the whole sweep and every run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from benchmarks.ceiling import measure_ceiling
from benchmarks.ensembles import DIGITS, RESNET20, digits_version, resnet20_version
from benchmarks.serve import (_CLK_TCK, _bench, _cpu_ticks, _echo, _fmt, _free_port, _process,
                              _span, record, stop_process)

__all__ = ["TritonSetting", "best_setting", "main", "sweep_settings"]

# The results' name for snapserve driven through its C++ front end (`--cpp`).
SNAPSERVE_CPP = "snapserve (C++ front end)"

logger = logging.getLogger("benchmarks.peers.triton")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = ROOT / "runs" / "peers"
VENV = WORK / "venv"
SECTION = "Side by side: Triton"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
OUTPUTS = {"probabilities": ("TYPE_FP32", "C"), "predictive_entropy": ("TYPE_FP32", ""),
           "expected_entropy": ("TYPE_FP32", ""), "mutual_information": ("TYPE_FP32", ""),
           "vote_disagreement": ("TYPE_FP32", ""), "member_kl": ("TYPE_FP32", "M"),
           "member_top_class": ("TYPE_INT64", "M")}
MAX_BATCH = 32  # snapserve's default max_batch_size
# What the sweep tries by default: from no wait at all to snapserve's own default delay, one
# instance or one per core, one thread or every core's.
SWEEP_DELAYS_US, SWEEP_INSTANCES, SWEEP_THREADS = (0, 100, 500, 2000), (1, 2), (1, 2)
SWEEP_WARMUP_S = 1.0  # unmeasured seconds before each sweep point: the first batches of a shape
# Sweep points within this fraction of the best geometric mean are a tie: short points on a
# shared machine move by more than that, so the tail latency decides among them.
TIE_FRACTION = 0.05


@dataclass(frozen=True)
class TritonSetting:
    """One configuration of Triton's model: dynamic-batcher delay, instances, ORT threads."""

    delay_us: int
    instances: int
    threads: int

    @property
    def key(self) -> str:
        return f"d{self.delay_us}_i{self.instances}_t{self.threads}"

    def describe(self) -> str:
        return (f"delay {self.delay_us} µs, {self.instances} instance(s) x "
                f"{self.threads} thread(s)")


def sweep_settings(delays_us: Iterable[int], instances: Iterable[int],
                   threads: Iterable[int]) -> list[TritonSetting]:
    return [TritonSetting(d, i, t) for d, i, t in itertools.product(delays_us, instances, threads)]


def _snapserves(rows: dict[str, Any]) -> list[str]:
    """The snapserve rows of a model's results: its default front end, then the C++ one."""
    return [server for server in rows if server != "triton"]


def _tail_ms(level: dict[str, Any]) -> float:
    """The latency a level is judged by: p50 for a lone caller, p99 under load."""
    return level["latency_ms"].get("p50" if level["concurrency"] == 1 else "p99", float("nan"))


def _geomean(values: Iterable[float]) -> float:
    values = list(values)
    if not values or any(not v > 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def best_setting(points: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """The key of the best setting among `points` (setting key -> its levels) and why.

    The highest geometric mean of req/s over the concurrency levels: one setting serves every
    load (a server is not re-tuned per concurrency), and with snapserve's rates fixed it is the
    setting that minimises the geometric mean of the snapserve/Triton ratios, each level
    weighing the same. Settings within TIE_FRACTION of the top are a tie, broken by the lowest
    geometric mean of the tail latency (p50 at c=1, p99 above)."""
    rate = {key: _geomean(l["throughput_rps"] for l in levels) for key, levels in points.items()}
    top = max(rate.values())
    tied = [key for key, r in rate.items() if r >= (1 - TIE_FRACTION) * top]
    tail = {key: _geomean(_tail_ms(l) for l in points[key]) or float("inf") for key in tied}
    best = min(tied, key=lambda key: (tail[key], -rate[key]))
    why = (f"geometric mean {rate[best]:.1f} req/s over c="
           + "/".join(str(l["concurrency"]) for l in points[best])
           + f" (top {top:.1f}); {len(tied)} setting(s) within {TIE_FRACTION:.0%} of the top, "
           f"of which the lowest tail latency (geometric mean {tail[best]:.2f} ms)")
    return best, why


def _site_packages() -> Path:
    return VENV / "lib" / f"python{PY}" / "site-packages"


def _install() -> Path:
    """The venv with nvidia-pytriton (made once); the package's tritonserver folder."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    tritonserver = _site_packages() / "pytriton" / "tritonserver"
    if not (tritonserver / "bin" / "tritonserver").exists():
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "nvidia-pytriton",
                        "numpy<2", "onnxruntime"], check=True)
    return tritonserver


def _backends(tritonserver: Path, backends: Path = WORK / "backends") -> Path:
    """`backends`/python: the python backend and the stub for this Python. Another folder than
    the default keeps a second benchmark from replacing it under a running Triton."""
    python = backends / "python"
    if python.exists():
        shutil.rmtree(python)
    shutil.copytree(tritonserver / "backends" / "python", python)
    stub = tritonserver / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {PY}")
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return backends


def _config(name: str, manifest: dict[str, Any], onnx_path: Path, setting: TritonSetting) -> str:
    spec = manifest["input"]
    sizes = {"C": len(manifest["classes"]), "M": len(manifest["members"])}
    outputs = []
    for out, (datatype, dim) in OUTPUTS.items():
        # A value per example: Triton wants dims, the graph gives [batch]; reshape says so.
        dims = f"[ {sizes[dim]} ]" if dim else "[ 1 ] reshape: { shape: [ ] }"
        outputs.append(f'  {{ name: "{out}" data_type: {datatype} dims: {dims} }}')
    parameters = {"onnx_path": str(onnx_path), "intra_op_threads": str(setting.threads),
                  "temperature": repr(float(manifest.get("temperature", 1.0))),
                  "temperature_input": manifest["ensemble"].get("temperature_input", "temperature")}
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {MAX_BATCH}",
        f'input [ {{ name: "{spec["name"]}" data_type: TYPE_FP32 dims: {list(spec["shape"][1:])} }} ]',
        "output [", ",\n".join(outputs), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {setting.delay_us} }}",
        f"instance_group [ {{ count: {setting.instances} kind: KIND_CPU }} ]",
        *(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
          for k, v in parameters.items())]) + "\n"


def _triton_name(model: str, setting: TritonSetting) -> str:
    return f"{model}_{setting.key}"


def _triton_repo(versions: dict[str, Path], settings: Sequence[TritonSetting],
                 repo: Path = WORK / "triton-repo") -> Path:
    """One Triton model per (model, setting) in `repo`, replaced: explicit model control loads
    a setting's own."""
    if repo.exists():
        shutil.rmtree(repo)
    for (name, version_dir), setting in itertools.product(versions.items(), settings):
        manifest = json.loads((version_dir / "manifest.json").read_text())
        model = repo / _triton_name(name, setting)
        (model / "1").mkdir(parents=True)
        shutil.copy2(HERE / "triton_model.py", model / "1" / "model.py")
        (model / "1" / "site_packages.txt").write_text(f"{_site_packages()}\n")
        onnx_path = (version_dir / manifest["ensemble"]["file"]).resolve()
        (model / "config.pbtxt").write_text(
            _config(_triton_name(name, setting), manifest, onnx_path, setting))
    return repo


@dataclass
class Triton:
    process: subprocess.Popen
    grpc_port: int
    http_port: int

    def _post(self, path: str, timeout_s: float) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                body = answer.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"tritonserver {path}: {exc.code} {exc.read().decode(errors='replace')}")
        return json.loads(body) if body else None

    def load(self, names: Iterable[str]) -> None:
        for name in names:
            self._post(f"/v2/repository/models/{name}/load", timeout_s=300)

    def unload(self, names: Iterable[str]) -> None:
        """Unloads and waits until each is gone: an unload returns before the model's stub
        processes have exited, and the next setting must not share the cores with them."""
        names = set(names)
        for name in names:
            self._post(f"/v2/repository/models/{name}/unload", timeout_s=60)
        deadline = time.monotonic() + 120
        while True:
            index = self._post("/v2/repository/index", timeout_s=30)
            busy = [m["name"] for m in index
                    if m["name"] in names and m.get("state") in ("READY", "UNLOADING")]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver did not unload {busy}")
            time.sleep(0.2)

    @contextmanager
    def loaded(self, names: Sequence[str]) -> Iterator[None]:
        self.load(names)
        try:
            yield
        finally:
            self.unload(names)


@contextmanager
def _triton(tritonserver: Path, backends: Path, repo: Path, log: Path) -> Iterator[Triton]:
    """tritonserver on 127.0.0.1 with explicit model control: it starts with no model loaded."""
    port, http_port = _free_port(), _free_port()
    # numpy<2 and onnxruntime for the stub; the wheel's own libraries, which the copied stub no
    # longer finds through its relative rpath.
    libs = str(_site_packages() / "nvidia_pytriton.libs")
    env = {**os.environ, "PYTHONPATH": str(_site_packages()),
           "LD_LIBRARY_PATH": ":".join(filter(None, [libs, os.environ.get("LD_LIBRARY_PATH")]))}
    command = [str(tritonserver / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--backend-directory", str(backends), "--grpc-address", "127.0.0.1",
               "--grpc-port", str(port), "--http-address", "127.0.0.1",
               "--http-port", str(http_port), "--allow-metrics", "false",
               "--model-control-mode", "explicit", "--cache-directory", str(WORK / "cache")]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while "Started GRPCInferenceService" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield Triton(process, port, http_port)
    finally:
        stop_process(process, timeout_s=60)


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and every live descendant (utime + stime)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            total += (int(stats[current][11]) + int(stats[current][12])) / _CLK_TCK
        todo += children.get(current, [])
    return total


def _level(pid: int, port: int, model: str, concurrency: int, duration: float,
           warmup: float) -> dict[str, Any]:
    load = os.getloadavg()[0]
    cpu0 = _tree_cpu_seconds(pid)
    result = _bench(port, model, f"--concurrency {concurrency}", duration, warmup, "kserve")
    cpu = _tree_cpu_seconds(pid) - cpu0
    answered = result["requests"] + sum(result["errors"].values())
    result["server_cpu_ms_per_request"] = 1e3 * cpu / max(answered * (duration + warmup) / duration, 1)
    result["load_average_1min"] = load
    return result


def _sweep(triton: Triton, models: Sequence[str], settings: Sequence[TritonSetting],
           levels: Sequence[int], duration: float) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every setting's levels per model: model -> setting key -> levels."""
    points: dict[str, dict[str, list[dict[str, Any]]]] = {m: {} for m in models}
    for setting in settings:
        names = {m: _triton_name(m, setting) for m in models}
        with triton.loaded(list(names.values())):
            for model in models:
                points[model][setting.key] = [
                    _level(triton.process.pid, triton.grpc_port, names[model], c, duration,
                           SWEEP_WARMUP_S) for c in levels]
                logger.info("sweep %s %s: %s req/s", model, setting.describe(), " / ".join(
                    f"{l['throughput_rps']:.0f}" for l in points[model][setting.key]))
    return points


def _compare(triton: Triton, models: Sequence[str], best: dict[str, TritonSetting],
             snapserve_cmd: list[str], levels: Sequence[int], duration: float, warmup: float,
             workdir: Path, run_index: int, cpp_port: int | None) -> dict[str, Any]:
    """One run: Triton's best settings loaded, a fresh snapserve, driven alternately; with
    `cpp_port`, the same snapserve through its C++ front end too (SNAPSERVE_CPP)."""
    names = {m: _triton_name(m, best[m]) for m in models}
    log = WORK / f"snapserve-{run_index + 1}.log"  # kept: a server that fails says why there
    result: dict[str, Any] = {"load_average_before": os.getloadavg(), "models": {}}
    ticks, stolen = _cpu_ticks()
    with triton.loaded(list(names.values())), _process(snapserve_cmd, log) as (
            snapserve, snapserve_port):
        result["snapserve_load_log"] = [line for line in log.read_text().splitlines()
                                        if "serving the" in line or "gRPC port " in line]
        for model in models:
            rows: dict[str, list[dict[str, Any]]] = {"snapserve": [], "triton": []}
            if cpp_port is not None:
                rows[SNAPSERVE_CPP] = []
            for c in levels:  # alternately, so all see the same machine
                rows["snapserve"].append(_level(snapserve.pid, snapserve_port, model, c,
                                                duration, warmup))
                if cpp_port is not None:
                    rows[SNAPSERVE_CPP].append(_level(snapserve.pid, cpp_port, model, c,
                                                      duration, warmup))
                rows["triton"].append(_level(triton.process.pid, triton.grpc_port, names[model],
                                             c, duration, warmup))
                logger.info("run %d %s c=%d: %s", run_index + 1, model, c, ", ".join(
                    f"{server} {row[-1]['throughput_rps']:.1f} req/s"
                    for server, row in rows.items()))
            result["models"][model] = rows
    # A virtual machine's host can take cores away mid-run (steal): rates then drop for every
    # server in turn, and the ratios of those minutes are noise.
    ticks_after, stolen_after = _cpu_ticks()
    result["cpu_stolen_share"] = (stolen_after - stolen) / max(ticks_after - ticks, 1)
    return result


def run(models: Sequence[str], levels: Sequence[int], duration: float, warmup: float,
        settings: Sequence[TritonSetting], sweep_duration: float, runs: int,
        workdir: Path, cpp: bool = False) -> dict[str, Any]:
    tritonserver = _install()
    backends = _backends(tritonserver)
    repository = ROOT / "runs" / "benchmarks" / "repo"
    builders = {DIGITS: digits_version, RESNET20: resnet20_version}
    versions = {m: builders[m](repository) for m in models}
    only = workdir / "repo"  # the benchmark models alone
    only.mkdir()
    for name, version_dir in versions.items():
        (only / name).symlink_to(version_dir.parent.resolve(), target_is_directory=True)
    report: dict[str, Any] = {
        "load_average_before": os.getloadavg(), "levels": list(levels),
        "duration_s": duration, "warmup_s": warmup,
        "sweep": {"duration_s": sweep_duration, "warmup_s": SWEEP_WARMUP_S,
                  "tie_fraction": TIE_FRACTION, "settings": [asdict(s) | {"key": s.key}
                                                             for s in settings]}}
    snapserve_cmd = [sys.executable, "-m", "snapserve.server", "--model-repository", str(only),
                     "--port", "0", "--http-port", "0", "--device", "cpu"]  # its defaults
    cpp_port = _free_port() if cpp else None
    if cpp_port is not None:  # the same server, its unary calls also through the C++ front end
        snapserve_cmd += ["--cpp-grpc-port", str(cpp_port)]
    by_key = {s.key: s for s in settings}
    with _triton(tritonserver, backends, _triton_repo(versions, settings),
                 WORK / "triton.log") as triton:
        points = _sweep(triton, models, settings, levels, sweep_duration)
        best: dict[str, TritonSetting] = {}
        report["sweep"]["points"] = points
        report["sweep"]["best"] = {}
        for model in models:
            key, why = best_setting(points[model])
            best[model] = by_key[key]
            report["sweep"]["best"][model] = {"key": key, **asdict(by_key[key]), "why": why}
            logger.info("%s: Triton's best setting is %s (%s)", model, by_key[key].describe(), why)
        report["runs"] = [_compare(triton, models, best, snapserve_cmd, levels, duration, warmup,
                                   workdir, index, cpp_port) for index in range(runs)]
    report["ceiling"] = {}
    for model in models:
        ceiling = measure_ceiling(versions[model], [1], budget_s=0.5)
        report["ceiling"][model] = {"batch1_ms": 1e3 * ceiling.latency(1).seconds,
                                    "setup": ceiling.latency(1).setup}
    report["echo_c32"] = _echo(["--concurrency 32"], duration, warmup, workdir)[0]
    report["load_average_after"] = os.getloadavg()
    return report


def _cell(level: dict[str, Any]) -> str:
    return f"{_fmt(level['throughput_rps'])} ({_fmt(_tail_ms(level), 1)})"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _sweep_lines(report: dict[str, Any], levels: Sequence[int], head: str) -> list[str]:
    sweep = report["sweep"]
    keys = {s["key"]: s for s in sweep["settings"]}
    lines = [f"Triton's sweep ({sweep['duration_s']:g} s points after {sweep['warmup_s']:g} s "
             "unmeasured; req/s, with p50 at c=1 and p99 above, in ms; **bold**: the setting "
             "kept, against which every ratio below is computed):", "",
             f"| model | delay µs | instances x threads | {head} | geometric mean req/s |",
             "|---|---:|---:|" + "---:|" * (len(levels) + 1)]
    for model, points in sweep["points"].items():
        chosen = sweep["best"][model]["key"]
        for key, row in points.items():
            s = keys[key]
            cells = " | ".join(_cell(l) for l in row)
            mean = _fmt(_geomean(l["throughput_rps"] for l in row))
            mark = "**" if key == chosen else ""
            lines.append(f"| {mark}{model}{mark} | {s['delay_us']} | {s['instances']} x "
                         f"{s['threads']} | {cells} | {mark}{mean}{mark} |")
    lines.append("")
    for model, best in sweep["best"].items():
        lines.append(f"- {model}: Triton at {best['delay_us']} µs, {best['instances']} "
                     f"instance(s) x {best['threads']} thread(s): {best['why']}.")
        peaks = []
        for index, c in enumerate(levels):
            key, row = max(sweep["points"][model].items(),
                           key=lambda item: item[1][index]["throughput_rps"])
            peaks.append(f"c={c} {key} {_fmt(row[index]['throughput_rps'])}")
        lines.append(f"  The best of the sweep at each level alone: {', '.join(peaks)} req/s.")
    return lines


def _ratios(snap: dict[str, Any], triton: dict[str, Any]) -> tuple[float, float]:
    rate = snap["throughput_rps"] / triton["throughput_rps"] if triton["throughput_rps"] else float("nan")
    return rate, _tail_ms(snap) / _tail_ms(triton)


def _verdicts(report: dict[str, Any], levels: Sequence[int]) -> list[str]:
    """Issue 23's targets, met only when met in every run; issue 12's against the floor."""
    runs = report["runs"]
    lines = []
    for model in runs[0]["models"]:
        for server in _snapserves(runs[0]["models"][model]):
            for index, c in enumerate(levels):
                pairs = [_ratios(r["models"][model][server][index],
                                 r["models"][model]["triton"][index]) for r in runs]
                rates, tails = [p[0] for p in pairs], [p[1] for p in pairs]
                pct = "p50" if c == 1 else "p99"
                line = (f"- {model} c={c}, {server}: req/s {_span(rates)}x tuned Triton's "
                        f"(target >= 1.1: {_verdict(min(rates) >= 1.1)}), {pct} {_span(tails)}x")
                lines.append(line + (f" (target <= 0.9: {_verdict(max(tails) <= 0.9)})"
                                     if c > 1 else ""))
        ceiling = report["ceiling"][model]
        if levels[0] == 1:
            p50s = [r["models"][model]["snapserve"][0]["latency_ms"].get("p50", float("nan"))
                    for r in runs]
            best = ceiling["batch1_ms"]
            lines.append(f"- {model} c=1 p50 {_span(p50s)} ms against the best in-process batch-1 "
                         f"call {best:.2f} ms ({ceiling['setup']}): {_span([p / best for p in p50s])}x "
                         f"(issue 12's target <= 1.15: {_verdict(max(p50s) <= 1.15 * best)})")
    if DIGITS in runs[0]["models"]:
        peer = [r["models"][DIGITS]["triton"][-1]["server_cpu_ms_per_request"] for r in runs]
        echo = report["echo_c32"]["server_cpu_ms_per_request"]
        for server in _snapserves(runs[0]["models"][DIGITS]):
            snap = [r["models"][DIGITS][server][-1]["server_cpu_ms_per_request"] for r in runs]
            lines.append(f"- digits server CPU per request at c={levels[-1]}: {server} "
                         f"{_span(snap, '.3f')} ms, tuned Triton {_span(peer, '.3f')} ms (target "
                         f"<= Triton's: {_verdict(all(s <= t for s, t in zip(snap, peer)))}); "
                         f"the echo server {echo:.3f} ms (issue 12's target <= 1.5x the echo: "
                         f"{_verdict(max(snap) <= 1.5 * echo)})")
    return lines


def render(report: dict[str, Any], levels: Sequence[int]) -> str:
    head = " | ".join(f"c={c} req/s ({'p50' if c == 1 else 'p99'} ms)" for c in levels)
    runs = report["runs"]
    lines = [f"## {SECTION}", "",
             f"Written by `python -m benchmarks.peers.triton` on {time.strftime('%Y-%m-%d %H:%M %Z')}: "
             "KServe v2 gRPC, `ensemble-client bench --api kserve`, closed loop, one image per "
             "request, client and both servers on this machine's cores. Triton: `tritonserver` "
             "from nvidia-pytriton, the python backend running the fused ensemble.onnx in ONNX "
             f"Runtime, its dynamic batcher (max batch {MAX_BATCH}), at the best setting of a "
             "sweep of its queue delay, instances and intra-op threads per model (below). "
             "snapserve: `ensemble-server --device cpu`, no tuning flags"
             + (" but `--cpp-grpc-port`, its unary calls driven through grpc.aio's port "
                "(`snapserve`) and through the C++ front end's (`snapserve (C++ front end)`)"
                if any(SNAPSERVE_CPP in rows for rows in runs[0]["models"].values()) else "")
             + ". Then "
             f"{len(runs)} run(s) back to back, each with a fresh snapserve, snapserve and Triton "
             f"alternately at each level, {report['duration_s']:g} s per level.", "",
             f"- Load average (1 min) before: {report['load_average_before'][0]:.2f}, after: "
             f"{report['load_average_after'][0]:.2f}; per point in the JSON "
             "(benchmarks/results-peers.json, with the whole sweep). Above ~1.5 the comparison "
             "is noise-ridden.", "", *_sweep_lines(report, levels, head), ""]
    for index, result in enumerate(runs):
        stolen = result.get("cpu_stolen_share")
        lines += [f"Run {index + 1} (load average before {result['load_average_before'][0]:.2f}"
                  + ("" if stolen is None else f"; CPU time stolen by the host {100 * stolen:.1f}%")
                  + "):",
                  *(f"- snapserve at load: `{line.split(': ', 1)[-1]}`"
                    for line in result["snapserve_load_log"]), "",
                  f"| model, server | {head} | server CPU ms/req at c={levels[-1]} |",
                  "|---|" + "---:|" * (len(levels) + 1)]
        for model, rows in result["models"].items():
            for server in rows:
                cells = " | ".join(_cell(l) for l in rows[server])
                lines.append(f"| {model}: {server} | {cells} | "
                             f"{_fmt(rows[server][-1]['server_cpu_ms_per_request'], 3)} |")
            for server in _snapserves(rows):
                ratios = [_ratios(s, t) for s, t in zip(rows[server], rows["triton"])]
                lines.append(f"| {model}: {server} / Triton | "
                             + " | ".join(f"{r:.2f}x ({t:.2f}x)" for r, t in ratios) + " | |")
        lines.append("")
    lines += ["(req/s, with p50 at c=1 and p99 above, in ms; the ratio row: snapserve's req/s "
              "over Triton's, and its latency over Triton's.)", "",
              "Targets (issue 23, met only when met in every run):", *_verdicts(report, levels), ""]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[DIGITS, RESNET20], choices=[DIGITS, RESNET20])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="measured seconds per level of the final comparison")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2, help="final comparisons, back to back")
    parser.add_argument("--sweep-duration", type=float, default=4.0,
                        help="measured seconds per level of each sweep point")
    parser.add_argument("--sweep-delays", default=",".join(map(str, SWEEP_DELAYS_US)),
                        help="Triton's max_queue_delay_microseconds values to try")
    parser.add_argument("--sweep-instances", default=",".join(map(str, SWEEP_INSTANCES)))
    parser.add_argument("--sweep-threads", default=",".join(map(str, SWEEP_THREADS)),
                        help="ONNX Runtime intra-op threads per Triton instance")
    parser.add_argument("--cpp", action="store_true",
                        help="also drive snapserve's C++ gRPC front end (--cpp-grpc-port; needs "
                             "g++ and libgrpc++), alternately with the rest")
    parser.add_argument("--no-write", action="store_true",
                        help="print, do not write RESULTS.md or results-peers.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    levels = _ints(args.concurrency)
    settings = sweep_settings(_ints(args.sweep_delays), _ints(args.sweep_instances),
                              _ints(args.sweep_threads))
    if not settings or args.runs < 1:
        parser.error("the sweep needs at least one setting, and --runs at least 1")
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        report = run(args.models, levels, args.duration, args.warmup, settings,
                     args.sweep_duration, args.runs, Path(workdir), args.cpp)
    section = render(report, levels)
    print(section)
    if not args.no_write:
        record(SECTION, section, ROOT / "benchmarks" / "results-peers.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
