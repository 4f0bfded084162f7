"""Where a served request's time goes (issue 23, item 2), at each concurrency, on each model.

    python -m benchmarks.profile [--models digits,resnet20] [--concurrency 1,8,32]
        [--duration 8] [--warmup 2] [--py-spy] [--json FILE] [-- SERVER FLAGS...]

For each model and level: a fresh `ensemble-server --device cpu` (its defaults, or the flags
after `--`), driven by `ensemble-client bench --api kserve` (closed loop, one example per
request, a client process of its own), and measured from outside, with nothing added to the
server:

- per thread, from /proc/<pid>/task/*: CPU time (utime + stime) and voluntary context switches
  per request: the event loop, the inference threads, gRPC's threads. A voluntary switch is a
  thread going to sleep to wait (for the GIL, a lock, a poll), so the loop's and the inference
  threads' switches per request count the hand-offs between them;
- from the server's KServe ModelStatistics, over the same window: the batches formed (sizes),
  each request's wait from its arrival at the batcher to its batch's start (`queue`), its time
  in the server from decode to answer (`success`), and the batches' compute; the client's mean
  latency minus `success` is what gRPC and the network spend outside our handler;
- the grpc.aio echo server (benchmarks/echo_server.py: a canned answer, nothing parsed) at the
  same levels, per thread too: the floor any grpc.aio server pays per call here;
- with `--py-spy`, the server runs under `py-spy record --native` (one run per level: its
  start-up frames are left out) and the event-loop thread's samples are split by the innermost
  frame's owner: our code (snapserve), protobuf, numpy, ONNX Runtime, grpc.aio's Cython,
  asyncio, system calls and the rest of native code. The shares come from the profiled run;
  the rates and CPU from the plain one (py-spy's sampling costs the server time).

Writes runs/benchmarks/profile/profile.json and prints the tables docs/performance.md quotes.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks.ensembles import DIGITS, RESNET20, digits_version, resnet20_version
from benchmarks.serve import _CLK_TCK, _bench, _process

__all__ = ["loop_shares", "main", "thread_kind", "thread_times"]

logger = logging.getLogger("benchmarks.profile")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "runs" / "benchmarks" / "profile"
PY_SPY_RATE = 250  # samples per second: enough for shares of ~1% over a few seconds


# --- threads ------------------------------------------------------------------------------------

def thread_kind(name: str, tid: int, pid: int) -> str:
    """What a server thread does, from its name (Linux `comm`, 15 characters at most)."""
    if tid == pid:
        return "event loop"
    if name.startswith("inference"):
        return "inference"
    if name.startswith("decode"):
        return "decode"
    if name.startswith(("grpc", "default-executo", "resolver", "timer", "event_engine")):
        return "gRPC"
    return "other"


def thread_times(pid: int) -> dict[int, tuple[str, float, int]]:
    """tid -> (kind, CPU seconds, voluntary context switches) for each live thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        switches = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        out[int(task.name)] = (thread_kind(name, int(task.name), pid),
                               (int(fields[11]) + int(fields[12])) / _CLK_TCK, switches)
    return out


def _per_kind(before: dict[int, tuple[str, float, int]], after: dict[int, tuple[str, float, int]],
              requests: int) -> dict[str, dict[str, float]]:
    """ms of CPU and voluntary switches per request, by kind of thread, between two readings."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for tid, (kind, cpu, switches) in after.items():
        _, cpu0, switches0 = before.get(tid, (kind, 0.0, 0))
        totals[kind][0] += cpu - cpu0
        totals[kind][1] += switches - switches0
    n = max(requests, 1)
    return {kind: {"cpu_ms": 1e3 * cpu / n, "switches": switches / n}
            for kind, (cpu, switches) in sorted(totals.items())}


# --- the server's own statistics ------------------------------------------------------------------

def model_statistics(port: int, model: str) -> dict[str, Any]:
    """The model's KServe statistics as plain numbers: requests, ns in queue / in the server,
    batches by size."""
    import grpc

    from snapserve.proto.inference import grpc_service_pb2 as kpb
    from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stats = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            kpb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]
    infer = stats.inference_stats
    return {"requests": infer.success.count, "success_ns": infer.success.ns,
            "queue_ns": infer.queue.ns, "compute_ns": infer.compute_infer.ns,
            "batches": {b.batch_size: b.compute_infer.count for b in stats.batch_stats}}


def _statistics_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    n = max(after["requests"] - before["requests"], 1)
    batches = {size: count - before["batches"].get(size, 0)
               for size, count in after["batches"].items()
               if count > before["batches"].get(size, 0)}
    total = sum(batches.values())
    return {"server_ms": (after["success_ns"] - before["success_ns"]) / n / 1e6,
            "queue_ms": (after["queue_ns"] - before["queue_ns"]) / n / 1e6,
            "batches": batches, "batches_per_request": total / n,
            "mean_batch": sum(s * c for s, c in batches.items()) / max(total, 1)}


# --- py-spy -----------------------------------------------------------------------------------

_START_UP = ("load_version", "plan_threads", "choose_graph", "warm_up", "_load_all", "import_module",
             "_find_and_load", "freeze (server/process/heap.py")
# Frames of a thread that waits, not computes: a lock (the hand-over in engine/handoff.py) or
# the GIL. py-spy's --native samples them as busy.
_WAITS = ("PyThread_acquire_lock_timed", "take_gil")


# py-spy names a file by its path below the sys.path entry it was found in: the project's own
# top-level folders (an editable install) or snapserve/ (an installed one).
_OURS = ("server/", "proto/", "client/", "trainer/", "benchmarks/")


def _owner(frame: str) -> str | None:
    """Whose code a py-spy frame is ("name (file:line)"; native frames name a library)."""
    file = frame.rpartition(" (")[2]
    if file.startswith(_OURS) or "snapserve/" in file or str(ROOT) in file:
        return "ours (snapserve)"
    if "google/protobuf" in frame or "upb" in frame or "_message" in frame:
        return "protobuf"
    if "numpy" in frame:
        return "numpy"
    if "onnxruntime" in frame:
        return "ONNX Runtime"
    if "grpc" in frame or ".pyx" in frame or "cygrpc" in frame:
        return "grpc.aio (Cython and core)"
    if "asyncio/" in frame or "selectors.py" in frame or "_asyncio" in frame:
        return "asyncio"
    return None


_SYSCALLS = re.compile(r"^(epoll_\w+|sendmsg|recvmsg|__libc_\w+|write|read|eventfd\w*|futex\w*|"
                       r"syscall|poll|__GI_\w+|pthread_cond\w+|sem_\w+|recv|send)\b")


def loop_shares(raw: str) -> dict[str, dict[str, float]]:
    """The event-loop thread's samples in py-spy's raw output (`--threads`, one stack a line:
    frames root first, separated by `;`, then the count), as fractions of that thread's busy
    samples outside start-up: `owners`, by the innermost frame's owner, and `ours`, the samples
    whose innermost frame of ours is each of our functions (with what it calls of others'
    code). The loop thread is the one whose stacks run asyncio's `run_forever`."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    functions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        frames = stack.split(";")
        if any(marker in frame for frame in frames for marker in _START_UP):
            continue
        if frames[-1].startswith(("epoll_wait", "epoll_pwait")) and any(
                "Selector.select" in frame for frame in frames):
            continue  # the loop waiting for work: idle, whatever py-spy's own test said
        if not any("run_forever" in frame for frame in frames):
            continue
        thread = frames[0].split(")", 1)[0]  # "thread (TID)", with or without ": name"
        owner = None
        for frame in reversed(frames[1:]):
            if frame.startswith(_WAITS):
                owner = "waiting (a lock or the GIL)"
                break
            if _SYSCALLS.match(frame.split(" (", 1)[0].strip()):
                owner = "system calls"
                break
            owner = _owner(frame)
            if owner is not None:
                break
        threads[thread][owner or "other native"] += int(count)
        ours = None if owner and owner.startswith("waiting") else next((
                    f for f in reversed(frames[1:]) if _owner(f) == "ours (snapserve)"
                     and "__main__" not in f and "cli.py" not in f), None)
        if ours is not None:
            name = ours.split(" (", 1)[0].strip()
            where = ours.rpartition(" (")[2].split(":", 1)[0]
            functions[thread][f"{name} ({where})"] += int(count)
    if not threads:
        return {"owners": {}, "ours": {}}
    loop = max(threads, key=lambda t: sum(threads[t].values()))
    total = sum(threads[loop].values())
    return {"owners": {o: n / total for o, n in threads[loop].most_common()},
            "ours": {f: n / total for f, n in functions[loop].most_common(15)}}


# --- the runs ---------------------------------------------------------------------------------

def _server_pid(process: subprocess.Popen) -> int:
    """The Python server's pid: the process itself, or its child when py-spy launched it."""
    for _ in range(100):
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        kids = children.read_text().split() if children.exists() else []
        if "py-spy" not in Path(f"/proc/{process.pid}/cmdline").read_text():
            return process.pid
        if kids:
            return int(kids[0])
        time.sleep(0.1)
    raise RuntimeError("py-spy started no server")


def _level(command: list[str], log: Path, model: str, concurrency: int, duration: float,
           warmup: float, statistics: bool) -> dict[str, Any]:
    with _process(command, log) as (process, port):
        pid = _server_pid(process)
        time.sleep(0.5)
        # The warm-up runs as its own bench so that the window's readings start warm.
        _bench(port, model, f"--concurrency {concurrency}", warmup, 0.0, "kserve")
        stats0 = model_statistics(port, model) if statistics else None
        threads0, began = thread_times(pid), time.perf_counter()
        result = _bench(port, model, f"--concurrency {concurrency}", duration, 0.0, "kserve")
        threads1, wall = thread_times(pid), time.perf_counter() - began
        stats1 = model_statistics(port, model) if statistics else None
        if pid != process.pid:  # under py-spy: stop the server, and py-spy writes its file
            os.kill(pid, signal.SIGTERM)
            process.wait(timeout=120)
    answered = result["requests"] + sum(result["errors"].values())
    # The bench's own start and stop are in the wall time, not in its window: CPU per request
    # counts the requests answered over the window's share of the wall time.
    scaled = max(int(answered * wall / duration), 1)
    level = {"concurrency": concurrency, "rps": result["throughput_rps"],
             "latency_ms": result["latency_ms"], "threads": _per_kind(threads0, threads1, scaled),
             "client_cpu_ms": result["client_cpu_ms_per_request"]}
    level["cpu_ms"] = sum(t["cpu_ms"] for t in level["threads"].values())
    if stats0 is not None and stats1 is not None:
        level.update(_statistics_delta(stats0, stats1))
        level["outside_handler_ms"] = result["latency_ms"]["mean"] - level["server_ms"]
    return level


def _profiled(command: list[str], log: Path, model: str, concurrency: int, duration: float,
              warmup: float, out: Path) -> dict[str, float]:
    py_spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--native", "--threads",
              "--rate", str(PY_SPY_RATE), "--format", "raw", "--output", str(out), "--"]
    _level(py_spy + command, log, model, concurrency, duration, warmup, statistics=False)
    return loop_shares(out.read_text()) if out.exists() else {}


def run(models: Sequence[str], levels: Sequence[int], duration: float, warmup: float,
        server_flags: Sequence[str], py_spy: bool, workdir: Path) -> dict[str, Any]:
    repository = ROOT / "runs" / "benchmarks" / "repo"
    builders = {DIGITS: digits_version, RESNET20: resnet20_version}
    WORK.mkdir(parents=True, exist_ok=True)  # py-spy's raw files are kept there
    report: dict[str, Any] = {"load_average_before": os.getloadavg(), "levels": list(levels),
                              "duration_s": duration, "server_flags": list(server_flags),
                              "models": {}}
    for model in models:
        version = builders[model](repository)
        only = workdir / f"repo-{model}"
        only.mkdir()
        (only / model).symlink_to(version.parent.resolve(), target_is_directory=True)
        command = [sys.executable, "-m", "snapserve.server", "--model-repository", str(only),
                   "--port", "0", "--http-port", "0", "--no-metrics", "--device", "cpu",
                   *server_flags]
        rows = []
        for c in levels:
            row = _level(command, workdir / f"{model}-{c}.log", model, c, duration, warmup, True)
            if py_spy:
                row["loop_shares"] = _profiled(command, workdir / f"{model}-{c}-spy.log", model,
                                               c, duration, warmup, WORK / f"{model}-c{c}.txt")
            logger.info("%s c=%d: %.0f req/s, %.3f ms CPU/request, loop %.3f ms", model, c,
                        row["rps"], row["cpu_ms"], row["threads"].get("event loop", {}).get("cpu_ms", 0))
            rows.append(row)
        report["models"][model] = rows
    echo = [sys.executable, "-m", "benchmarks.echo_server", "--port", "0"]
    report["echo"] = [_level(echo, workdir / f"echo-{c}.log", "echo", c, duration, warmup, False)
                      for c in levels]
    report["load_average_after"] = os.getloadavg()
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"load average before {report['load_average_before'][0]:.2f}, after "
             f"{report['load_average_after'][0]:.2f}; server flags: "
             f"{' '.join(report['server_flags']) or '(defaults)'}", ""]
    kinds = ["event loop", "inference", "gRPC", "other"]
    lines.append("| server, c | req/s | p50 / p99 ms | CPU ms/req: all | loop | inference | gRPC "
                 "| other | client CPU ms/req | loop / inference switches per req | batches/req "
                 "| mean batch | queue ms | in server ms | outside ms |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    rows = [(m, r) for m, rs in report["models"].items() for r in rs]
    rows += [("echo", r) for r in report["echo"]]
    for model, r in rows:
        t = r["threads"]
        cpu = " | ".join(f"{t.get(k, {}).get('cpu_ms', 0):.3f}" for k in kinds)
        switches = (f"{t.get('event loop', {}).get('switches', 0):.2f} / "
                    f"{t.get('inference', {}).get('switches', 0):.2f}")
        extra = (f"{r['batches_per_request']:.2f} | {r['mean_batch']:.1f} | {r['queue_ms']:.3f} | "
                 f"{r['server_ms']:.3f} | {r['outside_handler_ms']:.3f}" if "queue_ms" in r
                 else "| | | |")
        lines.append(f"| {model} c={r['concurrency']} | {r['rps']:.0f} | "
                     f"{r['latency_ms']['p50']:.2f} / {r['latency_ms']['p99']:.2f} | "
                     f"{r['cpu_ms']:.3f} | {cpu} | {r.get('client_cpu_ms', float('nan')):.3f} | "
                     f"{switches} | {extra} |")
    shares = [(m, r) for m, r in rows if r.get("loop_shares", {}).get("owners")]
    if shares:
        owners = sorted({o for _, r in shares for o in r["loop_shares"]["owners"]},
                        key=lambda o: -max(r["loop_shares"]["owners"].get(o, 0) for _, r in shares))
        lines += ["", "Event-loop thread's samples (py-spy --native), by the innermost frame's owner:",
                  "", "| owner | " + " | ".join(f"{m} c={r['concurrency']}" for m, r in shares) + " |",
                  "|---|" + "---:|" * len(shares)]
        for owner in owners:
            lines.append(f"| {owner} | " + " | ".join(
                f"{100 * r['loop_shares']['owners'].get(owner, 0):.1f}%" for _, r in shares) + " |")
        for model, r in shares:
            lines += ["", f"{model} c={r['concurrency']}, our functions (innermost of ours, with "
                      "what they call), share of the loop thread's busy samples: " + "; ".join(
                          f"{name} {100 * share:.1f}%" for name, share in r["loop_shares"]["ours"].items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    server_flags: list[str] = []
    if "--" in argv:
        server_flags = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=f"{DIGITS},{RESNET20}")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--py-spy", action="store_true", help="also profile each level")
    parser.add_argument("--json", type=Path, default=WORK / "profile.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args.models.split(","), [int(c) for c in args.concurrency.split(",")],
                     args.duration, args.warmup, server_flags, args.py_spy, Path(tmp))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
