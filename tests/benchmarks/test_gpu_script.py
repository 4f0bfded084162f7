"""benchmarks/gpu/run.py, the one-call CUDA run of issue 17, as far as a CPU can check it:
the whole run in --quick mode on the CPU (train, import, in-process checks, every server option
the CPU can run, the report), the loud refusal when CUDA is asked for and missing, and the
pieces of the device-side install (the wheel's parts, the log reading)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import onnxruntime as ort
import pytest

from benchmarks.gpu import config, device, install, options

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"
HAS_CUDA = config.CUDA in ort.get_available_providers()


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The script in its own process group, so a timeout also stops the servers it started.
    Its servers inherit the environment: pinned to one instance and one thread, as the suite's
    own servers are (the automatic plan measures every model at load); the options that set
    instances or threads by flag still do."""
    env = {**os.environ, "SNAPSERVE_INSTANCES": "1", "SNAPSERVE_INTRA_OP_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, text=True, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"run.py still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.scripts
def test_quick_dry_run_on_the_cpu_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_script("--device", "cpu", "--quick", "--out", str(out), "--work", str(tmp_path / "work"),
                      timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok" and results["error"] is None
    assert {"device", "train", "imports", "in_process", "serve", "options", "headline",
            "phases"} <= set(results)
    assert set(results["phases"]) == {"preflight", "train", "import", "in-process", "serve"}

    train = results["train"]
    assert train["members_exported"] == 2 and train["device"] == "cpu"
    assert train["steps_per_s"] > 0 and len(train["epoch_seconds"]) == 2
    assert train["export_parity"]["fused_max_abs_diff"] < 1e-4

    imports = results["imports"]
    assert imports[config.ONE]["members"] == 1
    assert imports[config.FP16]["fp16"]["max_abs_diff"] <= imports[config.FP16]["fp16"]["tolerance"]

    in_process = results["in_process"]
    assert in_process["placement"]["ensemble.onnx"]["provider"] == config.CPU
    assert in_process["parity"]["ensemble.onnx"]["max_abs_diff"] < 1e-5
    assert in_process["latency_ms"]["member-000.onnx"]["1"]["host"]["median_ms"] > 0
    assert in_process["batch1_ratio"]["host"] > 0

    serve = results["serve"]
    for plan in ("fused", "members", "cpu", "fp16"):
        assert serve[plan]["status"] == "ok", serve[plan]
        for model, facts in serve[plan]["models"].items():
            assert facts["execution_provider"] == config.CPU and facts["checks"] == [], (plan, model)
    for plan in ("fused+cuda-graphs", "fp16+cuda-graphs", "auto"):
        assert serve[plan] == {"status": "skipped", "reason": "needs --device cuda"}
    sweep = serve["fused"]["models"][config.ENSEMBLE]
    assert set(sweep["bench"]) == {"1", "4"} and sweep["bench"]["1"]["requests"] > 0
    assert sweep["bench"]["4"]["errors"] == {}
    assert set(serve["fused"]["models"][config.ONE]["bench"]) == {"1"}
    assert sweep["runtime"]["graph"] == "fused"
    assert serve["members"]["models"][config.ENSEMBLE]["runtime"]["graph"] == "members"
    assert sweep["parity"]["max_abs_diff"] < 1e-5
    assert serve["fp16"]["models"][config.FP16]["parity"]["max_abs_diff"] < 1e-2
    assert "io_binding" in results["options"]

    headline = results["headline"]
    assert headline["batch1_served"]["best"]["ratio"] > 0
    assert headline["throughput"]["concurrency"] == 4 and headline["throughput"]["ratio_to_cpu"] > 0

    markdown = (out / "results.md").read_text()
    for section in ("## Device", "## Training", "## ONNX Runtime in-process", "## Served", "## Summary"):
        assert section in markdown
    assert (out / "logs.tar.gz").stat().st_size > 0
    assert "== summary ==" in done.stdout


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_asked_without_the_cuda_provider_fails_loudly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_script("--device", "cuda", "--quick", "--out", str(out), "--work", str(tmp_path / "work"),
                      timeout=120)
    assert done.returncode == config.EXIT_NO_CUDA
    assert "has no CUDAExecutionProvider" in done.stderr
    assert "refusing to benchmark on the CPU" in done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed: no CUDA" and "CUDAExecutionProvider" in results["error"]
    assert "train" not in results and "serve" not in results  # nothing ran on the CPU instead
    assert results["device"]["onnxruntime"]["placed"] is None


def test_a_session_that_fell_back_to_the_cpu_is_refused() -> None:
    with pytest.raises(config.NoCuda, match="fell back to the CPU"):
        device.require_cuda_provider({"version": "1", "file": "f", "available": [config.CUDA, config.CPU],
                                      "placed": [config.CPU]})
    device.require_cuda_provider({"version": "1", "file": "f", "available": [config.CUDA, config.CPU],
                                  "placed": [config.CUDA, config.CPU]})

    class OnCpu:
        def get_providers(self) -> list[str]:
            return [config.CPU]

    with pytest.raises(config.NoCuda, match="placed the session on CPUExecutionProvider"):
        device.session_on(OnCpu(), "cuda", "ensemble.onnx")
    assert device.session_on(OnCpu(), "cpu", "ensemble.onnx") == config.CPU


def _fake_wheel(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("onnxruntime_gpu-9.9.9.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nTag: cp312-cp312-manylinux_2_28_x86_64\n")
        wheel.writestr("onnxruntime/__init__.py", "x = 1\n" * 5000)
    return path.read_bytes()


def test_the_wheel_is_reassembled_from_parts_carried_in_several_calls(tmp_path: Path) -> None:
    data = _fake_wheel(tmp_path / "original.whl")
    earlier, last = tmp_path / "earlier", tmp_path / "last"
    earlier.mkdir(), last.mkdir()
    size = len(data) // 3 + 1
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    for index, chunk in enumerate(chunks):
        ((earlier if index < len(chunks) - 1 else last) / f"part-{index:02d}").write_bytes(chunk)
    wheel = install.reassemble_wheel([earlier, last], tmp_path / "site")
    assert wheel.name == "onnxruntime_gpu-9.9.9-cp312-cp312-manylinux_2_28_x86_64.whl"
    assert wheel.read_bytes() == data

    meta = {"wheel": "w.whl", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "parts": [{"name": f"part-{i:02d}"} for i in range(len(chunks))]}
    (last / "parts.json").write_text(json.dumps(meta))
    (last / f"part-{len(chunks) - 1:02d}").write_bytes(b"stale")
    with pytest.raises(config.NoCuda, match="does not match parts.json"):
        install.reassemble_wheel([earlier, last], tmp_path / "site")
    (earlier / "part-00").unlink()
    with pytest.raises(config.NoCuda, match=r"parts missing: \['part-00'\]"):
        install.reassemble_wheel([earlier, last], tmp_path / "site")


def test_the_project_links_as_pyproject_maps_its_packages(tmp_path: Path) -> None:
    install.link_project(tmp_path)
    for sub in ("proto", "server", "client", "trainer"):
        assert (tmp_path / "snapserve" / sub / "__init__.py").is_file()


def test_the_server_log_is_read_per_model() -> None:
    log = "\n".join([
        "INFO snapserve.server.app: device cuda: execution providers ['CUDAExecutionProvider', 'CPU']",
        "WARNING snapserve.server.runtime: ensemble.onnx: no CUDA graphs (capture refused); running without them",
        "INFO snapserve.server.ensemble: resnet20 version 1: serving the fused graph on 1 instance(s)",
        "INFO snapserve.server.lifecycle: loaded model resnet20 version 1: 5 members, method snapshot, on X",
        "INFO snapserve.server.runtime: CUDA graphs for batch sizes [1, 2]",
        "INFO snapserve.server.ensemble: resnet20-one version 1: serving the fused graph on 1 instance(s)",
        "INFO snapserve.server.lifecycle: loaded model resnet20-one version 1: 1 members, method imported, on X",
        "ERROR snapserve.server.registry: refusing model resnet20-fp16 version 1: device is 'cuda' but ...",
    ])
    segments = options.log_segments(log)
    first, second = options.load_facts(segments["resnet20"]), options.load_facts(segments["resnet20-one"])
    assert first["cuda_graphs"] is False and first["cuda_graphs_refused"] == "capture refused"
    assert first["graph_logged"] == "fused" and second["cuda_graphs"] is True
    assert options.load_facts(segments["resnet20-fp16"])["refused"].startswith("device is 'cuda'")
    plan = next(p for p in options.plans(1) if p.name == "fused+cuda-graphs")
    gaps = options.expectation_gaps(plan, "resnet20", {**first, "runtime": {"graph": "fused"}})
    assert gaps == ["CUDA graphs asked for but not in use: capture refused"]


def test_io_binding_is_measured_and_checked_through_get_model() -> None:
    """The run measures IO binding on and off, and GetModel's runtime map decides whether each
    start had what it asked for (the server reports it: server/engine/runtime.py)."""
    plans = {p.name: p for p in options.plans(1)}
    assert "--no-io-binding" in plans["no-io-binding"].flags
    assert options.option_availability({"--no-io-binding"})["io_binding"].startswith("available")
    off = {"runtime": {"graph": "fused", "io_binding": "off: io_binding is false"}}
    assert options.expectation_gaps(plans["no-io-binding"], "m", off) == []
    on = {"runtime": {"graph": "fused", "io_binding": "on"}}
    assert options.expectation_gaps(plans["no-io-binding"], "m", on) == [
        "asked for IO binding off, GetModel says 'on'"]
    refused = {"runtime": {"graph": "fused", "io_binding": "on",
                           "cuda_graphs": "off: capture failed: boom"}}
    assert options.expectation_gaps(plans["fused+cuda-graphs"], "m", refused) == [
        "CUDA graphs asked for but not in use: GetModel says 'off: capture failed: boom'"]
