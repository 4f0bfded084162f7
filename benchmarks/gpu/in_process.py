"""ONNX Runtime in-process, without the server: placement of every graph's nodes, parity on the
device against the CPU provider, and batch 1 / 32 latency as the server runs a batch and
device-resident."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.gpu.config import CPU, CUDA, ENSEMBLE, FP16, MAX_BATCH, ONE
from benchmarks.gpu.data import latest_version, normalized, read_manifest
from benchmarks.gpu.device import session_on
from benchmarks.gpu.runner import Run, recorded


def open_session(path: Path, device: str, *, profile: Path | None = None, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    providers = [(CUDA, {"device_id": 0}), CPU] if device == "cuda" else [CPU]
    return ort.InferenceSession(str(path), options, providers=providers)


def node_placement(session: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """Nodes per provider from one profiled run (ONNX Runtime's profile names each kernel's
    provider); shape arithmetic on the CPU is normal, compute there is not."""
    session.run(None, feeds)
    profile = Path(session.end_profiling())
    try:
        events = json.loads(profile.read_text())
    finally:
        profile.unlink(missing_ok=True)
    nodes: dict[str, tuple[str, str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            nodes.setdefault(event["name"].removesuffix("_kernel_time").removesuffix("_fence_before")
                             .removesuffix("_fence_after"), (args["provider"], args.get("op_name", "?")))
    counts: dict[str, int] = {}
    for provider, _ in nodes.values():
        counts[provider] = counts.get(provider, 0) + 1
    cpu_ops = sorted({op for provider, op in nodes.values() if provider == CPU})
    return {"nodes": counts, "cpu_ops": cpu_ops}


def fused_feeds(manifest: dict[str, Any], x: Any) -> dict[str, Any]:
    import numpy as np

    feeds = {manifest["input"]["name"]: x}
    ensemble = manifest.get("ensemble") or {}
    feeds[ensemble.get("temperature_input", "temperature")] = np.array(
        manifest.get("temperature", 1.0), dtype=np.float32)
    return feeds


def fused_probabilities(session: Any, manifest: dict[str, Any], x: Any, batch: int = 256) -> Any:
    import numpy as np

    return np.concatenate([session.run(["probabilities"], fused_feeds(manifest, x[i:i + batch]))[0]
                           for i in range(0, len(x), batch)])


def member_probabilities(session: Any, manifest: dict[str, Any], x: Any, batch: int = 256) -> Any:
    import numpy as np

    name, out = manifest["input"]["name"], manifest["output"]["name"]
    logits = np.concatenate([session.run([out], {name: x[i:i + batch]})[0]
                             for i in range(0, len(x), batch)]).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def compare(probs: Any, reference: Any, labels: Any) -> dict[str, float]:
    import numpy as np

    return {"max_abs_diff": float(np.max(np.abs(probs - reference))),
            "top1_agreement": float(np.mean(probs.argmax(1) == reference.argmax(1))),
            "accuracy": float(np.mean(probs.argmax(1) == labels))}


def _median_ms(fn: Callable[[], None], budget_s: float, min_runs: int = 5) -> dict[str, float]:
    began = time.perf_counter()
    fn()  # the first run of a shape: allocation, cuDNN's algorithm search
    first = time.perf_counter() - began
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 2000):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return {"first_ms": 1e3 * first, "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "runs": len(times)}


def latency(session: Any, feeds: dict[str, Any], device: str, budget_s: float) -> dict[str, Any]:
    """Median run time. On CUDA two ways: as the server runs a batch (input copied from the
    host, outputs written to host memory, IO binding) and device-resident (bound once; the
    compute alone)."""
    import onnxruntime as ort

    if device != "cuda":
        return {"host": _median_ms(lambda: session.run(None, feeds), budget_s)}
    outputs = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name

    def as_served() -> None:
        binding = session.io_binding()
        for name, value in feeds.items():
            if name == input_name:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            else:
                binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    timings: dict[str, Any] = {"host": _median_ms(as_served, budget_s)}
    try:
        resident = session.io_binding()
        kept = [ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for value in feeds.values()]
        for name, value in zip(feeds, kept):
            resident.bind_ortvalue_input(name, value)
        for name in outputs:
            resident.bind_output(name, "cuda")

        def on_device() -> None:
            session.run_with_iobinding(resident)
            resident.synchronize_outputs()

        timings["device_resident"] = _median_ms(on_device, budget_s)
        del kept  # the bound device inputs had to live as long as the binding was used
    except Exception as exc:  # ORT's exception types are not public
        timings["device_resident_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return timings


def in_process(run: Run) -> None:
    import numpy as np

    result: dict[str, Any] = {"placement": {}, "parity": {}, "latency_ms": {}, "errors": {}}
    run.results["in_process"] = result
    data = np.load(run.work / "cifar-synth.npz")
    ens_dir = latest_version(run.repo, ENSEMBLE)
    manifest = read_manifest(ens_dir)
    x = normalized(data["x_test"][: run.sizes.parity_examples], manifest)
    labels = data["y_test"][: run.sizes.parity_examples]
    files = {"ensemble.onnx": (ens_dir / manifest["ensemble"]["file"], manifest, "fused"),
             "member-000.onnx": (ens_dir / manifest["members"][0]["file"], manifest, "member")}
    for name in (ONE, FP16):
        if (run.repo / name).is_dir():
            m = read_manifest(latest_version(run.repo, name))
            ens = m.get("ensemble") or {}
            key = f"{name}/" + ((ens.get("fp16") or {}).get("file", "") if name == FP16 else ens.get("file", ""))
            if ens:
                files[key] = (latest_version(run.repo, name) / key.split("/", 1)[1], m, "fused")
    reference = fused_probabilities(open_session(files["ensemble.onnx"][0], "cpu"), manifest, x)
    result["parity"]["reference"] = "ensemble.onnx on ONNX Runtime's CPU provider, all threads"
    result["parity"]["ensemble.onnx (cpu)"] = compare(reference, reference, labels)
    errors = result["errors"]
    for key, (path, m, kind) in files.items():
        if path.is_file():
            with recorded(errors, key):
                _inspect_graph(run, result, key, path, m, kind, x, labels, reference)
    for index, member in enumerate(manifest["members"]):
        with recorded(errors, member["file"]):
            _member_parity(run, result, index, ens_dir / member["file"], manifest, member, x, labels)
    fused, one = result["latency_ms"].get("ensemble.onnx"), result["latency_ms"].get("member-000.onnx")
    if fused and one:
        ways = [w for w in ("host", "device_resident") if w in fused["1"] and w in one["1"]]
        result["batch1_ratio"] = {w: fused["1"][w]["median_ms"] / one["1"][w]["median_ms"] for w in ways}
        run.say(f"in-process batch 1, {len(manifest['members'])} members fused vs one member: "
                + ", ".join(f"{w} {fused['1'][w]['median_ms']:.3f} vs {one['1'][w]['median_ms']:.3f} ms"
                            for w in ways))


def _inspect_graph(run: Run, result: dict[str, Any], key: str, path: Path, manifest: dict[str, Any],
                   kind: str, x: Any, labels: Any, reference: Any) -> None:
    import numpy as np

    session = open_session(path, run.device, profile=run.logs / f"profile-{path.stem}")
    placed = session_on(session, run.device, key)
    one = x[:1]
    feeds = fused_feeds(manifest, one) if kind == "fused" else {manifest["input"]["name"]: one}
    result["placement"][key] = {"provider": placed, **node_placement(session, feeds)}
    if run.device == "cuda" and "provider_options" not in result:
        result["provider_options"] = session.get_provider_options().get(CUDA, {})
    del session
    session = open_session(path, run.device)
    if kind == "fused" and not key.startswith(ONE):  # one member is another model than the reference
        result["parity"][key] = compare(fused_probabilities(session, manifest, x), reference, labels)
    timings = {}
    for batch in (1, MAX_BATCH):
        xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
        feeds = fused_feeds(manifest, xb) if kind == "fused" else {manifest["input"]["name"]: xb}
        timings[str(batch)] = latency(session, feeds, run.device, run.sizes.timing_s)
        if "device_resident_error" in timings[str(batch)]:
            result["errors"][f"{key} batch {batch} device-resident"] = timings[str(batch)]["device_resident_error"]
    result["latency_ms"][key] = timings


def _member_parity(run: Run, result: dict[str, Any], index: int, path: Path, manifest: dict[str, Any],
                   member: dict[str, Any], x: Any, labels: Any) -> None:
    reference = member_probabilities(open_session(path, "cpu"), manifest, x)
    session = open_session(path, run.device)
    session_on(session, run.device, path.name)
    row = compare(member_probabilities(session, manifest, x), reference, labels)
    row["trainer_test_accuracy"] = member.get("metrics", {}).get("accuracy")
    result["parity"][f"member-{index:03d} ({run.device} vs cpu)"] = row
