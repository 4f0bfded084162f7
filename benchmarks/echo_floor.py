"""The floor of a gRPC front end on this machine, grpc.aio's against C++'s: the same canned
KServe ModelInfer answer (benchmarks/echo_server.py's, nothing parsed) served by the grpc.aio
echo and by a C++ echo on gRPC's callback API (benchmarks/echo_cxx/echo.cc), alternately, under
the same `ensemble-client bench --api kserve` closed loop. What a front end costs before any
work of the server's own: the case for or against a front end that is not grpc.aio
(docs/performance.md, issue 23).

    python -m benchmarks.echo_floor [--concurrency 1,8,32] [--duration 8] [--repeats 2]

Builds the C++ echo with g++ against the system's gRPC C++ library (Debian: `apt-get install
libgrpc++-dev`; found with pkg-config). Never in CI: a benchmark needs a quiet machine.
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
from pathlib import Path
from typing import Any, Sequence

from benchmarks.echo_server import canned_kserve_metadata, canned_kserve_response
from benchmarks.serve import _measured_level, _process, _span

__all__ = ["build_cxx_echo", "main", "run"]

logger = logging.getLogger("benchmarks.echo_floor")

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "echo_cxx" / "echo.cc"
WORK = HERE.parent / "runs" / "benchmarks" / "echo_floor"
KSERVE = "/inference.GRPCInferenceService"
# The digits ensemble's answer: 10 classes, 5 members, one 8x8 image.
CLASSES, MEMBERS, SHAPE = 10, 5, [-1, 1, 8, 8]


def build_cxx_echo(out: Path) -> Path:
    """The C++ echo's binary, built from benchmarks/echo_cxx/echo.cc unless it is newer."""
    binary = out / "echo_cxx"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    if shutil.which("g++") is None or shutil.which("pkg-config") is None:
        raise SystemExit("the C++ echo needs g++ and pkg-config")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True,
                           text=True)
    if flags.returncode != 0:
        raise SystemExit("pkg-config finds no grpc++: install gRPC's C++ library "
                         "(Debian: apt-get install libgrpc++-dev)")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["g++", "-O2", "-std=c++17", str(SOURCE), "-o", str(binary),
                    *flags.stdout.split()], check=True)
    return binary


def _answers(workdir: Path) -> list[str]:
    """The C++ echo's method=file arguments: the same bytes the grpc.aio echo answers with."""
    infer, metadata = workdir / "infer.bin", workdir / "metadata.bin"
    infer.write_bytes(canned_kserve_response(CLASSES, MEMBERS))
    metadata.write_bytes(canned_kserve_metadata(SHAPE))
    return [f"{KSERVE}/ModelInfer={infer}", f"{KSERVE}/ModelMetadata={metadata}"]


def run(levels: Sequence[int], duration: float, warmup: float, repeats: int,
        workdir: Path) -> dict[str, Any]:
    servers = {
        "grpc.aio": [sys.executable, "-m", "benchmarks.echo_server", "--port", "0",
                     "--classes", str(CLASSES), "--members", str(MEMBERS),
                     "--shape", *map(str, SHAPE)],
        "C++": [str(build_cxx_echo(WORK)), "0", *_answers(workdir)],
    }
    report: dict[str, Any] = {"load_average_before": os.getloadavg(), "duration_s": duration,
                              "levels": {}}
    for c in levels:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for repeat in range(repeats):
            # Alternately, the first server of a pair swapped each repeat: a drift of the
            # machine falls on both.
            order = list(servers) if repeat % 2 == 0 else list(reversed(servers))
            for name in order:
                with _process(servers[name], workdir / f"{name}-{c}-{repeat}.log") as (process, port):
                    level = _measured_level(process, port, "echo", f"--concurrency {c}",
                                            duration, warmup, "kserve")
                runs[name].append({key: level[key] for key in (
                    "throughput_rps", "latency_ms", "server_cpu_ms_per_request",
                    "client_cpu_ms_per_request")})
                logger.info("%s c=%d: %.0f req/s, %.3f ms server CPU/request", name, c,
                            level["throughput_rps"], level["server_cpu_ms_per_request"])
        report["levels"][c] = runs
    report["load_average_after"] = os.getloadavg()
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = ["| c | server | req/s | p50 / p99 ms | server CPU ms/req | client CPU ms/req |",
             "|---:|---|---:|---|---:|---:|"]
    for c, runs in report["levels"].items():
        for name, measured in runs.items():
            rate = _span([m["throughput_rps"] for m in measured], ",.0f")
            p50 = _span([m["latency_ms"]["p50"] for m in measured], ".2f")
            p99 = _span([m["latency_ms"]["p99"] for m in measured], ".2f")
            server = _span([m["server_cpu_ms_per_request"] for m in measured], ".3f")
            client = _span([m["client_cpu_ms_per_request"] for m in measured], ".3f")
            lines.append(f"| {c} | {name} | {rate} | {p50} / {p99} | {server} | {client} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop levels")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each server per level")
    parser.add_argument("--json", type=Path, default=WORK / "results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as workdir:
        report = run([int(c) for c in args.concurrency.split(",")], args.duration, args.warmup,
                     args.repeats, Path(workdir))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"load average before {report['load_average_before'][0]:.2f}, "
          f"after {report['load_average_after'][0]:.2f}")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
