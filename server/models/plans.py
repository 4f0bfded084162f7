"""The plan cache: a model version's measured plan (its graph, instances and threads), kept on
disk and reused at later starts.

Timings at load move with the machine's phase and whatever else it runs, so a model whose
choices sit near a margin can get another plan at each start (docs/performance.md, "A stable
plan"). A plan measured once and read back at every later start cannot flip. Its file is keyed
by everything the measurement depends on: the version's manifest as written (which names every
graph's checksum), the settings it runs with, the largest batch, the usable cores, the CPU model
and the ONNX Runtime and snapserve versions. Any of them changed, the key differs and the plan
is measured again; `remeasure_plans` measures it again anyway and replaces the file.

Only CPU plans are kept: a GPU's model is not in the key, and its plan is one instance anyway.
The cache is a convenience, never a reason to refuse a model: a file that cannot be read or
makes no sense is logged and measured over, a folder that cannot be written is logged and the
plan served as measured.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import platform
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snapserve.proto.version import package_version
from snapserve.server.config import RuntimeConfig
from snapserve.server.engine.cores import MAX_THREADS_PER_CORE, ThreadPlan
from snapserve.server.engine.runtime import CPU, FUSED, MEMBERS, GraphTiming
from snapserve.server.models.manifest import Manifest

__all__ = ["MAX_PLAN_FILE", "MAX_PLAN_FILES", "CachedPlan", "PlanCache", "cpu_model"]

logger = logging.getLogger(__name__)

# A plan file is a few KiB (two reasons' text, a dozen timings); a larger one is not ours.
MAX_PLAN_FILE = 64 * 1024
# The most plan files a folder keeps: each new key (a version, a settings change) adds one, so
# the least recently used go past this many (a few hundred KiB in all).
MAX_PLAN_FILES = 256
# A file being written aside that is older than this was left by a process that died mid-write.
_STALE_ASIDE_S = 600.0
# Raised when what a plan file holds, or how it is keyed, changes meaning.
_FORMAT = 1


@functools.cache  # the CPU does not change under a running process
def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (x86 and most ARM servers), else the
    platform's word for it: a plan measured on one CPU says little of another's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info.read(1 << 20).splitlines():
                field, _, value = line.partition(":")
                if field.strip() in ("model name", "Hardware", "cpu model", "uarch"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _problem(exc: Exception) -> str:
    """What is wrong with a plan file, in one line: pydantic's first errors by field."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}"
                         for e in exc.errors()[:3])
    return str(exc)


class _Timing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_sizes: tuple[int, ...]
    seconds: dict[str, tuple[float, ...]]
    why: str


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    parallel: int = Field(ge=1, le=1 << 16)
    threads: int = Field(ge=1, le=1 << 16)
    lead_threads: int = Field(ge=0, le=1 << 16)
    why: str
    loop_examples: int = Field(ge=0)
    lead_spread: bool


class _PlanFile(BaseModel):
    """A plan file as written: the key it was measured under and what was measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: dict[str, Any]  # its "format" says what the file's fields mean
    measured_at: str
    graph: str
    graph_timing: _Timing | None
    plan: _Plan


@dataclass(frozen=True)
class CachedPlan:
    """A plan read back: the graph, its timing at the time (None: not timed), the instances."""

    graph: str
    timing: GraphTiming | None
    plan: ThreadPlan
    measured_at: str
    path: Path

    def describe(self) -> str:
        """Where the plan comes from, for GetModel (`plan_source`) and the load's log line."""
        return (f"the plan cache ({self.path}, measured {self.measured_at}; "
                "remeasure_plans measures it again)")


class PlanCache:
    """The plan file of one model version under one key (`for_version`), read and written."""

    def __init__(self, directory: Path, manifest: Manifest, key: dict[str, Any]) -> None:
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        # Model names are one path component (config.MODEL_NAME): safe in a file name.
        self.path = directory / f"{manifest.name}-{manifest.version}-{digest}.json"

    @classmethod
    def for_version(cls, manifest: Manifest, config: RuntimeConfig, max_batch_size: int,
                    cores: int, provider: str) -> PlanCache | None:
        """The plan file of this version as `config` serves it on this machine; None when the
        cache is off or the plan is not a CPU plan."""
        if config.plan_cache is None or provider != CPU:
            return None
        settings = config.model_dump(mode="json", exclude={"plan_cache", "remeasure_plans"})
        settings["cores"] = cores  # the cores planned for, 0 (all usable) resolved
        key = {"format": _FORMAT, "snapserve": package_version(), "onnxruntime": ort.__version__,
               "model": manifest.name, "version": manifest.version,
               "manifest_sha256": hashlib.sha256(manifest.text.encode()).hexdigest(),
               "settings": settings, "max_batch_size": max_batch_size,
               "cpu": cpu_model(), "machine": platform.machine()}
        return cls(config.plan_cache, manifest, key)

    def read(self) -> CachedPlan | None:
        """The plan stored under this key; None (logged unless simply absent) when there is
        none to use."""
        try:
            # Not blocking: a FIFO in its place would hold the load until something wrote to it.
            with open(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
                status = os.fstat(file.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise ValueError("not a regular file")
                # Bounded before it is read: a stray large file is not loaded into memory.
                if status.st_size > MAX_PLAN_FILE:
                    raise ValueError(f"larger than {MAX_PLAN_FILE} bytes")
                stored = _PlanFile.model_validate_json(file.read(MAX_PLAN_FILE + 1))
            if stored.key != self.key:
                raise ValueError("its key is not this version's (a hash collision, or an edit)")
            plan = ThreadPlan(**stored.plan.model_dump())
            if stored.graph not in (FUSED, MEMBERS):
                raise ValueError(f"graph {stored.graph!r} is not fused or members")
            cores = self.key["settings"]["cores"]
            if (plan.lead_threads not in (0, cores)
                    or sum(plan.thread_counts) > MAX_THREADS_PER_CORE * cores
                    or plan.loop_examples > self.key["max_batch_size"]):
                raise ValueError(f"its plan (threads {plan.thread_counts}, a lone request of "
                                 f"up to {plan.loop_examples} on the loop) does not fit {cores} "
                                 f"cores and batches of {self.key['max_batch_size']}")
        except (FileNotFoundError, NotADirectoryError):  # none yet (the folder says why on write)
            return None
        except (OSError, ValueError) as exc:
            logger.warning("plan cache: ignoring %s (%s): measuring the plan again",
                           self.path, _problem(exc))
            return None
        with contextlib.suppress(OSError):  # used now: the last to go (a read-only folder: kept)
            os.utime(self.path)
        timing = stored.graph_timing
        return CachedPlan(stored.graph, None if timing is None else GraphTiming(
            timing.batch_sizes, dict(timing.seconds), timing.why), plan, stored.measured_at,
            self.path)

    def write(self, graph: str, timing: GraphTiming | None, plan: ThreadPlan) -> bool:
        """Store a measured plan under this key (a whole file or none: written aside, then
        renamed over); False, logged, when the folder cannot take it."""
        stored = {"key": self.key,
                  "measured_at": datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"),
                  "graph": graph, "graph_timing": None if timing is None else asdict(timing),
                  "plan": asdict(plan)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, aside = tempfile.mkstemp(dir=self.path.parent, prefix=".plan-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    json.dump(stored, file, indent=1)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(aside, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(aside)
                raise
        except OSError as exc:
            logger.warning("plan cache: cannot write %s (%s): the plan is measured again at the "
                           "next start", self.path, exc)
            return False
        self._prune()
        return True

    def _prune(self) -> None:
        """The least recently used plan files past MAX_PLAN_FILES removed, and files left aside
        by writers that died; what cannot be removed stays (another server may be using it)."""
        now = time.time()
        files, stale = [], []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path.parent):
                with contextlib.suppress(OSError):
                    if entry.name.endswith(".json") and entry.is_file():
                        files.append((entry.stat().st_mtime, entry.path))
                    elif (entry.name.startswith(".plan-") and entry.name.endswith(".tmp")
                          and now - entry.stat().st_mtime > _STALE_ASIDE_S):
                        stale.append(entry.path)
        files.sort(reverse=True)
        for path in stale + [path for _, path in files[MAX_PLAN_FILES:]]:
            with contextlib.suppress(OSError):
                os.unlink(path)
