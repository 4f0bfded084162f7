"""What every step of the run shares: the project root, provider and model names, exit
statuses, the run's sizes (full or --quick) and its two errors.

Only the standard library here and at the top of every module of this package: on the device,
run.py imports them before anything is installed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
LATENCY_GOAL = 1.3  # the goal: 5 fused members within 1.3x one member at batch 1
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

