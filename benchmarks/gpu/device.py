"""The device: refusing to measure the CPU under a CUDA label (the provider probe, torch's CUDA,
every session's placement), and the facts about the machine the report opens with."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.gpu.config import CUDA, STAGE_ENV, NoCuda
from benchmarks.gpu.runner import Run


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


def preflight(run: Run) -> None:
    probe = probe_onnxruntime() if run.device == "cuda" else None
    run.results["device"] = device_facts(probe)  # recorded first: a refusal needs them most
    run.results["install"] = json.loads(os.environ.get(STAGE_ENV, "null"))
    if probe is not None:
        require_cuda_provider(probe)
        require_torch_cuda()
    gpu = run.results["device"].get("gpu")
    run.say(f"device {run.device}: " + (f"{gpu['name']}, driver {gpu.get('driver')}, CUDA "
            f"{gpu.get('driver_cuda')}" if gpu else run.results["device"]["cpu"]) +
            f"; onnxruntime {run.results['device']['versions']['onnxruntime']}")
