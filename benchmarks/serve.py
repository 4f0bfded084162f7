"""The serving benchmark: the real server, driven by `ensemble-client bench`, against the ceiling.

    python -m benchmarks.serve [--duration 10] [--concurrency 1,8,32,64] [--instances auto]

1. Builds the benchmark models (benchmarks/ensembles.py) in runs/benchmarks/repo.
2. Measures the ceiling of each (benchmarks/ceiling.py): in-process ONNX Runtime, no gRPC.
3. Measures what gRPC and the client alone cost: the bench client against a server that
   computes nothing (benchmarks/echo_server.py).
4. For each model, starts `ensemble-server` (a subprocess), runs `ensemble-client bench` (another
   subprocess, one per level so each level's server CPU time can be read), stops the server.
   At concurrency 32 the same server is also driven over KServe v2 gRPC and over KServe v2 REST
   (JSON tensors, and Triton's binary tensor extension): the front ends side by side.
5. Compares: at each level, the server's examples/s against the ceiling on the same mix of batch
   sizes (the server's own batch counts, from KServe ModelStatistics); at concurrency 1, p50
   latency against the ceiling's batch-1 latency.
6. Writes the "Serving" section of benchmarks/RESULTS.md (other sections are kept) and the raw
   numbers to benchmarks/results-serving.json.

Client and server share this machine's cores: what the client uses is reported with the rest.
Run it on a quiet machine (the load average goes into the results).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc
import numpy as np
import onnxruntime as ort

from benchmarks.ceiling import Ceiling, default_batch_sizes, format_table, measure_ceiling
from benchmarks.ensembles import DIGITS, RESNET20, digits_version, resnet20_version

__all__ = ["ServerSettings", "main", "model_alone", "replace_section", "run_suite"]

logger = logging.getLogger("benchmarks.serve")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
RAW = HERE / "results-serving.json"
SECTION = "Serving"
_SERVING_ON = re.compile(r"serving on (\S+):(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerSettings:
    instances: int | str = "auto"  # the server's own defaults (engine/cores.py)
    intra_op_threads: int | str = "auto"
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    graph: str = "auto"

    def flags(self) -> list[str]:
        return ["--instances", str(self.instances), "--intra-op-threads", str(self.intra_op_threads),
                "--max-batch-size", str(self.max_batch_size),
                "--max-queue-delay-ms", str(self.max_queue_delay_ms), "--graph", self.graph,
                "--device", "cpu"]


def _cpu_ticks() -> tuple[int, int]:
    """The machine's CPU time so far, in ticks: (all of it, the part the host stole). A virtual
    machine's host can take cores away mid-run: every server then slows in turn, and the
    ratios of those minutes are noise."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields), fields[7]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def _wait_for_port(log: Path, process: subprocess.Popen, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = _SERVING_ON.search(log.read_text(errors="replace"))
        if match:
            return int(match.group(2))
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        time.sleep(0.1)
    raise RuntimeError(f"the server did not start in {timeout_s} s:\n{log.read_text()}")


@contextmanager
def _process(command: list[str], log: Path,
             env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env=env)
    try:
        yield process, _wait_for_port(log, process)
    finally:
        stop_process(process, timeout_s=30)


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL if it has not exited in `timeout_s`."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _bench(port: int, model: str, level: str, duration: float, warmup: float,
           api: str = "native", http_data: str = "json") -> dict[str, Any]:
    """One `ensemble-client bench` run (a subprocess, so its CPU is its own); its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "snapserve.client", "bench", "--target", f"127.0.0.1:{port}",
                        "--model", model, *level.split(), "--duration", str(duration),
                        "--warmup", str(warmup), "--api", api, "--http-data", http_data,
                        "--json", out.name],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())["levels"][0]


def _measured_level(process: subprocess.Popen, port: int, model: str, level: str,
                    duration: float, warmup: float, api: str = "native",
                    http_data: str = "json") -> dict[str, Any]:
    cpu0, began = _cpu_seconds(process.pid), time.perf_counter()
    result = _bench(port, model, level, duration, warmup, api, http_data)
    cpu, wall = _cpu_seconds(process.pid) - cpu0, time.perf_counter() - began
    answered = result["requests"] + sum(result["errors"].values())
    # Over warm-up and window together: the rate is about the same in both.
    result["server_cpu_ms_per_request"] = 1e3 * cpu / max(answered * (duration + warmup) / duration, 1)
    result["server_cpu_share"] = cpu / wall
    return result


def model_alone(repository: Path, model: str, workdir: Path) -> Path:
    """A repository in `workdir` of this model alone (a link), so nothing else loads."""
    only = workdir / f"repo-{model}"
    if not only.exists():
        only.mkdir()
        (only / model).symlink_to((repository / model).resolve(), target_is_directory=True)
    return only


def _serve_model(repository: Path, model: str, settings: ServerSettings, levels: Sequence[str],
                 duration: float, warmup: float, workdir: Path) -> dict[str, Any]:
    only = model_alone(repository, model, workdir)
    http_port = _free_port()
    command = [sys.executable, "-m", "snapserve.server", "--model-repository", str(only),
               "--port", "0", "--http-port", str(http_port), *settings.flags()]
    log = workdir / f"server-{model}.log"
    results = []
    with _process(command, log) as (process, port):
        for level in levels:
            results.append(_measured_level(process, port, model, level, duration, warmup))
            logger.info("%s %s: %.1f ex/s, p50 %.2f ms", model, level,
                        results[-1]["examples_per_s"], results[-1]["latency_ms"].get("p50", np.nan))
        c32 = "--concurrency 32"
        apis = {"kserve": _measured_level(process, port, model, c32, duration, warmup, "kserve"),
                "http_json": _measured_level(process, http_port, model, c32, duration, warmup,
                                             "http", "json"),
                "http_binary": _measured_level(process, http_port, model, c32, duration, warmup,
                                               "http", "binary")}
    graph = re.search(rf"{model} version \d+: serving the (\w+) graph on \d+ instance\(s\)"
                      r"(?:.*; measured (.*))?", log.read_text())
    # grpc_frontend auto: the C++ front end where it is built on this machine, else grpc.aio.
    frontend = re.search(r"gRPC port \S+: (.*)$", log.read_text(), re.MULTILINE)
    return {"levels": results, "kserve_c32": apis["kserve"], "apis_c32": apis,
            "graph": graph.group(1) if graph else "?", "graph_timing": graph.group(2) if graph else None,
            "grpc_frontend": frontend.group(1) if frontend else None}


def _free_port() -> int:
    """A free port for the REST front end (its --http-port 0 means off, not any)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _echo(levels: Sequence[str], duration: float, warmup: float, workdir: Path,
          delay_ms: float = 0.0) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "benchmarks.echo_server", "--port", "0",
               "--delay-ms", str(delay_ms)]
    results = []
    with _process(command, workdir / f"echo-{delay_ms}.log") as (process, port):
        for level in levels:
            results.append(_measured_level(process, port, "echo", level, duration, warmup))
    return results


def _ratio_rows(ceiling: Ceiling, levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for level in levels:
        batches = {int(k): v for k, v in (level.get("server_batches") or {}).items()}
        mean_batch = (sum(k * v for k, v in batches.items()) / sum(batches.values())
                      if batches else float("nan"))
        nan = float("nan")
        ceiling_mix = ceiling.examples_per_s_for_mix(batches) if batches else nan
        single = ceiling.examples_per_s_for_mix(batches, single_caller=True) if batches else nan
        rows.append({"concurrency": level["concurrency"], "examples_per_s": level["examples_per_s"],
                     "p50_ms": level["latency_ms"].get("p50"), "p99_ms": level["latency_ms"].get("p99"),
                     "errors": sum(level["errors"].values()), "mean_batch": mean_batch,
                     "ceiling_examples_per_s": ceiling_mix,
                     "ratio": level["examples_per_s"] / ceiling_mix if batches else nan,
                     "single_caller_examples_per_s": single,
                     "single_caller_ratio": level["examples_per_s"] / single if batches else nan,
                     "client_cpu_ms": level["client_cpu_ms_per_request"],
                     "server_cpu_ms": level["server_cpu_ms_per_request"]})
    return rows


def _busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (all cores)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def _own_seconds() -> float:
    """CPU seconds of this process and its finished children (servers, clients)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(int(memory) / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "grpcio": grpc.__version__, "numpy": np.__version__,
            "load_average_before": os.getloadavg()}


def run_suite(models: Sequence[str], levels: Sequence[int], duration: float, warmup: float,
              settings: ServerSettings, repository: Path, workdir: Path) -> dict[str, Any]:
    machine = _machine()
    logger.info("load average %s", machine["load_average_before"])
    versions = {DIGITS: digits_version, RESNET20: resnet20_version}
    level_args = [f"--concurrency {c}" for c in levels]
    report: dict[str, Any] = {"machine": machine, "settings": settings.__dict__,
                              "duration_s": duration, "warmup_s": warmup, "models": {}}
    busy0, own0, began = _busy_seconds(), _own_seconds(), time.monotonic()
    for model in models:
        version_dir = versions[model](repository)
        logger.info("%s: ceiling", model)
        ceiling = measure_ceiling(version_dir, default_batch_sizes(settings.max_batch_size),
                                  budget_s=0.5)
        logger.info("%s ceiling:\n%s", model, format_table(ceiling))
        served = _serve_model(repository, model, settings, level_args, duration, warmup, workdir)
        # The c=1 floor: the same client and gRPC, and an off-loop wait as long as the model's
        # batch-1 compute, with no model, batcher or scores at all.
        floor = _echo(["--concurrency 1"], duration, warmup, workdir,
                      1e3 * ceiling.latency(1).seconds)[0]
        report["models"][model] = {
            "c1_floor_p50_ms": floor["latency_ms"].get("p50"),
            "version_dir": str(version_dir.relative_to(ROOT)) if version_dir.is_relative_to(ROOT)
            else str(version_dir),
            "ceiling": ceiling.to_json(), "ceiling_table": format_table(ceiling),
            "ceiling_batch1_ms": 1e3 * ceiling.latency(1).seconds,
            "ceiling_batch1_after_gap_ms": 1e3 * (ceiling.batch1_after_gap_s or float("nan")),
            **served,
            "rows": _ratio_rows(ceiling, served["levels"])}
    logger.info("echo server (gRPC and the client alone)")
    report["echo"] = _echo(["--concurrency 1", "--concurrency 32"], duration, warmup, workdir)
    report["machine"]["load_average_after"] = os.getloadavg()
    # The load average counts this benchmark's own processes; this counts everyone else's.
    others = max(_busy_seconds() - busy0 - (_own_seconds() - own0), 0.0)
    report["machine"]["others_cpu_share"] = others / (time.monotonic() - began) / (os.cpu_count() or 1)
    return report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _span(values: Sequence[float], form: str = ".2f") -> str:
    """Runs of one measurement, lowest to highest ("4,100-4,300"), or the one value."""
    low, high = format(min(values), form), format(max(values), form)
    return low if low == high else f"{low}-{high}"


API_LABELS = {"kserve": "KServe v2 gRPC (ModelInfer)", "http_json": "KServe v2 REST, JSON tensors",
              "http_binary": "KServe v2 REST, binary tensors"}


def _api_rows(model: dict[str, Any], native: dict[str, Any] | None) -> list[str]:
    """The same server at concurrency 32 through each front end (one-example requests)."""
    lines = ["The front ends at concurrency 32, same server and run:", "",
             "| API | examples/s | p50 ms | p99 ms | errors | client CPU ms/req | server CPU ms/req |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if native is not None:
        lines.append(f"| native gRPC (Predict) | {_fmt(native['examples_per_s'])} | "
                     f"{_fmt(native['p50_ms'], 2)} | {_fmt(native['p99_ms'], 2)} | "
                     f"{native['errors']} | {_fmt(native['client_cpu_ms'], 3)} | "
                     f"{_fmt(native['server_cpu_ms'], 3)} |")
    apis = model.get("apis_c32") or {"kserve": model["kserve_c32"]}
    for key, level in apis.items():
        lat = level["latency_ms"]
        lines.append(f"| {API_LABELS[key]} | {_fmt(level['examples_per_s'])} | "
                     f"{_fmt(lat.get('p50'), 2)} | {_fmt(lat.get('p99'), 2)} | "
                     f"{sum(level['errors'].values())} | "
                     f"{_fmt(level['client_cpu_ms_per_request'], 3)} | "
                     f"{_fmt(level['server_cpu_ms_per_request'], 3)} |")
    return lines


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"## {SECTION}", "",
             f"Written by `python -m benchmarks.serve` on {time.strftime('%Y-%m-%d %H:%M %Z')}. "
             "Client, server and everything else share the machine's cores; one-example "
             "requests, closed loop, native API unless said.", "",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}",
             f"- Versions: Python {m['python']}, onnxruntime {m['onnxruntime']}, grpcio "
             f"{m['grpcio']}, numpy {m['numpy']}",
             f"- Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in m['load_average_before'])}"
             f"; after: {' / '.join(f'{x:.2f}' for x in m['load_average_after'])} (this "
             f"benchmark's own processes included). Other processes used "
             f"{100 * m['others_cpu_share']:.1f}% of the machine's CPU during the run.",
             f"- Server: `--device cpu --instances {s['instances']} --intra-op-threads "
             f"{s['intra_op_threads']} --max-batch-size {s['max_batch_size']} --max-queue-delay-ms "
             f"{s['max_queue_delay_ms']} --graph {s['graph']}` (adaptive wait on)",
             f"- Each level: {report['warmup_s']:g} s warm-up, then {report['duration_s']:g} s measured", ""]
    for name, model in report["models"].items():
        rows = model["rows"]
        lines += [f"### {name}", "",
                  f"Version `{model['version_dir']}`; the server chose the **{model['graph']}** graph"
                  + (f" (load-time timing: {model['graph_timing']})" if model["graph_timing"] else "")
                  + (f"; its gRPC port: {model['grpc_frontend']}" if model.get("grpc_frontend")
                     else "") + ".", "",
                  "Ceiling (in-process ONNX Runtime, no gRPC; examples/s at each batch size, the "
                  "best of: one caller with 1 thread, one caller with every core, one single-"
                  "threaded caller per core at once; `1-call ms`: the fastest single call):", "",
                  "```", model["ceiling_table"], "```", "",
                  "Served (ratio: served examples/s over the ceiling on the same mix of batch "
                  "sizes as the server formed; *1 caller*: over the ceiling of one batch at a "
                  "time, the in-process caller's own limit):", "",
                  "| concurrency | examples/s | p50 ms | p99 ms | errors | mean batch | ceiling at that mix, ex/s | ratio | ratio, 1 caller | client CPU ms/req | server CPU ms/req |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['concurrency']} | {_fmt(r['examples_per_s'])} | {_fmt(r['p50_ms'], 2)} | "
                         f"{_fmt(r['p99_ms'], 2)} | {r['errors']} | {_fmt(r['mean_batch'])} | "
                         f"{_fmt(r['ceiling_examples_per_s'])} | **{_fmt(r['ratio'], 2)}** | "
                         f"{_fmt(r['single_caller_ratio'], 2)} | "
                         f"{_fmt(r['client_cpu_ms'], 3)} | {_fmt(r['server_cpu_ms'], 3)} |")
        one = next((r for r in rows if r["concurrency"] == 1), None)
        c32 = next((r for r in rows if r["concurrency"] == 32), None)
        lines += ["", *_api_rows(model, c32), ""]
        if c32 is not None:
            verdict = "met" if c32["ratio"] >= 0.8 else "NOT met"
            lines.append(f"- Target 1 (concurrency 32, ≥ 0.8 × ceiling at the batcher's batch mix): "
                         f"ratio {_fmt(c32['ratio'], 3)} — **{verdict}** (against one batch at a "
                         f"time: {_fmt(c32['single_caller_ratio'], 3)}).")
            cpu = c32["server_cpu_ms"] + c32["client_cpu_ms"]
            lines.append(f"- Where the CPU goes at concurrency 32: {_fmt(c32['server_cpu_ms'], 3)} ms "
                         f"in the server and {_fmt(c32['client_cpu_ms'], 3)} ms in the client per "
                         f"request; {m['cores']} cores at that cost answer at most "
                         f"{_fmt(m['cores'] * 1e3 / cpu, 0)} requests/s, against a ceiling of "
                         f"{_fmt(c32['ceiling_examples_per_s'], 0)} examples/s.")
        if one is not None:
            budget = model["ceiling_batch1_ms"] + 1.0
            verdict = "met" if one["p50_ms"] <= budget else "NOT met"
            lines.append(f"- Target 2 (concurrency 1, p50 ≤ in-process batch-1 latency + 1 ms = "
                         f"{_fmt(model['ceiling_batch1_ms'], 2)} + 1 ms): p50 {_fmt(one['p50_ms'], 2)} ms "
                         f"— **{verdict}**. The floor of this stack: the echo server waiting "
                         f"{_fmt(model['ceiling_batch1_ms'], 2)} ms off its event loop per request "
                         f"(no model, no batcher) answers at p50 {_fmt(model['c1_floor_p50_ms'], 2)} ms; "
                         f"and the same in-process batch-1 call takes "
                         f"{_fmt(model['ceiling_batch1_after_gap_ms'], 2)} ms when it follows a 1 ms "
                         f"idle gap, as a served request does (caches and core cool down).")
        lines.append("")
    echo = report["echo"]
    lines += ["### gRPC and the client alone", "",
              "The same client against `benchmarks/echo_server.py`, which answers every Predict with "
              "a canned response and computes nothing:", "",
              "| concurrency | requests/s | p50 ms | p99 ms | client CPU ms/req | echo server CPU ms/req |",
              "|---:|---:|---:|---:|---:|---:|"]
    for e in echo:
        lines.append(f"| {e['concurrency']} | {_fmt(e['throughput_rps'])} | {_fmt(e['latency_ms'].get('p50'), 2)} | "
                     f"{_fmt(e['latency_ms'].get('p99'), 2)} | {_fmt(e['client_cpu_ms_per_request'], 3)} | "
                     f"{_fmt(e['server_cpu_ms_per_request'], 3)} |")
    lines.append("")
    return "\n".join(lines)


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with its `## heading` section (to the next `## `) replaced by `body`, or `body`
    appended; every other section is kept as it was."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {heading}"), None)
    if start is None:
        base = text.rstrip("\n") if text.strip() else "# Benchmark results"
        return f"{base}\n\n{body.rstrip()}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    kept_after = "\n".join(lines[end:])
    before = "\n".join(lines[:start]).rstrip("\n")
    return f"{before}\n\n{body.rstrip()}\n" + (f"\n{kept_after.rstrip()}\n" if kept_after.strip() else "")


def record(heading: str, section: str, raw: Path, report: dict[str, Any]) -> None:
    """Rewrite the `## heading` section of RESULTS.md with `section` and the run's JSON."""
    RESULTS.write_text(replace_section(RESULTS.read_text() if RESULTS.exists() else "",
                                       heading, section))
    raw.write_text(json.dumps(report, indent=2, default=str) + "\n")
    logger.info("wrote %s and %s", RESULTS, raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[DIGITS, RESNET20], choices=[DIGITS, RESNET20])
    parser.add_argument("--concurrency", default="1,8,32,64", help="closed-loop levels")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    parser.add_argument("--instances", default=ServerSettings.instances, help="a number or auto")
    parser.add_argument("--intra-op-threads", default=ServerSettings.intra_op_threads,
                        help="a number or auto")
    parser.add_argument("--max-batch-size", type=int, default=ServerSettings.max_batch_size)
    parser.add_argument("--max-queue-delay-ms", type=float, default=ServerSettings.max_queue_delay_ms)
    parser.add_argument("--graph", default=ServerSettings.graph, choices=["auto", "fused", "members"])
    parser.add_argument("--repository", type=Path, default=ROOT / "runs" / "benchmarks" / "repo")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(args.instances, args.intra_op_threads, args.max_batch_size,
                              args.max_queue_delay_ms, args.graph)
    levels = [int(c) for c in args.concurrency.split(",")]
    args.repository.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        report = run_suite(args.models, levels, args.duration, args.warmup, settings,
                           args.repository, Path(workdir))
    section = render(report)
    print(section)
    if not args.no_write:
        record(SECTION, section, RAW, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
