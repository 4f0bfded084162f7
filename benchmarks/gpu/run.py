#!/usr/bin/env python3
"""CUDA end to end in one device call (issue 17): install, train, serve, bench, report.

    python3 benchmarks/gpu/run.py --prepare                # here: wheels and parts to carry
    python3 benchmarks/gpu/run.py --device cuda --ort-parts /tmp/ortgpu .ortgpu \
        --wheels .ortgpu/wheels --out "$OUT"               # there: the one device call
    python benchmarks/gpu/run.py --device cpu --quick --out DIR   # the dry run (tests/benchmarks)

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
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

# Only the standard library at the top of this package's modules: on the device this file runs
# before anything is installed.

if not __package__:
    # Run as a script, its own folder is on sys.path instead of the project root that its
    # modules import from (as benchmarks.gpu.*); the folder comes off, so they shadow nothing.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parents[1]))

from benchmarks.gpu.config import EXIT_FAILED, EXIT_NO_CUDA, FULL, QUICK, STAGE_ENV, NoCuda, Sizes, StepFailed
from benchmarks.gpu.device import preflight
from benchmarks.gpu.in_process import in_process
from benchmarks.gpu.install import importable, install, prepare, reexec_installed
from benchmarks.gpu.runner import Run, recorded
from benchmarks.gpu.serving import serve
from benchmarks.gpu.training import import_variants, reusable, reuse, train


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
    if os.environ.get(STAGE_ENV) is None and (args.ort_parts or args.wheels or not importable("snapserve.server")):
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
            preflight(run)
        if args.reuse and reusable(run):
            reuse(run)
        else:
            with run.phase("train"):
                train(run)
            with run.phase("import"):
                import_variants(run)
        with run.phase("in-process"), recorded(run.results.setdefault("errors", {}), "in-process"):
            in_process(run)
        with run.phase("serve"):
            serve(run)
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
