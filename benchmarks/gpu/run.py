#!/usr/bin/env python3
"""CUDA end to end in one device call (issue 17): install, train, serve, bench, report.

    python3 benchmarks/gpu/run.py --prepare                # here: wheels and parts to carry
    python3 benchmarks/gpu/run.py --device cuda --ort-parts /tmp/ortgpu .ortgpu \
        --wheels .ortgpu/wheels --out "$OUT"               # there: the one device call
    python benchmarks/gpu/run.py --device cpu --quick --out DIR   # the dry run (tests/perf)

benchmarks/gpu/README.md says how a session with a GPU makes the calls. The run drives the
project only through its command lines (`python -m snapserve.trainer|server|client`) and the
public gRPC API (`snapserve.proto`), so it survives moves inside server/ and trainer/. It:

1. installs what the device lacks (the onnxruntime-gpu wheel reassembled from carried parts, the
   grpc wheels the generated code needs, the project from this working tree) and re-executes
   itself with PYTHONPATH and LD_LIBRARY_PATH set (the server does not import torch, so it finds
   the CUDA libraries of the nvidia-* wheels only through LD_LIBRARY_PATH);
2. refuses, with exit status 3 and a message, to go on when `--device cuda` was asked and
   ONNX Runtime has no CUDAExecutionProvider or places a session on the CPU: it never
   benchmarks the CPU under a CUDA label;
3. trains a ResNet-20 snapshot ensemble on generated CIFAR-sized data (`--amp bf16` on CUDA),
   imports an FP16 copy and a one-member model, checks placement, parity and batch-1 latency
   in-process, then serves each option and sweeps it with `ensemble-client bench`;
4. writes results.json, results.md and logs.tar.gz under --out, after every step, so a run
   stopped at its time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# Only the standard library at the top: on the device this file runs before anything is installed.

ROOT = Path(__file__).resolve().parents[2]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
STAGE_ENV = "SNAPSERVE_GPU_INSTALLED"  # set by the install step for the re-executed run
EXIT_FAILED, EXIT_NO_CUDA = 1, 3
PART_BYTES = 50 * 1024 * 1024  # the parts ../shared/gpu/ort-gpu-parts.sh makes
CARRY_LIMIT = 64 * 1024 * 1024  # one device call's working tree plus carried paths
ENSEMBLE, ONE, FP16 = "resnet20", "resnet20-one", "resnet20-fp16"
CUDA_GRAPH_SIZES = "1,2,4,8,16,32"
MAX_BATCH = 32
LATENCY_GOAL = 1.3  # the issue's goal: 5 fused members within 1.3x one member at batch 1
SMALL_WHEELS = ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection")


class NoCuda(RuntimeError):
    """CUDA was asked for and would not be used: the run stops instead of measuring the CPU."""


class StepFailed(RuntimeError):
    """A step's command failed; the message holds the end of its log."""


@dataclass(frozen=True)
class Sizes:
    """How much of everything: the full run fits ~6 minutes on an H200, --quick seconds on a CPU."""

    train: int  # generated examples before the trainer's 20% validation hold-out
    test: int
    image: int  # height and width of the generated [3, image, image] inputs (CIFAR: 32)
    depth: int  # ResNet depth, 6n+2: 20 is the CIFAR ResNet-20; 8 keeps the dry run's export short
    epochs: int
    members: int
    batch_size: int
    levels: tuple[int, ...]  # closed-loop concurrency levels of every sweep
    duration_s: float  # measured seconds per level
    warmup_s: float
    parity_examples: int  # test examples sent through every served option
    timing_s: float  # in-process timing budget per graph and batch size
    budget_s: float  # server options still starting after this are skipped


FULL = Sizes(train=10_000, test=2_000, image=32, depth=20, epochs=15, members=5, batch_size=128, levels=(1, 8, 64),
             duration_s=3.0, warmup_s=1.0, parity_examples=1_024, timing_s=0.5, budget_s=330.0)
QUICK = Sizes(train=160, test=64, image=16, depth=8, epochs=2, members=2, batch_size=64, levels=(1, 4),
              duration_s=0.3, warmup_s=0.1, parity_examples=64, timing_s=0.05, budget_s=240.0)


# ---------------------------------------------------------------------------------------------
# Install (device side, before anything else is importable)


def part_files(dirs: Sequence[str | Path]) -> dict[str, Path]:
    """part-NN files by name over several folders (a part carried twice counts once)."""
    parts: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(Path(folder).glob("part-*")):
            parts.setdefault(path.name, path)
    return parts


def _wheel_name(path: Path) -> str:
    """A wheel's proper file name, read from its own dist-info (pip refuses any other name)."""
    with zipfile.ZipFile(path) as wheel:
        info = next(n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))
        tags = [line.split(":", 1)[1].strip() for line in wheel.read(info).decode().splitlines()
                if line.startswith("Tag:")]
    dist = info.split("/")[0][: -len(".dist-info")]
    py, abi = tags[0].split("-")[:2]
    platforms = ".".join(dict.fromkeys(t.split("-")[2] for t in tags))
    return f"{dist}-{py}-{abi}-{platforms}.whl"


def reassemble_wheel(dirs: Sequence[str | Path], dest: Path) -> Path:
    """Joins the carried part-NN files into the onnxruntime-gpu wheel, checked against parts.json."""
    parts = part_files(dirs)
    meta = _parts_meta(dirs)
    expected = [p["name"] for p in meta["parts"]] if meta else \
        [f"part-{i:02d}" for i in range(len(parts))]
    missing = [name for name in expected if name not in parts]
    if not parts or missing:
        raise NoCuda(f"onnxruntime-gpu parts missing: {missing or expected} not found in "
                     f"{[str(d) for d in dirs]}; carry every part in the calls before this one "
                     "(benchmarks/gpu/README.md)")
    dest.mkdir(parents=True, exist_ok=True)
    joined = dest / "joined.whl"
    digest = hashlib.sha256()
    with open(joined, "wb") as out:
        for name in expected:
            data = parts[name].read_bytes()
            digest.update(data)
            out.write(data)
    if meta and digest.hexdigest() != meta["sha256"]:
        raise NoCuda(f"the reassembled onnxruntime-gpu wheel does not match parts.json "
                     f"(sha256 {digest.hexdigest()[:12]} vs {meta['sha256'][:12]}): a part is stale")
    wheel = dest / (meta["wheel"] if meta else _wheel_name(joined))
    joined.replace(wheel)
    return wheel


def cuda_library_dirs(paths: Sequence[str] | None = None) -> list[str]:
    """The lib/ folders of the nvidia-* wheels (cuBLAS, cuDNN, cudart, ...) on sys.path."""
    found: list[str] = []
    for entry in paths if paths is not None else sys.path:
        base = Path(entry or ".") / "nvidia"
        if base.is_dir():
            found += [str(lib) for lib in sorted(base.glob("**/lib")) if any(lib.glob("lib*.so*"))]
    return list(dict.fromkeys(found))


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--no-cache-dir", *args],
                          capture_output=True, text=True, timeout=300)


def link_project(target: Path) -> None:
    """snapserve/<sub> -> <repo>/<folder>, as pyproject.toml's package-dir maps them: the
    project importable without building it (the fallback when pip cannot build here)."""
    package = target / "snapserve"
    package.mkdir(parents=True, exist_ok=True)
    for name, folder in _package_dirs():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)


def _package_dirs() -> list[tuple[str, str]]:
    """(subpackage, folder) pairs of pyproject.toml's [tool.setuptools] package-dir."""
    text = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"^package-dir\s*=\s*\{(.*?)\}", text, re.M | re.S)
    if table is None:
        raise StepFailed("pyproject.toml has no [tool.setuptools] package-dir")
    return re.findall(r'"snapserve\.(\w+)"\s*=\s*"([^"]+)"', table.group(1))


def _source_copy(dest: Path) -> Path:
    """What the build reads, copied out of the working tree: setuptools writes build/ and
    *.egg-info next to the sources, and a stale build/ keeps modules that have since moved."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for _, folder in _package_dirs():
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _parts_meta(dirs: Sequence[str | Path]) -> dict[str, Any] | None:
    path = next((Path(d) / "parts.json" for d in dirs if (Path(d) / "parts.json").is_file()), None)
    return json.loads(path.read_text()) if path else None


def install(args: argparse.Namespace) -> dict[str, Any]:
    """Installs the carried wheels and the project under --site; returns what it did. A rerun
    on a warm machine finds the wheels installed (deps.json) and skips them."""
    site = Path(args.site)
    deps, marker = site / "deps", site / "deps.json"
    installed = json.loads(marker.read_text()) if marker.is_file() else []
    wheels: list[Path] = []
    if args.ort_parts:
        meta = _parts_meta(args.ort_parts)
        kept = site / "wheel" / meta["wheel"] if meta else None
        if kept is not None and kept.is_file() and meta["wheel"] in installed:
            wheels.append(kept)  # installed by an earlier call of this machine
        else:
            wheels.append(reassemble_wheel(args.ort_parts, site / "wheel"))
    if args.wheels:
        wheels += sorted(Path(args.wheels).glob("*.whl"))
    wanted = [w.name for w in wheels]
    info: dict[str, Any] = {"site": str(site), "wheels": wanted, "reinstalled": wanted != installed}
    if wheels and wanted != installed:
        shutil.rmtree(deps, ignore_errors=True)
        done = _pip("--target", str(deps), *map(str, wheels))
        if done.returncode != 0:
            raise NoCuda(f"pip could not install {wanted}:\n{done.stderr[-2000:]}")
        marker.write_text(json.dumps(wanted))
    project = site / "project"
    shutil.rmtree(project, ignore_errors=True)  # the tree may have changed since the last call
    if _importable("snapserve.server") and _importable("snapserve.trainer"):
        info["project"] = "already importable"
    else:
        built = _pip("--no-build-isolation", "--target", str(project), str(_source_copy(site / "source")))
        if built.returncode == 0:
            info["project"] = "pip install --no-deps of the working tree"
        else:
            shutil.rmtree(project, ignore_errors=True)
            link_project(project)
            why = [line.strip() for line in built.stderr.splitlines() if "rror" in line][:3]
            info["project"] = f"linked to the working tree (pip could not build it: {' / '.join(why)})"
    info["pythonpath"] = [str(project), str(deps)]
    info["ld_library_path"] = cuda_library_dirs()
    return info


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def reexec_installed(info: dict[str, Any], argv: Sequence[str]) -> None:
    """Runs this script again with the installed paths: LD_LIBRARY_PATH must be set before the
    process starts for the dynamic loader (and the server's) to see it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*info["pythonpath"], env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [*info["ld_library_path"], env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env[STAGE_ENV] = json.dumps(info)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


# ---------------------------------------------------------------------------------------------
# CUDA checks


PROBE = r"""
import json, onnx, onnxruntime as ort
from onnx import TensorProto, helper
w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.5] * 16)
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
model.ir_version = 9
providers = ort.get_available_providers()
placed = None
if "CUDAExecutionProvider" in providers:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    placed = session.get_providers()
print(json.dumps({"version": ort.__version__, "file": ort.__file__, "available": providers,
                  "placed": placed}))
"""


def require_cuda_provider(probe: dict[str, Any]) -> None:
    """NoCuda unless ONNX Runtime has the CUDA provider and put the probe session on it."""
    if CUDA not in probe["available"]:
        raise NoCuda(f"--device cuda, but onnxruntime {probe['version']} ({probe['file']}) has no "
                     f"{CUDA} (available: {', '.join(probe['available'])}). Install onnxruntime-gpu "
                     "(benchmarks/gpu/README.md); refusing to benchmark on the CPU.")
    if not probe["placed"] or probe["placed"][0] != CUDA:
        raise NoCuda(f"--device cuda, but ONNX Runtime put a CUDA session on {probe['placed']}: "
                     "it fell back to the CPU (CUDA libraries not found? LD_LIBRARY_PATH="
                     f"{os.environ.get('LD_LIBRARY_PATH', '')!r}); refusing to benchmark on the CPU.")


def probe_onnxruntime() -> dict[str, Any]:
    """The provider check in a fresh process without torch, as the server will be: importing
    torch first would load the CUDA libraries and hide a missing LD_LIBRARY_PATH."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise NoCuda(f"the onnxruntime probe failed:\n{done.stderr[-2000:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    probe["stderr"] = done.stderr[-2000:]
    return probe


def require_torch_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoCuda(f"--device cuda, but torch {torch.__version__} sees no CUDA device "
                     f"(torch.version.cuda {torch.version.cuda}); refusing to train on the CPU.")


def session_on(session: Any, device: str, what: str) -> str:
    """The provider ONNX Runtime put `session` on; NoCuda when CUDA was asked and it is not CUDA."""
    placed = session.get_providers()[0]
    if device == "cuda" and placed != CUDA:
        raise NoCuda(f"{what}: ONNX Runtime placed the session on {placed}, not {CUDA} "
                     "(it falls back quietly when the CUDA libraries fail to load)")
    return placed


# ---------------------------------------------------------------------------------------------
# Facts about the machine


def _command_output(*cmd: str) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # a missing or broken package is a fact to record, not a failure
        return None


def device_facts(probe: dict[str, Any] | None) -> dict[str, Any]:
    import numpy as np

    facts: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(),
        "versions": {"numpy": np.__version__, "torch": _version("torch"),
                     "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"),
                     "grpcio": _version("grpc"), "protobuf": _protobuf_version()},
    }
    if probe is not None:
        facts["onnxruntime"] = {k: probe[k] for k in ("version", "file", "available", "placed")}
    else:
        import onnxruntime as ort

        facts["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__,
                                "available": ort.get_available_providers(), "placed": None}
    facts["gpu"] = _gpu_facts()
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(kib / 2**20, 1)


def _protobuf_version() -> str | None:
    try:
        from google import protobuf

        return protobuf.__version__
    except Exception:
        return None


def _gpu_facts() -> dict[str, Any] | None:
    try:
        import torch
    except Exception:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    facts: dict[str, Any] = {
        "name": props.name, "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    }
    query = _command_output("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                            "clocks.max.sm,power.draw,temperature.gpu", "--format=csv,noheader")
    if query:
        keys = ("smi_name", "driver", "smi_memory", "sm_clock", "sm_clock_max", "power", "temperature")
        facts.update(dict(zip(keys, (v.strip() for v in query.splitlines()[0].split(",")))))
    header = _command_output("nvidia-smi") or ""
    if match := re.search(r"CUDA Version:\s*([\d.]+)", header):
        facts["driver_cuda"] = match.group(1)
    return facts


# ---------------------------------------------------------------------------------------------
# Data


def write_dataset(path: Path, train: int, test: int, size: int = 32, seed: int = 0) -> None:
    """CIFAR-sized [N, 3, size, size] float32 pixels in 0..255, 10 classes. A class is a grating
    of its own frequency and orientation (a colour phase per channel); each example has a random
    phase (a shift: no linear model can average it out), contrast and noise, so a CNN learns it
    in a few epochs, not perfectly: FP16 parity then has close calls to disagree on."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frequency = rng.uniform(1.5, 6.0, 10)  # cycles per image
    angle = rng.uniform(0.0, np.pi, 10)
    colour = rng.uniform(0.0, 2 * np.pi, (10, 3, 1, 1))
    grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")

    def split(n: int) -> tuple[Any, Any]:
        y = rng.integers(0, 10, n)
        along = (np.cos(angle[y])[:, None, None] * xx + np.sin(angle[y])[:, None, None] * yy)
        wave = 2 * np.pi * frequency[y][:, None, None] * along + rng.uniform(0, 2 * np.pi, (n, 1, 1))
        x = np.sin(wave[:, None] + colour[y]) * rng.uniform(0.15, 0.6, (n, 1, 1, 1))
        x = x + rng.normal(0, 1.5, (n, 3, size, size))
        return (x * 40 + 128).clip(0, 255).astype(np.float32), y.astype(np.int64)

    x_train, y_train = split(train)
    x_test, y_test = split(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


# ---------------------------------------------------------------------------------------------
# The model repository (docs/model-repository.md: the trainer/server contract)


def latest_version(repo: Path, model: str) -> Path:
    versions = [p for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise StepFailed(f"{repo / model}: no version folder")
    return max(versions, key=lambda p: int(p.name))


def read_manifest(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / "manifest.json").read_text())


def normalized(x: Any, manifest: dict[str, Any]) -> Any:
    import numpy as np

    norm = manifest["input"].get("normalization")
    if not norm:
        return np.ascontiguousarray(x, dtype=np.float32)
    shape = [1] * x.ndim
    shape[norm.get("axis", 1)] = -1
    mean = np.asarray(norm["mean"], np.float32).reshape(shape)
    std = np.asarray(norm["std"], np.float32).reshape(shape)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# In-process ONNX Runtime: placement, parity, latency


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


# ---------------------------------------------------------------------------------------------
# Serving


LOADED = re.compile(r"loaded model (\S+) version (\d+)")
REFUSED = re.compile(r"refusing model (\S+) version (\S+): (.*)")
SERVING = re.compile(r"serving on (\S+:\d+)")


@dataclass(frozen=True)
class Plan:
    """One server start: its flags, what is swept (all levels, or batch 1 only) and predicted."""

    name: str
    flags: tuple[str, ...]
    sweep: tuple[str, ...] = ()  # models swept at every level
    batch1: tuple[str, ...] = ()  # models measured at concurrency 1 only
    predict: tuple[str, ...] = ()  # models whose answers on test data are checked
    inspect: tuple[str, ...] = ()  # models only loaded and asked for their metadata
    on_cpu: bool = False  # always --device cpu (the CPU comparison)
    cuda_only: bool = False
    needs: tuple[str, ...] = ()  # server flags this plan needs
    expect: dict[str, Any] = field(default_factory=dict)  # graph, cuda_graphs, fp16

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.sweep + self.batch1 + self.predict + self.inspect))


def plans(cpu_instances: int) -> list[Plan]:
    """Every option, most important first (a run short of time drops the tail)."""
    graphs = ("--cuda-graph-batch-sizes", CUDA_GRAPH_SIZES)
    return [
        Plan("fused", ("--graph", "fused"), sweep=(ENSEMBLE,), batch1=(ONE,), predict=(ENSEMBLE, FP16),
             needs=("--graph",), expect={"graph": "fused"}),
        Plan("members", ("--graph", "members"), sweep=(ENSEMBLE,), batch1=(ONE,), predict=(ENSEMBLE,),
             needs=("--graph",), expect={"graph": "members"}),
        Plan("fused+cuda-graphs", ("--graph", "fused", *graphs), sweep=(ENSEMBLE,), batch1=(ONE,),
             predict=(ENSEMBLE,), cuda_only=True, needs=("--graph", graphs[0]),
             expect={"graph": "fused", "cuda_graphs": True}),
        Plan("cpu", ("--graph", "auto", "--instances", str(cpu_instances), "--intra-op-threads", "1"),
             sweep=(ENSEMBLE,), predict=(ENSEMBLE,), on_cpu=True),
        Plan("fp16", ("--graph", "fused", "--precision", "fp16"), sweep=(FP16,), predict=(FP16,),
             needs=("--graph", "--precision"), expect={"graph": "fused", "fp16": True}),
        Plan("fp16+cuda-graphs", ("--graph", "fused", "--precision", "fp16", *graphs), sweep=(FP16,),
             predict=(FP16,), cuda_only=True, needs=("--graph", "--precision", graphs[0]),
             expect={"graph": "fused", "fp16": True, "cuda_graphs": True}),
        Plan("no-io-binding", ("--graph", "fused", "--no-io-binding"), sweep=(ENSEMBLE,), batch1=(ONE,),
             cuda_only=True, needs=("--no-io-binding",), expect={"graph": "fused"}),
        Plan("auto", ("--graph", "auto"), inspect=(ENSEMBLE, ONE), cuda_only=True, needs=("--graph",)),
    ]


def server_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text))


def log_segments(text: str) -> dict[str, list[str]]:
    """The server's load log cut per model: a model's lines end with its 'loaded model' or
    'refusing model' line (models load one after another at start-up)."""
    segments: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        current.append(line)
        match = LOADED.search(line) or REFUSED.search(line)
        if match:
            segments.setdefault(match.group(1), []).extend(current)
            current = []
    return segments


def load_facts(lines: Sequence[str]) -> dict[str, Any]:
    """What the server's log says about one model's load: graph, CUDA graphs, FP16, refusals."""
    text = "\n".join(lines)
    facts: dict[str, Any] = {}
    if match := re.search(r"serving the (\w+) graph on (\d+) instance", text):
        facts["graph_logged"], facts["instances_logged"] = match.group(1), int(match.group(2))
    if "CUDA graphs for batch sizes" in text:
        facts["cuda_graphs"] = True
    if match := re.search(r"no CUDA graphs \((.*)\); running without them", text):
        facts["cuda_graphs"], facts["cuda_graphs_refused"] = False, match.group(1)[:500]
    if "has no FP16 fused graph" in text:
        facts["fp16_missing"] = True
    if match := re.search(r"the fused graph cannot be used \((.*)\)", text):
        facts["fused_refused"] = match.group(1)[:500]
    if match := re.search(r"the fused graph's probabilities differ from the members' by (\S+)", text):
        facts["fused_mismatch"] = match.group(1)  # graph auto then serves the members
    if match := REFUSED.search(text):
        facts["refused"] = match.group(3)[:500]
    return facts


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


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


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


# ---------------------------------------------------------------------------------------------
# The run


class Run:
    """Holds the results, writes them after every step, and runs the steps' commands."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args, self.sizes, self.device = args, sizes, args.device
        self.began = time.perf_counter()
        self.out = Path(args.out).resolve()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="snapserve-gpu-")).resolve()
        self.repo, self.logs = self.work / "repo", self.work / "logs"
        for folder in (self.out, self.repo, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.results: dict[str, Any] = {
            "schema": 1, "status": "running", "error": None,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "mode": "quick" if args.quick else "full", "device_asked": args.device,
            "sizes": asdict(sizes), "phases": {}, "notes": [],
        }

    # -- plumbing

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        self.say(f"{name} ...")
        try:
            yield
        finally:
            self.results["phases"][name] = round(time.perf_counter() - began, 2)
            self.save()

    def python(self, name: str, args: Sequence[str], timeout_s: float) -> str:
        """Runs `python <args>` in the work folder; its output goes to logs/<name>.log."""
        log = self.logs / f"{name}.log"
        command = [sys.executable, *args]
        with open(log, "wb") as out:
            try:
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=self.work,
                                      env=self.env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"{name}: still running after {timeout_s:.0f} s; stopped:\n"
                                 f"{tail(log.read_text(errors='replace'))}") from None
        text = log.read_text(errors="replace")
        if done.returncode != 0:
            raise StepFailed(f"{name}: exit status {done.returncode}:\n{tail(text)}")
        return text

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        for name, text in (("results.json", json.dumps(self.results, indent=2, default=str)),
                           ("results.md", render_markdown(self.results))):
            temporary = self.out / f".{name}.tmp"
            temporary.write_text(text + "\n")
            temporary.replace(self.out / name)

    def pack_logs(self) -> None:
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as archive:
            for log in sorted(self.logs.glob("*.log")):
                archive.add(log, arcname=f"logs/{log.name}")

    # -- steps

    def preflight(self) -> None:
        probe = probe_onnxruntime() if self.device == "cuda" else None
        self.results["device"] = device_facts(probe)  # recorded first: a refusal needs them most
        self.results["install"] = json.loads(os.environ.get(STAGE_ENV, "null"))
        if probe is not None:
            require_cuda_provider(probe)
            require_torch_cuda()
        gpu = self.results["device"].get("gpu")
        self.say(f"device {self.device}: " + (f"{gpu['name']}, driver {gpu.get('driver')}, CUDA "
                 f"{gpu.get('driver_cuda')}" if gpu else self.results["device"]["cpu"]) +
                 f"; onnxruntime {self.results['device']['versions']['onnxruntime']}")

    def train(self) -> None:
        s = self.sizes
        data = self.work / "cifar-synth.npz"
        write_dataset(data, s.train, s.test, s.image)
        amp = self.args.amp or ("bf16" if self.device == "cuda" else "off")
        threads = str(max(1, min(8, os.cpu_count() or 1)))
        command = ["-m", "snapserve.trainer", "train", "--method", "snapshot", "--dataset", str(data),
                   "--arch", "resnet", "--depth", str(s.depth), "--epochs", str(s.epochs),
                   "--members", str(s.members), "--batch-size", str(s.batch_size), "--lr", "0.1",
                   "--seed", "0", "--device", self.device, "--amp", amp, "--threads", threads,
                   "--no-plots", "--out", str(self.repo), "--name", ENSEMBLE]
        began = time.perf_counter()
        text = self.python("train", command, timeout_s=600 if self.device == "cuda" else 300)
        wall = time.perf_counter() - began
        self.results["train"] = train_summary(latest_version(self.repo, ENSEMBLE), text, wall, amp)
        t = self.results["train"]
        self.say(f"trained {t['members_exported']} members in {t['wall_s']:.1f} s; epoch "
                 f"{t['median_epoch_s']} s (first {t['first_epoch_s']} s), {t['steps_per_s']} steps/s")

    def reusable(self) -> bool:
        return (self.work / "cifar-synth.npz").is_file() and all(
            (self.repo / m).is_dir() for m in (ENSEMBLE, ONE, FP16))

    def reuse(self) -> None:
        """--reuse: the models an earlier call trained in --work (a rerun on a warm machine)."""
        log = self.logs / "train.log"
        amp = self.args.amp or ("bf16" if self.device == "cuda" else "off")
        self.results["train"] = train_summary(latest_version(self.repo, ENSEMBLE),
                                              log.read_text() if log.is_file() else "", None, amp)
        self.results["imports"] = {name: import_summary(self.repo, name) for name in (ONE, FP16)}
        self.results["notes"].append(f"models reused from an earlier run in {self.work}")
        self.say("reusing the models trained by an earlier run")

    def import_variants(self) -> None:
        version = latest_version(self.repo, ENSEMBLE)
        manifest = read_manifest(version)
        norm = manifest["input"].get("normalization") or {}
        shared = [*(["--mean", *map(str, norm["mean"]), "--std", *map(str, norm["std"])] if norm else [])]
        members = [str(version / m["file"]) for m in manifest["members"]]
        out = self.results.setdefault("imports", {})
        for name, files, extra in ((FP16, members, ["--fp16", "--temperature", str(manifest["temperature"])]),
                                   (ONE, members[:1], [])):
            try:
                self.python(f"import-{name}", ["-m", "snapserve.trainer", "import", "--members", *files,
                                               "--out", str(self.repo), "--name", name, *shared, *extra],
                            timeout_s=300)
                out[name] = import_summary(self.repo, name)
            except StepFailed as exc:
                out[name] = {"error": str(exc)}
                self.say(f"import {name} failed: {str(exc).splitlines()[0]}")
        fp16 = (out.get(FP16) or {}).get("fp16")
        self.say(f"imported {ONE} and {FP16} (FP16 graph: "
                 + (f"max |dp| {fp16['max_abs_diff']:.2e} on random inputs)" if fp16 else "not written)"))

    def in_process(self) -> None:
        import numpy as np

        result: dict[str, Any] = {"placement": {}, "parity": {}, "latency_ms": {}, "errors": {}}
        self.results["in_process"] = result
        data = np.load(self.work / "cifar-synth.npz")
        ens_dir = latest_version(self.repo, ENSEMBLE)
        manifest = read_manifest(ens_dir)
        x = normalized(data["x_test"][: self.sizes.parity_examples], manifest)
        labels = data["y_test"][: self.sizes.parity_examples]
        files = {"ensemble.onnx": (ens_dir / manifest["ensemble"]["file"], manifest, "fused"),
                 "member-000.onnx": (ens_dir / manifest["members"][0]["file"], manifest, "member")}
        for name in (ONE, FP16):
            if (self.repo / name).is_dir():
                m = read_manifest(latest_version(self.repo, name))
                ens = m.get("ensemble") or {}
                key = f"{name}/" + ((ens.get("fp16") or {}).get("file", "") if name == FP16 else ens.get("file", ""))
                if ens:
                    files[key] = (latest_version(self.repo, name) / key.split("/", 1)[1], m, "fused")
        reference = fused_probabilities(open_session(files["ensemble.onnx"][0], "cpu"), manifest, x)
        result["parity"]["reference"] = "ensemble.onnx on ONNX Runtime's CPU provider, all threads"
        result["parity"]["ensemble.onnx (cpu)"] = compare(reference, reference, labels)
        errors = result["errors"]
        for key, (path, m, kind) in files.items():
            if path.is_file():
                with recorded(errors, key):
                    self._inspect_graph(result, key, path, m, kind, x, labels, reference)
        for index, member in enumerate(manifest["members"]):
            with recorded(errors, member["file"]):
                self._member_parity(result, index, ens_dir / member["file"], manifest, member, x, labels)
        fused, one = result["latency_ms"].get("ensemble.onnx"), result["latency_ms"].get("member-000.onnx")
        if fused and one:
            ways = [w for w in ("host", "device_resident") if w in fused["1"] and w in one["1"]]
            result["batch1_ratio"] = {w: fused["1"][w]["median_ms"] / one["1"][w]["median_ms"] for w in ways}
            self.say(f"in-process batch 1, {len(manifest['members'])} members fused vs one member: "
                     + ", ".join(f"{w} {fused['1'][w]['median_ms']:.3f} vs {one['1'][w]['median_ms']:.3f} ms"
                                 for w in ways))

    def _inspect_graph(self, result: dict[str, Any], key: str, path: Path, manifest: dict[str, Any],
                       kind: str, x: Any, labels: Any, reference: Any) -> None:
        import numpy as np

        session = open_session(path, self.device, profile=self.logs / f"profile-{path.stem}")
        placed = session_on(session, self.device, key)
        one = x[:1]
        feeds = fused_feeds(manifest, one) if kind == "fused" else {manifest["input"]["name"]: one}
        result["placement"][key] = {"provider": placed, **node_placement(session, feeds)}
        if self.device == "cuda" and "provider_options" not in result:
            result["provider_options"] = session.get_provider_options().get(CUDA, {})
        del session
        session = open_session(path, self.device)
        if kind == "fused" and not key.startswith(ONE):  # one member is another model than the reference
            result["parity"][key] = compare(fused_probabilities(session, manifest, x), reference, labels)
        timings = {}
        for batch in (1, MAX_BATCH):
            xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
            feeds = fused_feeds(manifest, xb) if kind == "fused" else {manifest["input"]["name"]: xb}
            timings[str(batch)] = latency(session, feeds, self.device, self.sizes.timing_s)
            if "device_resident_error" in timings[str(batch)]:
                result["errors"][f"{key} batch {batch} device-resident"] = timings[str(batch)]["device_resident_error"]
        result["latency_ms"][key] = timings

    def _member_parity(self, result: dict[str, Any], index: int, path: Path, manifest: dict[str, Any],
                       member: dict[str, Any], x: Any, labels: Any) -> None:
        reference = member_probabilities(open_session(path, "cpu"), manifest, x)
        session = open_session(path, self.device)
        session_on(session, self.device, path.name)
        row = compare(member_probabilities(session, manifest, x), reference, labels)
        row["trainer_test_accuracy"] = member.get("metrics", {}).get("accuracy")
        result["parity"][f"member-{index:03d} ({self.device} vs cpu)"] = row

    def serve(self) -> None:
        help_text = self.python("server-help", ["-m", "snapserve.server", "--help"], timeout_s=60)
        flags = server_flags(help_text)
        serve = self.results.setdefault("serve", {})
        self.results["options"] = option_availability(flags)
        cpu_instances = 1 if self.args.quick else max(1, min(8, (os.cpu_count() or 2) // 2))
        wanted = set(self.args.only.split(",")) if self.args.only else None
        for plan in plans(cpu_instances):
            if wanted is not None and plan.name not in wanted:
                continue
            skip = self._skip_reason(plan, flags)
            if skip:
                serve[plan.name] = {"status": "skipped", "reason": skip}
                self.say(f"serve {plan.name}: skipped ({skip})")
                continue
            try:
                serve[plan.name] = self._serve_plan(plan, flags)
            except NoCuda:
                raise
            except Exception as exc:  # one option failing is a finding; the others still run
                serve[plan.name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                self.say(f"serve {plan.name}: FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            self.save()

    def _skip_reason(self, plan: Plan, flags: set[str]) -> str | None:
        missing = [f for f in plan.needs if f not in flags]
        if missing:
            return f"not available: the server has no {', '.join(missing)} flag"
        if plan.cuda_only and self.device != "cuda":
            return "needs --device cuda"
        absent = [m for m in plan.models if not (self.repo / m).is_dir()]
        if absent:
            return f"models not written: {', '.join(absent)}"
        estimate = 15 + sum((len(self.sizes.levels) if m in plan.sweep else 1) *
                            (self.sizes.duration_s + self.sizes.warmup_s) for m in plan.sweep + plan.batch1)
        if self.elapsed() + estimate > self.sizes.budget_s:
            return f"time budget: {self.elapsed():.0f} s used of {self.sizes.budget_s:.0f} s"
        return None

    def _server_command(self, plan: Plan, flags: set[str]) -> list[str]:
        device = "cpu" if plan.on_cpu else self.device
        command = [sys.executable, "-m", "snapserve.server", "--model-repository", str(self.repo),
                   "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--device", device,
                   "--max-batch-size", str(MAX_BATCH), "--log-level", "INFO", *plan.flags]
        if "--grace-s" in flags:
            command += ["--grace-s", "1"]
        if "--version-policy" in flags and "--pin" in flags:  # load only the plan's models
            command += ["--version-policy", "specific"]
            for model in plan.models:
                command += ["--pin", f"{model}={latest_version(self.repo, model).name}"]
        return command

    def _serve_plan(self, plan: Plan, flags: set[str]) -> dict[str, Any]:
        device = "cpu" if plan.on_cpu else self.device
        command = self._server_command(plan, flags)
        entry: dict[str, Any] = {"status": "ok", "device": device, "flags": command[command.index("--device"):],
                                 "models": {}}
        self.say(f"serve {plan.name}: starting ({' '.join(plan.flags)})")
        server = Server(command, self.logs / f"server-{plan.name}.log", self.work, timeout_s=180)
        try:
            with server:
                entry["load_s"] = round(server.load_s, 2)
                self._check_loaded(plan, device, server, entry)
                for model in plan.sweep + plan.batch1:
                    levels = self.sizes.levels if model in plan.sweep else (1,)
                    entry["models"][model]["bench"] = self._bench(plan, model, server.address, levels)
                for model in plan.predict:
                    entry["models"][model]["parity"] = self._served_parity(server.address, model, device)
        finally:
            entry["log_tail"] = tail(server.text(), 8)
        self.say(f"serve {plan.name}: " + plan_line(entry, plan))
        return entry

    def _check_loaded(self, plan: Plan, device: str, server: Server, entry: dict[str, Any]) -> None:
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

    def _bench(self, plan: Plan, model: str, address: str, levels: Sequence[int]) -> dict[str, Any]:
        out = self.logs / f"bench-{plan.name}-{model}.json"
        s = self.sizes
        self.python(f"bench-{plan.name}-{model}",
                    ["-m", "snapserve.client", "bench", "--target", address, "--model", model,
                     "--concurrency", ",".join(map(str, levels)), "--duration", str(s.duration_s),
                     "--warmup", str(s.warmup_s), "--json", str(out)],
                    timeout_s=60 + len(levels) * (s.duration_s + s.warmup_s) * 3)
        return bench_levels(json.loads(out.read_text()))

    def _served_parity(self, address: str, model: str, device: str) -> dict[str, float]:
        """The served probabilities of the test examples against the CPU reference (the FP32
        fused graph in-process), in requests of MAX_BATCH examples (CUDA graphs pad them)."""
        import grpc
        import numpy as np

        from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
        from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
        from snapserve.proto.tensors import from_tensor, to_tensor

        data = np.load(self.work / "cifar-synth.npz")
        manifest = read_manifest(latest_version(self.repo, ENSEMBLE))
        # A CPU server computes ResNet-20 x5 at ~0.4 GFLOP per example, one request at a time on
        # one single-threaded instance here: fewer examples there.
        n = self.sizes.parity_examples if device == "cuda" else min(self.sizes.parity_examples, 128)
        x, labels = normalized(data["x_test"][:n], manifest), data["y_test"][:n]
        reference = self._reference(manifest, x)
        answers = []
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            for start in range(0, n, MAX_BATCH - 3):  # odd sizes: exercise padding to a bucket
                request = pb.PredictRequest(model=model)
                to_tensor(x[start:start + MAX_BATCH - 3], request.input)
                answers.append(from_tensor(stub.Predict(request, timeout=60).probabilities))
        return compare(np.concatenate(answers), reference, labels)

    def _reference(self, manifest: dict[str, Any], x: Any) -> Any:
        """The FP32 fused graph on ONNX Runtime's CPU provider, computed once per version."""
        import numpy as np

        version = latest_version(self.repo, ENSEMBLE)
        cache = self.work / f"reference-v{version.name}-{len(x)}.npy"
        if not cache.is_file():
            session = open_session(version / manifest["ensemble"]["file"], "cpu")
            np.save(cache, fused_probabilities(session, manifest, x))
        return np.load(cache)

    def headline(self) -> None:
        self.results["headline"] = headline(self.results, self.sizes.levels[-1])
        for line in summary_lines(self.results):
            print(line, flush=True)


@contextmanager
def recorded(errors: dict[str, str], key: str) -> Iterator[None]:
    """An in-process check that fails is a finding to record, not the end of the run; a
    session on the CPU under --device cuda still is (NoCuda passes through)."""
    try:
        yield
    except NoCuda:
        raise
    except Exception as exc:  # ONNX Runtime raises its own unnamed exception types
        errors[key] = f"{type(exc).__name__}: {str(exc)[:600]}"


def import_summary(repo: Path, name: str) -> dict[str, Any]:
    imported = read_manifest(latest_version(repo, name))
    fused = imported.get("ensemble") or {}
    return {"members": len(imported["members"]), "fused": fused.get("file"), "fp16": fused.get("fp16")}


def train_summary(version: Path, log: str, wall_s: float | None, amp: str) -> dict[str, Any]:
    manifest = read_manifest(version)
    training = manifest.get("training", {})
    report_path = version / "report" / "metrics.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    seconds = (report.get("history") or {}).get("seconds") or []
    later = seconds[1:] or seconds
    median = statistics.median(later) if later else None
    steps = training.get("steps_per_epoch")
    parity = [float(v) for v in re.findall(r"parity max abs diff ([0-9.eE+-]+)", log)]
    return {
        "version": str(version.relative_to(version.parents[1])),
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "device": training.get("device"), "amp": training.get("amp", amp),
        "channels_last": training.get("channels_last"), "epochs": training.get("epochs"),
        "members_exported": len(manifest["members"]), "steps_per_epoch": steps,
        "total_steps": training.get("total_steps"), "splits": training.get("splits"),
        "epoch_seconds": [round(s, 3) for s in seconds],
        "first_epoch_s": round(seconds[0], 3) if seconds else None,
        "median_epoch_s": round(median, 3) if median else None,
        "steps_per_s": round(steps / median, 1) if steps and median else None,
        "train_seconds": training.get("train_seconds"), "export_seconds": training.get("export_seconds"),
        "export_parity": {
            "checked": "the trainer refuses to write a member whose ONNX Runtime (CPU) probabilities "
                       "differ from PyTorch's (CPU, eval) by more than 1e-4 on the test split",
            "logged_max_abs_diff": max(parity) if parity else None,
            "fused_max_abs_diff": (manifest.get("ensemble") or {}).get("max_abs_diff"),
        },
        "test_accuracy": manifest.get("metrics", {}).get("accuracy"),
        "members_test_accuracy": [m.get("metrics", {}).get("accuracy") for m in manifest["members"]],
        "versions": training.get("versions"),
    }


def option_availability(flags: set[str]) -> dict[str, str]:
    """Which of the issue's options the server offers, read off its --help."""
    def have(flag: str, what: str) -> str:
        return f"available ({flag})" if flag in flags else f"not available: no {flag} flag ({what})"

    io = ("available (--no-io-binding)" if "--no-io-binding" in flags else
          "not available as an option: the server has no flag for it; on CUDA it always binds "
          "inputs and outputs (IO binding), so no 'without' can be measured")
    return {"graph": have("--graph", "fused or members"), "io_binding": io,
            "cuda_graphs": have("--cuda-graph-batch-sizes", "CUDA graphs of the fused graph"),
            "fp16": have("--precision", "the FP16 fused graph"),
            "instances": have("--instances", "runtime copies per model")}


def expectation_gaps(plan: Plan, model: str, facts: dict[str, Any]) -> list[str]:
    """Where what the server did differs from what the plan asked for."""
    gaps = []
    graph = facts.get("runtime", {}).get("graph")
    if "graph" in plan.expect and graph != plan.expect["graph"]:
        gaps.append(f"asked for the {plan.expect['graph']} graph, GetModel says {graph!r}"
                    + (f" (fused refused: {facts['fused_refused']})" if "fused_refused" in facts else ""))
    if plan.expect.get("cuda_graphs") and facts.get("cuda_graphs") is not True:
        gaps.append("CUDA graphs asked for but not in use: "
                    + facts.get("cuda_graphs_refused", "the log does not say they were captured"))
    if plan.expect.get("fp16") and facts.get("fp16_missing"):
        gaps.append("FP16 asked for, but the version has no FP16 graph: served FP32")
    return gaps


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


# ---------------------------------------------------------------------------------------------
# The headline and the report


def _cell(results: dict[str, Any], plan: str, model: str, level: int) -> dict[str, Any] | None:
    entry = (results.get("serve") or {}).get(plan) or {}
    return (((entry.get("models") or {}).get(model) or {}).get("bench") or {}).get(str(level))


def headline(results: dict[str, Any], top: int) -> dict[str, Any]:
    """Batch-1 latency of the fused ensemble against one member (served and in-process), and
    the best throughput at the top concurrency against the CPU server's."""
    device_plans = [p for p, e in (results.get("serve") or {}).items()
                    if e.get("status") == "ok" and e.get("device") == results["device_asked"]
                    and p != "cpu"]
    pairs = {}
    for plan in device_plans:
        ens, one = _cell(results, plan, ENSEMBLE, 1), _cell(results, plan, ONE, 1)
        if ens and one and ens["p50_ms"] and one["p50_ms"]:
            pairs[plan] = {"ensemble_p50_ms": ens["p50_ms"], "one_member_p50_ms": one["p50_ms"],
                           "ratio": ens["p50_ms"] / one["p50_ms"]}
    best: dict[str, Any] = {}
    if pairs:
        ens_plan = min(pairs, key=lambda p: pairs[p]["ensemble_p50_ms"])
        one_plan = min(pairs, key=lambda p: pairs[p]["one_member_p50_ms"])
        ratio = pairs[ens_plan]["ensemble_p50_ms"] / pairs[one_plan]["one_member_p50_ms"]
        best = {"ensemble": {"plan": ens_plan, "p50_ms": pairs[ens_plan]["ensemble_p50_ms"]},
                "one_member": {"plan": one_plan, "p50_ms": pairs[one_plan]["one_member_p50_ms"]},
                "ratio": ratio, "goal": LATENCY_GOAL, "met": ratio <= LATENCY_GOAL}
    throughput = {}
    for plan in device_plans:
        for model in (ENSEMBLE, FP16):
            if cell := _cell(results, plan, model, top):
                throughput[f"{plan}/{model}"] = cell["examples_per_s"]
    cpu = _cell(results, "cpu", ENSEMBLE, top)
    top_entry: dict[str, Any] = {"concurrency": top, "device": throughput,
                                 "cpu": cpu["examples_per_s"] if cpu else None}
    if throughput and cpu and cpu["examples_per_s"]:
        winner = max(throughput, key=throughput.get)  # type: ignore[arg-type]
        top_entry.update(best=winner, ratio_to_cpu=throughput[winner] / cpu["examples_per_s"])
    in_process = (results.get("in_process") or {}).get("batch1_ratio")
    return {"batch1_served": {"per_plan": pairs, "best": best},
            "batch1_in_process_ratio": in_process, "throughput": top_entry}


def summary_lines(results: dict[str, Any]) -> list[str]:
    h = results.get("headline") or {}
    lines = ["", "== summary =="]
    if device := results.get("device"):
        gpu = device.get("gpu")
        lines.append("device: " + (f"{gpu['name']} (driver {gpu.get('driver')}, CUDA {gpu.get('driver_cuda')})"
                                   if gpu else f"{device['cpu']} ({device['cpu_count']} cores)")
                     + f", onnxruntime {device['versions']['onnxruntime']}")
    if t := results.get("train"):
        lines.append(f"train: {t['members_exported']} members, epoch {t['median_epoch_s']} s, "
                     f"{t['steps_per_s']} steps/s, test accuracy {t['test_accuracy']}")
    best = (h.get("batch1_served") or {}).get("best")
    if best:
        lines.append(f"batch 1 served: ensemble {best['ensemble']['p50_ms']:.2f} ms ({best['ensemble']['plan']}) "
                     f"vs one member {best['one_member']['p50_ms']:.2f} ms ({best['one_member']['plan']}): "
                     f"{best['ratio']:.2f}x, goal <= {LATENCY_GOAL} " + ("met" if best["met"] else "NOT met"))
    if ratio := h.get("batch1_in_process_ratio"):
        lines.append("batch 1 in-process ratio: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    top = h.get("throughput") or {}
    if top.get("best"):
        lines.append(f"c={top['concurrency']}: best {top['best']} {top['device'][top['best']]:.0f} ex/s vs "
                     f"cpu {top['cpu']:.0f} ex/s = {top['ratio_to_cpu']:.2f}x")
    for name, entry in (results.get("serve") or {}).items():
        if entry.get("status") != "ok":
            lines.append(f"serve {name}: {entry.get('status')} ({entry.get('reason') or entry.get('error', '')[:120]})")
        for model, facts in (entry.get("models") or {}).items():
            for gap in facts.get("checks") or []:
                lines.append(f"CHECK serve {name}/{model}: {gap}")
    lines.append(f"status {results.get('status')}; {results.get('elapsed_s')} s")
    return lines


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# snapserve on {results['device_asked']}: benchmarks/gpu/run.py",
             "", f"Status **{results['status']}**, started {results['started_at']}, "
                 f"{results.get('elapsed_s')} s, {results['mode']} mode."]
    if results.get("error"):
        lines += ["", "```", str(results["error"]), "```"]
    lines += _md_device(results) + _md_train(results) + _md_in_process(results) + _md_serve(results)
    lines += _md_options(results) + _md_errors(results)
    lines += ["", "## Summary", "", "```", *summary_lines(results)[2:], "```"]
    return "\n".join(lines)


def _md_errors(results: dict[str, Any]) -> list[str]:
    errors = {**(results.get("errors") or {}),
              **{f"in-process {k}": v for k, v in ((results.get("in_process") or {}).get("errors") or {}).items()}}
    return ["", "## Errors", "", *(f"- {k}: `{v}`" for k, v in errors.items())] if errors else []


def _md_device(results: dict[str, Any]) -> list[str]:
    device = results.get("device")
    if not device:
        return []
    rows = [("CPU", f"{device['cpu']} ({device['cpu_count']} cores, {device['memory_gib']} GiB)"),
            ("Python", device["python"]), *((k, v) for k, v in device["versions"].items())]
    if gpu := device.get("gpu"):
        rows = [("GPU", f"{gpu['name']} (compute {gpu['capability']}, {gpu['memory_gib']} GiB, "
                        f"{gpu['multiprocessors']} SMs)"),
                ("driver", f"{gpu.get('driver')} (CUDA {gpu.get('driver_cuda')})"),
                ("torch CUDA / cuDNN", f"{gpu['torch_cuda']} / {gpu['cudnn']}"),
                ("clocks, power", f"SM {gpu.get('sm_clock')} of {gpu.get('sm_clock_max')}, "
                                  f"{gpu.get('power')}, {gpu.get('temperature')} C at the start"),
                *rows]
    if ort := device.get("onnxruntime"):
        rows.append(("ORT providers", ", ".join(ort["available"])))
    if install := results.get("install"):
        rows.append(("installed", f"{', '.join(install['wheels']) or '-'}; project: {install.get('project')}"))
    return ["", "## Device", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _md_train(results: dict[str, Any]) -> list[str]:
    t = results.get("train")
    if not t:
        return []
    parity = t["export_parity"]
    return ["", "## Training", "",
            f"ResNet-{results['sizes']['depth']} snapshot ensemble on generated CIFAR-sized data ("
            + ", ".join(f"{n} {k}" for k, n in (t["splits"] or {}).items()) + "), "
            f"device {t['device']}, AMP {t['amp']}, channels_last "
            f"{'default (on for CUDA image inputs)' if t['channels_last'] is None else t['channels_last']}.", "",
            "| epochs | steps/epoch | first epoch s | median epoch s | steps/s | train s | export s | "
            "members | test acc. | export parity |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {t['epochs']} | {t['steps_per_epoch']} | {_fmt(t['first_epoch_s'], 3)} | "
            f"{_fmt(t['median_epoch_s'], 3)} | {_fmt(t['steps_per_s'], 1)} | {_fmt(t['train_seconds'], 1)} | "
            f"{_fmt(t['export_seconds'], 1)} | {t['members_exported']} | {_fmt(t['test_accuracy'], 4)} | "
            f"passed (<= 1e-4; logged max {_fmt(parity['logged_max_abs_diff'])}, "
            f"fused {_fmt(parity['fused_max_abs_diff'])}) |",
            "", f"Wall time of the trainer command: {t['wall_s']} s."]


def _md_in_process(results: dict[str, Any]) -> list[str]:
    r = results.get("in_process")
    if not r:
        return []
    lines = ["", "## ONNX Runtime in-process", "", "Placement (nodes per provider, one profiled run):", "",
             "| graph | session on | nodes | CPU ops |", "|---|---|---|---|"]
    for key, p in r.get("placement", {}).items():
        lines.append(f"| {key} | {p['provider']} | {p['nodes']} | {', '.join(p['cpu_ops']) or '-'} |")
    if r.get("provider_options"):
        opts = r["provider_options"]
        keep = ("cudnn_conv_algo_search", "use_tf32", "do_copy_in_default_stream", "arena_extend_strategy",
                "enable_cuda_graph", "prefer_nhwc", "cudnn_conv_use_max_workspace")
        lines += ["", "CUDA provider options as ONNX Runtime applied them (the server passes only device_id): "
                  + ", ".join(f"`{k}={opts[k]}`" for k in keep if k in opts)]
    lines += ["", f"Parity against {r.get('parity', {}).get('reference', '-')}:", "",
              "| graph | max abs diff of p | top-1 agreement | accuracy |", "|---|---:|---:|---:|"]
    for key, p in r.get("parity", {}).items():
        if isinstance(p, dict):
            lines.append(f"| {key} | {_fmt(p['max_abs_diff'])} | {p['top1_agreement']:.4f} | {p['accuracy']:.4f} |")
    lines += ["", "Latency, median ms (first run in brackets):", "",
              "| graph | batch 1 | batch 32 | batch 1, device-resident | batch 32, device-resident |",
              "|---|---:|---:|---:|---:|"]
    for key, t in r.get("latency_ms", {}).items():
        def cell(batch: str, way: str) -> str:
            v = t.get(batch, {}).get(way)
            return f"{v['median_ms']:.3f} ({v['first_ms']:.1f})" if v else "-"
        lines.append(f"| {key} | {cell('1', 'host')} | {cell('32', 'host')} | "
                     f"{cell('1', 'device_resident')} | {cell('32', 'device_resident')} |")
    return lines


def _md_serve(results: dict[str, Any]) -> list[str]:
    serve = results.get("serve")
    if not serve:
        return []
    levels = results["sizes"]["levels"]
    head = " | ".join(f"c={c} ex/s | c={c} p50 ms" for c in levels)
    lines = ["", "## Served (ensemble-client bench, one example per request)", "",
             f"| option | model | provider | graph | load s | {head} | served |dp| | accuracy | checks |",
             "|---|---|---|---|---:|" + "---:|---:|" * len(levels) + "---:|---:|---|"]
    for name, entry in serve.items():
        if entry.get("status") != "ok":
            reason = entry.get("reason") or entry.get("error", "").splitlines()[0]
            lines.append(f"| {name} | {entry.get('status')}: {reason} |" + " |" * (7 + 2 * len(levels)))
            continue
        for model, f in entry["models"].items():
            bench = f.get("bench") or {}
            cells = " | ".join(f"{_fmt((bench.get(str(c)) or {}).get('examples_per_s'), 0)} | "
                               f"{_fmt((bench.get(str(c)) or {}).get('p50_ms'))}" for c in levels)
            parity = f.get("parity") or {}
            lines.append(f"| {name} | {model} | {f['execution_provider']} | {f['runtime'].get('graph')}"
                         f"{' + CUDA graphs' if f.get('cuda_graphs') else ''} | {entry['load_s']} | {cells} | "
                         f"{_fmt(parity.get('max_abs_diff'))} | {_fmt(parity.get('accuracy'), 4)} | "
                         f"{'; '.join(f.get('checks') or []) or '-'} |")
    return lines


def _md_options(results: dict[str, Any]) -> list[str]:
    options = results.get("options")
    if not options:
        return []
    return ["", "## Options the server offers", "", *(f"- {k}: {v}" for k, v in options.items())]


# ---------------------------------------------------------------------------------------------
# --prepare (here, with a registry): what the device calls carry


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].strip()
    raise SystemExit(f"constraints.txt pins no {name}")


def _download(spec: str, dest: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(dest), spec], check=True)


def tree_bytes() -> int:
    """What a device call sends besides the carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed
               if name and (ROOT / name.decode()).is_file())


def prepare(part_bytes: int = PART_BYTES) -> int:
    """Downloads the wheels for the device's Python 3.12 into .ortgpu/ (ignored by git), splits
    the onnxruntime-gpu wheel into parts and prints the device calls to make, back to back."""
    folder, wheels = ROOT / ".ortgpu", ROOT / ".ortgpu" / "wheels"
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.ortgpu/" not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with open(exclude, "a") as f:
            f.write("/.ortgpu/\n")
    wheels.mkdir(parents=True, exist_ok=True)
    version = _constraint("onnxruntime-gpu")
    wheel = next(iter(sorted(folder.glob(f"onnxruntime_gpu-{version}-*.whl"))), None)
    if wheel is None:
        _download(f"onnxruntime-gpu=={version}", folder)
        wheel = next(iter(sorted(folder.glob(f"onnxruntime_gpu-{version}-*.whl"))))
    for name in SMALL_WHEELS:
        pinned = _constraint(name)
        stem = name.replace("-", "_")
        for old in wheels.glob(f"{stem}-*.whl"):
            if not old.name.startswith(f"{stem}-{pinned}-"):
                old.unlink()
        if not list(wheels.glob(f"{stem}-{pinned}-*.whl")):
            _download(f"{name}=={pinned}", wheels)
    for old in folder.glob("part-*"):
        old.unlink()
    data, digest, parts = wheel.read_bytes(), hashlib.sha256(), []
    digest.update(data)
    for index, start in enumerate(range(0, len(data), part_bytes)):
        part = folder / f"part-{index:02d}"
        part.write_bytes(data[start:start + part_bytes])
        parts.append({"name": part.name, "bytes": part.stat().st_size})
    (folder / "parts.json").write_text(json.dumps(
        {"wheel": wheel.name, "bytes": len(data), "sha256": digest.hexdigest(), "parts": parts}, indent=1))
    print_calls(wheel, parts, sum(p.stat().st_size for p in wheels.glob("*.whl")), tree_bytes())
    return 0


def print_calls(wheel: Path, parts: list[dict[str, Any]], wheels_bytes: int, tree: int) -> None:
    mib = 2**20
    last = parts[-1]
    with_run = tree + last["bytes"] + wheels_bytes + 4096 <= CARRY_LIMIT - 4 * mib
    separate = parts if not with_run else parts[:-1]
    print(f"onnxruntime-gpu wheel: {wheel.name}, {wheel.stat().st_size / mib:.1f} MiB in {len(parts)} parts")
    print(f"small wheels (.ortgpu/wheels): {wheels_bytes / mib:.1f} MiB; working tree: {tree / mib:.2f} MiB")
    print(f"device calls: {len(separate) + 1} ({len(separate)} carrying a part, then the run"
          f"{' with the last part' if with_run else ''}); make them back to back (warm 30 s)\n")
    for i, part in enumerate(separate, 1):
        print(f"{i}. carry [\".ortgpu/{part['name']}\"]  ({(tree + part['bytes']) / mib:.1f} MiB)\n"
              f"   command: mkdir -p /tmp/ortgpu && cp .ortgpu/{part['name']} /tmp/ortgpu/ && ls -l /tmp/ortgpu")
    carry = ([f".ortgpu/{last['name']}"] if with_run else []) + [".ortgpu/parts.json", ".ortgpu/wheels"]
    print(f"{len(separate) + 1}. carry {json.dumps(carry)}  timeout_s 450\n"
          "   command: PYTHONUNBUFFERED=1 python3 benchmarks/gpu/run.py --device cuda "
          "--ort-parts /tmp/ortgpu .ortgpu --wheels .ortgpu/wheels --work /tmp/snapserve-gpu-work "
          "--out \"$OUT\"")


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="download and split what the device calls carry")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny data and short sweeps: the dry run")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu",
                   help="results.json, results.md, logs.tar.gz (default: $OUT, else runs/gpu)")
    p.add_argument("--work", help="models, data and logs (default: a new temporary folder)")
    p.add_argument("--ort-parts", nargs="+", metavar="DIR", help="folders holding the wheel's part-NN files")
    p.add_argument("--wheels", metavar="DIR", help="more wheels to install (grpcio, protobuf, ...)")
    p.add_argument("--site", default=str(Path(tempfile.gettempdir()) / "snapserve-gpu-site"),
                   help="where the wheels and the project are installed")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), help="default: bf16 on cuda, off on cpu")
    p.add_argument("--reuse", action="store_true",
                   help="serve the models an earlier run trained in --work instead of training again")
    p.add_argument("--only", help="comma-separated server options to run (a rerun of some)")
    p.add_argument("--budget-s", type=float, help="skip server options starting after this many seconds")
    return p.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGTERM (a time limit) unwinds like ^C, so the servers are stopped and the results written.
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    if args.prepare:
        return prepare()
    if os.environ.get(STAGE_ENV) is None and (args.ort_parts or args.wheels or not _importable("snapserve.server")):
        try:
            info = install(args)
        except NoCuda as exc:
            print(f"FAILED (no CUDA): {exc}", file=sys.stderr, flush=True)
            return EXIT_NO_CUDA
        reexec_installed(info, argv)
    sizes = QUICK if args.quick else FULL
    if args.budget_s is not None:
        sizes = Sizes(**{**asdict(sizes), "budget_s": args.budget_s})
    run = Run(args, sizes)
    code = 0
    try:
        with run.phase("preflight"):
            run.preflight()
        if args.reuse and run.reusable():
            run.reuse()
        else:
            with run.phase("train"):
                run.train()
            with run.phase("import"):
                run.import_variants()
        with run.phase("in-process"), recorded(run.results.setdefault("errors", {}), "in-process"):
            run.in_process()
        with run.phase("serve"):
            run.serve()
        run.results["status"] = "ok"
    except NoCuda as exc:
        run.results.update(status="failed: no CUDA", error=str(exc))
        print(f"FAILED (no CUDA): {exc}", file=sys.stderr, flush=True)
        code = EXIT_NO_CUDA
    except (StepFailed, OSError, subprocess.SubprocessError) as exc:
        run.results.update(status="failed", error=str(exc))
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        code = EXIT_FAILED
    except KeyboardInterrupt as exc:
        run.results.update(status="interrupted", error=str(exc) or "interrupted")
        code = 130
    finally:
        run.headline()
        run.save()
        run.pack_logs()
        run.say(f"wrote {run.out / 'results.json'}, results.md, logs.tar.gz")
    return code


if __name__ == "__main__":
    sys.exit(main())
