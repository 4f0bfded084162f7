"""Side by side with NVIDIA Triton: the same ensembles, the same load, one run.

    python -m benchmarks.peers.triton [--models digits resnet20] [--concurrency 1,8,32] \
        [--duration 10] [--warmup 2] [--no-write]

Optional, never run in CI, imported by no test. It:

1. makes its own venv (runs/peers/venv) with `nvidia-pytriton` (which ships `tritonserver` and
   the python backend), numpy<2 (what that backend's stubs are built against) and onnxruntime;
2. copies the python backend and the backend stub built for this Python version into
   runs/peers/backends/python/;
3. writes a Triton model repository (runs/peers/triton-repo): per model, the python backend
   running the version's fused ensemble.onnx with ONNX Runtime (benchmarks/peers/triton_model.py;
   Triton has no ONNX Runtime backend in that wheel), Triton's dynamic batcher (max batch 32,
   2 ms queue delay, as snapserve's defaults), 2 instances x 1 thread;
4. starts tritonserver and `ensemble-server` (no tuning flags: its defaults) on 127.0.0.1;
5. drives both with the same closed-loop load, `ensemble-client bench --api kserve` (KServe v2
   gRPC, one image per request), at each concurrency, snapserve and Triton alternately so
   both see the same machine; server CPU per request counts each server's whole process tree
   (Triton's python backend runs each instance in a stub process of its own);
6. measures the in-process batch-1 ceiling (benchmarks/ceiling.py) and the echo server
   (benchmarks/echo_server.py) in the same run, and writes the "Side by side: Triton" section of
   benchmarks/RESULTS.md with the ratios against the issue-12 targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks.ceiling import measure_ceiling
from benchmarks.ensembles import DIGITS, RESNET20, digits_version, resnet20_version
from benchmarks.serve import (_CLK_TCK, RESULTS, _bench, _echo, _fmt, _free_port, _process,
                              replace_section, stop_process)

__all__ = ["main"]

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
TRITON_INSTANCES, TRITON_THREADS = 2, 1


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


def _backends(tritonserver: Path) -> Path:
    """runs/peers/backends/python: the python backend and the stub for this Python."""
    backends = WORK / "backends"
    python = backends / "python"
    if python.exists():
        shutil.rmtree(python)
    shutil.copytree(tritonserver / "backends" / "python", python)
    stub = tritonserver / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {PY}")
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return backends


def _config(name: str, manifest: dict[str, Any], onnx_path: Path, max_batch: int) -> str:
    spec = manifest["input"]
    sizes = {"C": len(manifest["classes"]), "M": len(manifest["members"])}
    outputs = []
    for out, (datatype, dim) in OUTPUTS.items():
        # A value per example: Triton wants dims, the graph gives [batch]; reshape says so.
        dims = f"[ {sizes[dim]} ]" if dim else "[ 1 ] reshape: { shape: [ ] }"
        outputs.append(f'  {{ name: "{out}" data_type: {datatype} dims: {dims} }}')
    parameters = {"onnx_path": str(onnx_path), "intra_op_threads": str(TRITON_THREADS),
                  "temperature": repr(float(manifest.get("temperature", 1.0))),
                  "temperature_input": manifest["ensemble"].get("temperature_input", "temperature")}
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}",
        f'input [ {{ name: "{spec["name"]}" data_type: TYPE_FP32 dims: {list(spec["shape"][1:])} }} ]',
        "output [", ",\n".join(outputs), "]",
        "dynamic_batching { max_queue_delay_microseconds: 2000 }",
        f"instance_group [ {{ count: {TRITON_INSTANCES} kind: KIND_CPU }} ]",
        *(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
          for k, v in parameters.items())]) + "\n"


def _triton_repo(versions: dict[str, Path], max_batch: int) -> Path:
    repo = WORK / "triton-repo"
    if repo.exists():
        shutil.rmtree(repo)
    for name, version_dir in versions.items():
        manifest = json.loads((version_dir / "manifest.json").read_text())
        model = repo / name
        (model / "1").mkdir(parents=True)
        shutil.copy2(HERE / "triton_model.py", model / "1" / "model.py")
        (model / "1" / "site_packages.txt").write_text(f"{_site_packages()}\n")
        onnx_path = (version_dir / manifest["ensemble"]["file"]).resolve()
        (model / "config.pbtxt").write_text(_config(name, manifest, onnx_path, max_batch))
    return repo


@contextmanager
def _triton(tritonserver: Path, backends: Path, repo: Path, log: Path
            ) -> Iterator[tuple[subprocess.Popen, int]]:
    port = _free_port()
    # numpy<2 and onnxruntime for the stub; the wheel's own libraries, which the copied stub no
    # longer finds through its relative rpath.
    libs = str(_site_packages() / "nvidia_pytriton.libs")
    env = {**os.environ, "PYTHONPATH": str(_site_packages()),
           "LD_LIBRARY_PATH": ":".join(filter(None, [libs, os.environ.get("LD_LIBRARY_PATH")]))}
    command = [str(tritonserver / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--backend-directory", str(backends), "--grpc-address", "127.0.0.1",
               "--grpc-port", str(port), "--http-address", "127.0.0.1",
               "--http-port", str(_free_port()), "--allow-metrics", "false",
               "--cache-directory", str(WORK / "cache")]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while "Started GRPCInferenceService" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield process, port
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


def run(models: Sequence[str], levels: Sequence[int], duration: float, warmup: float,
        workdir: Path) -> dict[str, Any]:
    tritonserver = _install()
    backends = _backends(tritonserver)
    repository = ROOT / "runs" / "benchmarks" / "repo"
    builders = {DIGITS: digits_version, RESNET20: resnet20_version}
    versions = {m: builders[m](repository) for m in models}
    only = workdir / "repo"  # the benchmark models alone
    only.mkdir()
    for name, version_dir in versions.items():
        (only / name).symlink_to(version_dir.parent.resolve(), target_is_directory=True)
    report: dict[str, Any] = {"load_average_before": os.getloadavg(), "models": {}}
    snapserve_cmd = [sys.executable, "-m", "snapserve.server", "--model-repository", str(only),
                     "--port", "0", "--http-port", "0", "--device", "cpu"]  # its defaults
    with _triton(tritonserver, backends, _triton_repo(versions, 32), WORK / "triton.log") as (
            triton, triton_port), _process(snapserve_cmd, workdir / "snapserve.log") as (
            snapserve, snapserve_port):
        report["snapserve_load_log"] = [line for line in (workdir / "snapserve.log").read_text()
                                        .splitlines() if "serving the" in line]
        for model in models:
            rows: dict[str, list[dict[str, Any]]] = {"snapserve": [], "triton": []}
            for c in levels:  # alternately, so both see the same machine
                rows["snapserve"].append(_level(snapserve.pid, snapserve_port, model, c,
                                                duration, warmup))
                rows["triton"].append(_level(triton.pid, triton_port, model, c, duration, warmup))
                logger.info("%s c=%d: snapserve %.1f req/s, triton %.1f req/s", model, c,
                            rows["snapserve"][-1]["throughput_rps"],
                            rows["triton"][-1]["throughput_rps"])
            report["models"][model] = rows
    for model in models:
        ceiling = measure_ceiling(versions[model], [1], budget_s=0.5)
        report["models"][model]["ceiling_batch1_ms"] = 1e3 * ceiling.latency(1).seconds
        report["models"][model]["ceiling_batch1_setup"] = ceiling.latency(1).setup
    report["echo_c32"] = _echo(["--concurrency 32"], duration, warmup, workdir)[0]
    report["load_average_after"] = os.getloadavg()
    return report


def _cell(level: dict[str, Any], percentile: str) -> str:
    return (f"{_fmt(level['throughput_rps'])} ({_fmt(level['latency_ms'].get(percentile), 1)})")


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(report: dict[str, Any], levels: Sequence[int]) -> str:
    echo_cpu = report["echo_c32"]["server_cpu_ms_per_request"]
    head = " | ".join(f"c={c} req/s ({'p50' if c == 1 else 'p99'} ms)" for c in levels)
    lines = [f"## {SECTION}", "",
             f"Written by `python -m benchmarks.peers.triton` on {time.strftime('%Y-%m-%d %H:%M %Z')}: "
             "KServe v2 gRPC, `ensemble-client bench --api kserve`, closed loop, one image per "
             "request, client and both servers on this machine's cores, snapserve and Triton "
             "alternately at each level. Triton: `tritonserver` from nvidia-pytriton, the python "
             "backend running the fused ensemble.onnx in ONNX Runtime, its dynamic batcher (max "
             f"batch 32, 2 ms), {TRITON_INSTANCES} instances x {TRITON_THREADS} thread. snapserve: "
             "`ensemble-server --device cpu`, no tuning flags.", "",
             f"- Load average (1 min) before: {report['load_average_before'][0]:.2f}, after: "
             f"{report['load_average_after'][0]:.2f}; per level in the JSON "
             "(benchmarks/results-peers.json). Above ~1.5 the comparison is noise-ridden.",
             *(f"- snapserve at load: `{line.split(': ', 1)[-1]}`" for line in report["snapserve_load_log"]),
             "", f"| model, server | {head} | server CPU ms/req at c={levels[-1]} |",
             "|---|" + "---:|" * (len(levels) + 1)]
    verdicts = []
    for model, rows in report["models"].items():
        for server in ("triton", "snapserve"):
            cells = " | ".join(_cell(l, "p50" if l["concurrency"] == 1 else "p99") for l in rows[server])
            lines.append(f"| {model}: {server} | {cells} | "
                         f"{_fmt(rows[server][-1]['server_cpu_ms_per_request'], 3)} |")
        ratios = []
        for s, t in zip(rows["snapserve"], rows["triton"]):
            pct = "p50" if s["concurrency"] == 1 else "p99"
            rate = s["throughput_rps"] / t["throughput_rps"] if t["throughput_rps"] else float("nan")
            tail = s["latency_ms"].get(pct, float("nan")) / t["latency_ms"].get(pct, float("nan"))
            ratios.append(f"{rate:.2f}x ({tail:.2f}x)")
            verdicts.append(f"- {model} c={s['concurrency']}: req/s {rate:.2f}x Triton's (target "
                            f">= 1.1: {_verdict(rate >= 1.1)}), {pct} {tail:.2f}x (target <= 0.75: "
                            f"{_verdict(tail <= 0.75)})")
        lines.append(f"| {model}: snapserve / Triton | " + " | ".join(ratios) + " | |")
        c1 = rows["snapserve"][0]
        if c1["concurrency"] == 1:
            best = rows["ceiling_batch1_ms"]
            p50 = c1["latency_ms"].get("p50", float("nan"))
            verdicts.append(f"- {model} c=1 p50 {p50:.2f} ms against the best in-process batch-1 "
                            f"call {best:.2f} ms ({rows['ceiling_batch1_setup']}): {p50 / best:.2f}x "
                            f"(target <= 1.15: {_verdict(p50 <= 1.15 * best)})")
    cheap = report["models"].get(DIGITS)
    if cheap is not None:
        cpu = cheap["snapserve"][-1]["server_cpu_ms_per_request"]
        verdicts.append(f"- digits server CPU per request at c={levels[-1]}: {cpu:.3f} ms against the "
                        f"echo server's {echo_cpu:.3f} ms: {cpu / echo_cpu:.2f}x (target <= 1.5: "
                        f"{_verdict(cpu <= 1.5 * echo_cpu)})")
    lines += ["", "(req/s, with p50 at c=1 and p99 above, in ms; the ratio row: snapserve's req/s "
              "over Triton's, and its latency over Triton's.)", "", "Targets (issue 12):", *verdicts, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[DIGITS, RESNET20], choices=[DIGITS, RESNET20])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    levels = [int(c) for c in args.concurrency.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        report = run(args.models, levels, args.duration, args.warmup, Path(workdir))
    section = render(report, levels)
    print(section)
    if not args.no_write:
        RESULTS.write_text(replace_section(RESULTS.read_text(), SECTION, section))
        (ROOT / "benchmarks" / "results-peers.json").write_text(
            json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
