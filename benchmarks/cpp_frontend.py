"""snapserve's C++ gRPC front end against its grpc.aio port: one server process, both ports,
the same load on each alternately (docs/performance.md, "Sixth pass"; issue 23).

    python -m benchmarks.cpp_frontend [--models digits resnet20] [--concurrency 1,8,32] \
        [--duration 5] [--warmup 1] [--repeats 2] [--api kserve|stream] [--no-write]

Starts `ensemble-server` with its defaults and `--cpp-grpc-port` on the benchmark models
(benchmarks/ensembles.py), then per model and level drives the grpc.aio port and the C++ port
with `ensemble-client bench --api kserve` (closed loop, one example per request; `--api stream`:
native PredictStream, one stream per caller, each request written when its last answer came),
the port that goes first swapped each repeat so a drift of the machine falls on both. Beside each level: the
server's CPU per request, and per thread (the event loop, the inference threads, gRPC's threads,
the C++ answering thread) from /proc. Rewrites the "C++ front end against grpc.aio" section of
benchmarks/RESULTS.md and benchmarks/results-cpp-frontend.json (with `--api stream`, the
"streams" section and results-cpp-frontend-stream.json). Needs g++ and libgrpc++ (the
server builds the front end at its first start). Never in CI: a benchmark needs a quiet machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.ensembles import DIGITS, RESNET20, digits_version, resnet20_version
from benchmarks.serve import (_CLK_TCK, _cpu_ticks, _free_port, _measured_level, _process, _span,
                              record)

__all__ = ["main", "render", "run", "thread_cpu_seconds"]

logger = logging.getLogger("benchmarks.cpp_frontend")

ROOT = Path(__file__).resolve().parents[1]
SECTION = "C++ front end against grpc.aio (issue 23)"
STREAM_SECTION = "C++ front end against grpc.aio: streams"
PORTS = ("grpc.aio", "C++")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads by name (`loop` for its main thread), summed over
    threads of the same name."""
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended meanwhile
            continue
        if task.name == str(pid):
            name = "loop"
        elif name.startswith("inference"):
            name = "inference"
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return seconds


def _level(process: Any, port: int, model: str, c: int, duration: float,
           warmup: float, api: str) -> dict[str, Any]:
    before = thread_cpu_seconds(process.pid)
    level = _measured_level(process, port, model, f"--concurrency {c}", duration, warmup, api)
    after = thread_cpu_seconds(process.pid)
    answered = max((level["requests"] + sum(level["errors"].values()))
                   * (duration + warmup) / duration, 1)
    threads = {name: 1e3 * (after[name] - before.get(name, 0.0)) / answered for name in after}
    return {"throughput_rps": level["throughput_rps"], "latency_ms": level["latency_ms"],
            "errors": level["errors"], "server_cpu_ms_per_request": level["server_cpu_ms_per_request"],
            "client_cpu_ms_per_request": level["client_cpu_ms_per_request"],
            "thread_cpu_ms_per_request": {k: v for k, v in sorted(threads.items()) if v >= 0.001},
            "load_average_1min": os.getloadavg()[0]}


def run(versions: dict[str, Path], levels: Sequence[int], duration: float, warmup: float,
        repeats: int, workdir: Path, api: str = "kserve") -> dict[str, Any]:
    """Both ports of one server on `versions` (model name -> version folder)."""
    only = workdir / "repo"  # these models alone: nothing else loads
    only.mkdir()
    for name, version_dir in versions.items():
        (only / name).symlink_to(version_dir.parent.resolve(), target_is_directory=True)
    cpp_port = _free_port()
    command = [sys.executable, "-m", "snapserve.server", "--model-repository", str(only),
               "--port", "0", "--http-port", "0", "--device", "cpu",
               "--cpp-grpc-port", str(cpp_port)]  # otherwise its defaults
    report: dict[str, Any] = {"load_average_before": os.getloadavg(), "duration_s": duration,
                              "warmup_s": warmup, "repeats": repeats, "api": api, "models": {},
                              "written": time.strftime("%Y-%m-%d %H:%M %Z")}
    ticks, stolen = _cpu_ticks()
    with _process(command, workdir / "server.log") as (process, aio_port):
        ports = {"grpc.aio": aio_port, "C++": cpp_port}
        for model in versions:
            rows: dict[int, dict[str, list[dict[str, Any]]]] = {}
            for c in levels:
                rows[c] = {name: [] for name in PORTS}
                for repeat in range(repeats):
                    order = PORTS if repeat % 2 == 0 else tuple(reversed(PORTS))
                    for name in order:
                        rows[c][name].append(_level(process, ports[name], model, c, duration,
                                                    warmup, api))
                        logger.info("%s c=%d %s: %.0f req/s", model, c, name,
                                    rows[c][name][-1]["throughput_rps"])
            report["models"][model] = rows
        # The plans and the front end's port; not the build's command line (this machine's paths).
        report["server_log"] = [line for line in (workdir / "server.log").read_text().splitlines()
                                if "serving the" in line or "C++ front end serving" in line]
    report["load_average_after"] = os.getloadavg()
    ticks_after, stolen_after = _cpu_ticks()
    report["cpu_stolen_share"] = (stolen_after - stolen) / max(ticks_after - ticks, 1)
    return report


def render(report: dict[str, Any], command: str) -> str:
    stream = report.get("api") == "stream"
    load = ("native PredictStream `ensemble-client bench --api stream`, one stream per caller, "
            "each request written when its last answer came" if stream else
            "KServe v2 gRPC `ensemble-client bench --api kserve`, closed loop")
    lines = [f"## {STREAM_SECTION if stream else SECTION}", "",
             f"Written by `{command}` on {report['written']}: one `ensemble-server` (its defaults "
             f"and `--cpp-grpc-port`), {load}, one example per request, its grpc.aio port and "
             "its C++ front end's port "
             f"alternately, {report['repeats']} repeat(s) of {report['duration_s']:g} s per level "
             "(the first port swapped each repeat). Load average (1 min) before "
             f"{report['load_average_before'][0]:.2f}, after {report['load_average_after'][0]:.2f}"
             + ("" if "cpu_stolen_share" not in report else
                f"; CPU time stolen by the host {100 * report['cpu_stolen_share']:.1f}%") + ". "
             "Server CPU over warm-up and window together; per thread: `loop` the event loop's "
             "thread, `inference` the instances' threads, `cpp-answer` the C++ answering thread, "
             "gRPC's own threads by their names.", "",
             "| model | c | port | req/s | p50 / p99 ms | server CPU ms/req | per thread ms/req |",
             "|---|---:|---|---:|---|---:|---|"]
    for model, rows in report["models"].items():
        for c, ports in rows.items():
            for name, measured in ports.items():
                rate = _span([m["throughput_rps"] for m in measured], ",.0f")
                p50 = _span([m["latency_ms"]["p50"] for m in measured], ".2f")
                p99 = _span([m["latency_ms"]["p99"] for m in measured], ".2f")
                cpu = _span([m["server_cpu_ms_per_request"] for m in measured], ".3f")
                names = sorted({k for m in measured for k in m["thread_cpu_ms_per_request"]})
                threads = ", ".join(
                    f"{k} {_span([m['thread_cpu_ms_per_request'].get(k, 0.0) for m in measured], '.3f')}"
                    for k in names)
                lines.append(f"| {model} | {c} | {name} | {rate} | {p50} / {p99} | {cpu} | "
                             f"{threads} |")
            aio = [m["throughput_rps"] for m in ports["grpc.aio"]]
            cpp = [m["throughput_rps"] for m in ports["C++"]]
            ratios = [b / a for a, b in zip(aio, cpp) if a]
            lines.append(f"| {model} | {c} | C++ / grpc.aio | {_span(ratios, '.2f')}x | | | |")
    lines += ["", *(f"- at load: `{line.split(': ', 1)[-1]}`" for line in report["server_log"]), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[DIGITS, RESNET20], choices=[DIGITS, RESNET20])
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop levels")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each port per level")
    parser.add_argument("--api", choices=["kserve", "stream"], default="kserve",
                        help="unary KServe ModelInfer, or native PredictStream (a stream per caller)")
    parser.add_argument("--no-write", action="store_true",
                        help="print, do not write RESULTS.md or results-cpp-frontend*.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repository = ROOT / "runs" / "benchmarks" / "repo"
    builders = {DIGITS: digits_version, RESNET20: resnet20_version}
    versions = {m: builders[m](repository) for m in args.models}
    with tempfile.TemporaryDirectory() as workdir:
        report = run(versions, [int(c) for c in args.concurrency.split(",")], args.duration,
                     args.warmup, args.repeats, Path(workdir), args.api)
    section = render(report, " ".join(["python -m benchmarks.cpp_frontend",
                                       *(sys.argv[1:] if argv is None else argv)]))
    print(section)
    if not args.no_write:
        stream = args.api == "stream"
        record(STREAM_SECTION if stream else SECTION, section, ROOT / "benchmarks" /
               f"results-cpp-frontend{'-stream' if stream else ''}.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
