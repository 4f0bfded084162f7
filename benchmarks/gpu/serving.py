"""Serving: one server start per option, checked through its log and GetModel, swept with
`ensemble-client bench`, and its answers on test data compared with the CPU reference."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.gpu.config import CUDA, ENSEMBLE, MAX_BATCH, NoCuda, StepFailed
from benchmarks.gpu.data import latest_version, normalized, read_manifest
from benchmarks.gpu.in_process import compare, fused_probabilities, open_session
from benchmarks.gpu.options import (Plan, expectation_gaps, load_facts, log_segments, option_availability,
                                    plans, server_flags)
from benchmarks.gpu.runner import Run, tail


SERVING = re.compile(r"serving on (\S+:\d+)")


class Server:
    """`python -m snapserve.server` on 127.0.0.1, port 0, its log in a file; stopped on exit."""

    def __init__(self, command: list[str], log: Path, cwd: Path, timeout_s: float) -> None:
        self.command, self.log, self.cwd, self.timeout_s = command, log, cwd, timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.load_s = 0.0

    def __enter__(self) -> Server:
        began = time.perf_counter()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while time.perf_counter() - began < self.timeout_s:
            if match := SERVING.search(self.text()):
                self.address, self.load_s = match.group(1), time.perf_counter() - began
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise StepFailed(f"the server did not start (exit {self.process.returncode}):\n{tail(self.text())}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bench_levels(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`ensemble-client bench --json` levels, keyed by concurrency, with the mean batch formed."""
    levels = {}
    for level in report["levels"]:
        batches = {int(k): v for k, v in (level.get("server_batches") or {}).items()}
        count = sum(batches.values())
        levels[str(level["concurrency"])] = {
            "examples_per_s": level["examples_per_s"], "requests_per_s": level["throughput_rps"],
            "p50_ms": level["latency_ms"].get("p50"), "p90_ms": level["latency_ms"].get("p90"),
            "p99_ms": level["latency_ms"].get("p99"), "errors": level["errors"],
            "requests": level["requests"], "client_cpu_share": level["client_cpu_share"],
            "mean_batch": sum(b * n for b, n in batches.items()) / count if count else None,
        }
    return levels


def serve(run: Run) -> None:
    help_text = run.python("server-help", ["-m", "snapserve.server", "--help"], timeout_s=60)
    flags = server_flags(help_text)
    served = run.results.setdefault("serve", {})
    run.results["options"] = option_availability(flags)
    cpu_instances = 1 if run.args.quick else max(1, min(8, (os.cpu_count() or 2) // 2))
    wanted = set(run.args.only.split(",")) if run.args.only else None
    for plan in plans(cpu_instances):
        if wanted is not None and plan.name not in wanted:
            continue
        skip = _skip_reason(run, plan, flags)
        if skip:
            served[plan.name] = {"status": "skipped", "reason": skip}
            run.say(f"serve {plan.name}: skipped ({skip})")
            continue
        try:
            served[plan.name] = _serve_plan(run, plan, flags)
        except NoCuda:
            raise
        except Exception as exc:  # one option failing is a finding; the others still run
            served[plan.name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            run.say(f"serve {plan.name}: FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        run.save()


def _skip_reason(run: Run, plan: Plan, flags: set[str]) -> str | None:
    missing = [f for f in plan.needs if f not in flags]
    if missing:
        return f"not available: the server has no {', '.join(missing)} flag"
    if plan.cuda_only and run.device != "cuda":
        return "needs --device cuda"
    absent = [m for m in plan.models if not (run.repo / m).is_dir()]
    if absent:
        return f"models not written: {', '.join(absent)}"
    estimate = 15 + sum((len(run.sizes.levels) if m in plan.sweep else 1) *
                        (run.sizes.duration_s + run.sizes.warmup_s) for m in plan.sweep + plan.batch1)
    if run.elapsed() + estimate > run.sizes.budget_s:
        return f"time budget: {run.elapsed():.0f} s used of {run.sizes.budget_s:.0f} s"
    return None


def _server_command(run: Run, plan: Plan, flags: set[str]) -> list[str]:
    device = "cpu" if plan.on_cpu else run.device
    command = [sys.executable, "-m", "snapserve.server", "--model-repository", str(run.repo),
               "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--device", device,
               "--max-batch-size", str(MAX_BATCH), "--log-level", "INFO", *plan.flags]
    if "--grace-s" in flags:
        command += ["--grace-s", "1"]
    if "--version-policy" in flags and "--pin" in flags:  # load only the plan's models
        command += ["--version-policy", "specific"]
        for model in plan.models:
            command += ["--pin", f"{model}={latest_version(run.repo, model).name}"]
    return command


def _serve_plan(run: Run, plan: Plan, flags: set[str]) -> dict[str, Any]:
    device = "cpu" if plan.on_cpu else run.device
    command = _server_command(run, plan, flags)
    entry: dict[str, Any] = {"status": "ok", "device": device, "flags": command[command.index("--device"):],
                             "models": {}}
    run.say(f"serve {plan.name}: starting ({' '.join(plan.flags)})")
    server = Server(command, run.logs / f"server-{plan.name}.log", run.work, timeout_s=180)
    try:
        with server:
            entry["load_s"] = round(server.load_s, 2)
            _check_loaded(run, plan, device, server, entry)
            for model in plan.sweep + plan.batch1:
                levels = run.sizes.levels if model in plan.sweep else (1,)
                entry["models"][model]["bench"] = _bench(run, plan, model, server.address, levels)
            for model in plan.predict:
                entry["models"][model]["parity"] = _served_parity(run, server.address, model, device)
    finally:
        entry["log_tail"] = tail(server.text(), 8)
    run.say(f"serve {plan.name}: " + plan_line(entry, plan))
    return entry


def _check_loaded(run: Run, plan: Plan, device: str, server: Server, entry: dict[str, Any]) -> None:
    """GetModel for every model of the plan, with the load log: on CUDA, every model must
    run on CUDAExecutionProvider; what the plan expects (graph, CUDA graphs, FP16) is
    checked and any difference recorded."""
    import grpc

    from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
    from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc

    segments = log_segments(server.text())
    if match := re.search(r"execution providers (\[.*\])", server.text()):
        entry["server_providers"] = match.group(1)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        for model in plan.models:
            facts = load_facts(segments.get(model, []))
            try:
                meta = stub.GetModel(pb.GetModelRequest(model=model), timeout=30)
            except grpc.RpcError as exc:
                reason = facts.get("refused") or f"{exc.code().name}: {exc.details()}"
                if device == "cuda" and "cuda" in reason.lower():
                    raise NoCuda(f"serve {plan.name}: the server refused {model}: {reason}") from None
                raise StepFailed(f"the server does not serve {model}: {reason}\n{tail(server.text())}") from None
            facts.update(execution_provider=meta.execution_provider, runtime=dict(meta.runtime),
                         version=meta.version, members=len(meta.members))
            if device == "cuda" and meta.execution_provider != CUDA:
                raise NoCuda(f"serve {plan.name}: GetModel says {model} runs on "
                             f"{meta.execution_provider!r}, not {CUDA}")
            facts["checks"] = expectation_gaps(plan, model, facts)
            entry["models"][model] = facts


def _bench(run: Run, plan: Plan, model: str, address: str, levels: Sequence[int]) -> dict[str, Any]:
    out = run.logs / f"bench-{plan.name}-{model}.json"
    s = run.sizes
    run.python(f"bench-{plan.name}-{model}",
               ["-m", "snapserve.client", "bench", "--target", address, "--model", model,
                "--concurrency", ",".join(map(str, levels)), "--duration", str(s.duration_s),
                "--warmup", str(s.warmup_s), "--json", str(out)],
               timeout_s=60 + len(levels) * (s.duration_s + s.warmup_s) * 3)
    return bench_levels(json.loads(out.read_text()))


def _served_parity(run: Run, address: str, model: str, device: str) -> dict[str, float]:
    """The served probabilities of the test examples against the CPU reference (the FP32
    fused graph in-process), in requests of MAX_BATCH examples (CUDA graphs pad them)."""
    import grpc
    import numpy as np

    from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
    from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
    from snapserve.proto.tensors import from_tensor, to_tensor

    data = np.load(run.work / "cifar-synth.npz")
    manifest = read_manifest(latest_version(run.repo, ENSEMBLE))
    # A CPU server computes ResNet-20 x5 at ~0.4 GFLOP per example, one request at a time on
    # one single-threaded instance here: fewer examples there.
    n = run.sizes.parity_examples if device == "cuda" else min(run.sizes.parity_examples, 128)
    x, labels = normalized(data["x_test"][:n], manifest), data["y_test"][:n]
    reference = _reference(run, manifest, x)
    answers = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        for start in range(0, n, MAX_BATCH - 3):  # odd sizes: exercise padding to a bucket
            request = pb.PredictRequest(model=model)
            to_tensor(x[start:start + MAX_BATCH - 3], request.input)
            answers.append(from_tensor(stub.Predict(request, timeout=60).probabilities))
    return compare(np.concatenate(answers), reference, labels)


def _reference(run: Run, manifest: dict[str, Any], x: Any) -> Any:
    """The FP32 fused graph on ONNX Runtime's CPU provider, computed once per version."""
    import numpy as np

    version = latest_version(run.repo, ENSEMBLE)
    cache = run.work / f"reference-v{version.name}-{len(x)}.npy"
    if not cache.is_file():
        session = open_session(version / manifest["ensemble"]["file"], "cpu")
        np.save(cache, fused_probabilities(session, manifest, x))
    return np.load(cache)


def plan_line(entry: dict[str, Any], plan: Plan) -> str:
    parts = [f"loaded in {entry.get('load_s', 0):.1f} s"]
    for model, facts in entry["models"].items():
        bench = facts.get("bench") or {}
        cells = [f"c={c} {v['examples_per_s']:.0f} ex/s p50 {v['p50_ms']:.2f} ms"
                 for c, v in bench.items() if v.get("p50_ms") is not None]
        parity = facts.get("parity")
        gaps = facts.get("checks") or []
        parts.append(f"{model} on {facts['execution_provider']} ({facts['runtime'].get('graph')})"
                     + (f": {'; '.join(cells)}" if cells else "")
                     + (f"; |dp| {parity['max_abs_diff']:.1e} acc {parity['accuracy']:.3f}" if parity else "")
                     + (f"; CHECK: {' / '.join(gaps)}" if gaps else ""))
    return " | ".join(parts)
