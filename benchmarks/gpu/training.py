"""Training and importing through the trainer's command line: the snapshot ensemble, its FP16
and one-member copies, and what their manifests and logs say."""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.config import ENSEMBLE, FP16, ONE, StepFailed
from benchmarks.gpu.data import latest_version, read_manifest, write_dataset
from benchmarks.gpu.runner import Run


def train(run: Run) -> None:
    s = run.sizes
    data = run.work / "cifar-synth.npz"
    write_dataset(data, s.train, s.test, s.image)
    amp = run.args.amp or ("bf16" if run.device == "cuda" else "off")
    threads = str(max(1, min(8, os.cpu_count() or 1)))
    command = ["-m", "snapserve.trainer", "train", "--method", "snapshot", "--dataset", str(data),
               "--arch", "resnet", "--depth", str(s.depth), "--epochs", str(s.epochs),
               "--members", str(s.members), "--batch-size", str(s.batch_size), "--lr", "0.1",
               "--seed", "0", "--device", run.device, "--amp", amp, "--threads", threads,
               "--no-plots", "--out", str(run.repo), "--name", ENSEMBLE]
    began = time.perf_counter()
    text = run.python("train", command, timeout_s=600 if run.device == "cuda" else 300)
    wall = time.perf_counter() - began
    run.results["train"] = train_summary(latest_version(run.repo, ENSEMBLE), text, wall, amp)
    t = run.results["train"]
    run.say(f"trained {t['members_exported']} members in {t['wall_s']:.1f} s; epoch "
            f"{t['median_epoch_s']} s (first {t['first_epoch_s']} s), {t['steps_per_s']} steps/s")


def reusable(run: Run) -> bool:
    return (run.work / "cifar-synth.npz").is_file() and all(
        (run.repo / m).is_dir() for m in (ENSEMBLE, ONE, FP16))


def reuse(run: Run) -> None:
    """--reuse: the models an earlier call trained in --work (a rerun on a warm machine)."""
    log = run.logs / "train.log"
    amp = run.args.amp or ("bf16" if run.device == "cuda" else "off")
    run.results["train"] = train_summary(latest_version(run.repo, ENSEMBLE),
                                         log.read_text() if log.is_file() else "", None, amp)
    run.results["imports"] = {name: import_summary(run.repo, name) for name in (ONE, FP16)}
    run.results["notes"].append(f"models reused from an earlier run in {run.work}")
    run.say("reusing the models trained by an earlier run")


def import_variants(run: Run) -> None:
    version = latest_version(run.repo, ENSEMBLE)
    manifest = read_manifest(version)
    norm = manifest["input"].get("normalization") or {}
    shared = [*(["--mean", *map(str, norm["mean"]), "--std", *map(str, norm["std"])] if norm else [])]
    members = [str(version / m["file"]) for m in manifest["members"]]
    out = run.results.setdefault("imports", {})
    for name, files, extra in ((FP16, members, ["--fp16", "--temperature", str(manifest["temperature"])]),
                               (ONE, members[:1], [])):
        try:
            run.python(f"import-{name}", ["-m", "snapserve.trainer", "import", "--members", *files,
                                          "--out", str(run.repo), "--name", name, *shared, *extra],
                       timeout_s=300)
            out[name] = import_summary(run.repo, name)
        except StepFailed as exc:
            out[name] = {"error": str(exc)}
            run.say(f"import {name} failed: {str(exc).splitlines()[0]}")
    fp16 = (out.get(FP16) or {}).get("fp16")
    run.say(f"imported {ONE} and {FP16} (FP16 graph: "
            + (f"max |dp| {fp16['max_abs_diff']:.2e} on random inputs)" if fp16 else "not written)"))


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
