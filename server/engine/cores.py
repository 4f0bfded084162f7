"""How many cores this process may use, and how a model version's instances share them.

`usable_cores()` is what the kernel lets the process run on: its CPU affinity, cut down by a
cgroup CPU quota (a container's `--cpus`, a Kubernetes CPU limit), never `os.cpu_count()`,
which counts the host's cores whatever the process is allowed.

`plan_threads` turns the `instances` / `intra_op_threads` settings (0: auto) and what was
measured at load into the sessions to open (docs/performance.md, "Instances and threads"):

- parallel instances of one thread each, one per core, when the model's compute per example is
  larger than what the event loop spends on a request (else the loop, not the model, is the
  bottleneck, and more instances only add thread hops and smaller batches);
- plus a *lead* instance with every core's threads, when it computes a lone example faster than
  one thread does: the batcher hands it a batch only when nothing else computes, so a lone
  request uses all cores and a full queue runs on the single-thread instances, one per core.
  For an ensemble the lead can spread its members over the cores (a group of members per
  thread, each group one-thread sessions), which splits a lone example's work far better than
  ONNX Runtime's intra-op threads split one small batch; it is kept when its largest group's
  CPU time, against one thread's for every member, clears the same margin, the model is heavy
  enough that a thread hop is small beside it (SPREAD_MIN_S), and that predicted gain passes
  the intra-op lead's measured one by PLAN_MARGIN (the prediction runs high); where it clears
  the margin and not intra-op's gain, the lead is intra-op's;
- a single single-thread instance computes its batches *on the event loop* when it is
  cheap: the hop to an inference thread and back (a thread woken, the loop woken, the GIL
  handed over twice) then costs more than the run. A batch of up to `loop_examples` examples
  qualifies: as many as the compute per example, with PLAN_MARGIN, fits in ON_LOOP_MAX_S (the
  most a batch may hold the loop). A lone request always; a batch of several requests while
  they were all taken in off the loop (the C++ front end: its threads queue the next calls
  meanwhile; models/ensemble.py), else in the thread, so that a loop taking requests in
  (grpc.aio, REST) does so while they compute. The bound is per batch, not a yes or no on the
  model's largest batch, so that a model whose largest batch takes about ON_LOOP_MAX_S does
  not flip between starts for its one-example requests.

The same model on the same machine must get the same plan at every start, though timings at
load move with whatever else the machine runs. So each choice keeps the simpler plan unless the
other is measured better by more than PLAN_MARGIN (`clearly_better`): one instance unless the
compute per example passes the request handling by that much, no lead instance unless it is
LEAD_MARGIN faster on a lone example (it takes every core), the fused graph unless the members are that much faster
(runtime.choose_graph). A model whose two options are near a tie (the usual case where noise
decides) then always gets the simpler one; a flip needs a true ratio near the margin itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from snapserve.server.errors import ModelSettingsError

__all__ = ["AUTO", "LEAD_MARGIN", "LOOP_COST_S", "MAX_THREADS_PER_CORE", "ON_LOOP_MAX_S", "PLAN_MARGIN",
           "SPREAD_MIN_S", "ThreadPlan", "check_thread_budget", "cgroup_cpu_limit", "clearly_better",
           "plan_threads", "usable_cores"]

AUTO = 0  # instances / intra_op_threads: decide at load
# Server CPU per one-example request outside the model (grpc.aio, decode, batcher, encode), as
# benchmarks/RESULTS.md records it; a model that computes an example faster than this is not
# the bottleneck.
LOOP_COST_S = 0.5e-3
# How much better the less simple of two plans must measure before it is chosen: more than
# the spread of timings at load on a shared machine (a busy neighbour, frequency scaling), so
# that noise alone cannot flip a choice between two starts.
PLAN_MARGIN = 0.25
# A lead instance must win by more: it takes every core while it runs, and intra-op speed-ups on
# a lone example of a small model sit near 1 + PLAN_MARGIN on two cores, where noise decides.
LEAD_MARGIN = 0.5
# The least CPU time a lone example must cost on one thread before its members are spread over
# threads: waking a helper thread and joining it costs tens of microseconds, small beside this.
SPREAD_MIN_S = 1e-3
# The longest a batch may hold the event loop when computed on it: health checks and new calls
# wait that long (a couple of queue delays), never more.
ON_LOOP_MAX_S = 5e-3


def _quota_v2(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _cgroup_dirs(root: Path, self_cgroup: Path) -> list[tuple[Path, bool]]:
    """(directory, is v2) for the process's cgroup and each ancestor, in every hierarchy that
    has the CPU controller, plus each mount's root (in a container the path in /proc is the
    host's, and the container's own cgroup is mounted at the root)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[Path, bool]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            mounts, v2 = [root], True
        elif "cpu" in controllers.split(","):
            mounts, v2 = [root / controllers, root / "cpu", root / "cpu,cpuacct"], False
        else:
            continue
        relative = Path(path.lstrip("/"))
        for mount in dict.fromkeys(mounts):
            found += [(mount / ancestor, v2) for ancestor in (relative, *relative.parents)]
    return found


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"),
                     self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The smallest CPU quota (in cores, e.g. 1.5) on the process's cgroup or any ancestor,
    cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); None: no quota."""
    quotas = [q for directory, v2 in _cgroup_dirs(root, self_cgroup)
              if (q := (_quota_v2 if v2 else _quota_v1)(directory)) is not None]
    return min(quotas, default=None)


def usable_cores(root: Path = Path("/sys/fs/cgroup"),
                 self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Cores this process may run on at once: its affinity, at most its cgroup quota (rounded
    down: 1.5 cores of quota cannot keep two threads busy without throttling), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, self_cgroup)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(cores, 1)


# The most ONNX Runtime threads one model version's instances may ask for, per usable core.
# Past a few threads a core, more only add context switches and slow every other model on the
# machine; a few leave room for deliberate over-subscription (small models, cores shared with a
# sidecar). Auto never plans past one per core.
MAX_THREADS_PER_CORE = 4


def check_thread_budget(instances: int, intra_op_threads: int, cores: int) -> None:
    """ModelSettingsError naming the keys when the configured instances x intra_op_threads pass
    MAX_THREADS_PER_CORE x `cores`. Refused, not clamped: a server that runs other than its
    settings say is harder to reason about than a load that fails saying why (a hot reload keeps
    the version it had). AUTO (0) counts as 1: auto fills at most the cores."""
    threads = max(instances, 1) * max(intra_op_threads, 1)
    limit = MAX_THREADS_PER_CORE * cores
    if threads > limit:
        raise ModelSettingsError(
            f"instances ({instances or 'auto'}) x intra_op_threads ({intra_op_threads or 'auto'}) "
            f"= {threads} ONNX Runtime threads, more than {MAX_THREADS_PER_CORE} per usable core "
            f"({cores} cores: {limit}); lower instances or intra_op_threads (flags --instances, "
            "--intra-op-threads, or the model's model-settings.yaml), or leave them auto")


def clearly_better(simpler_seconds: float, other_seconds: float,
                   margin: float = PLAN_MARGIN) -> bool:
    """Whether the other plan beats the simpler one by more than `margin`: its time times
    (1 + margin) is still below the simpler plan's. Ties and near-ties keep the simpler plan."""
    return other_seconds * (1 + margin) < simpler_seconds


@dataclass(frozen=True)
class ThreadPlan:
    """The sessions a model version opens: `parallel` instances of `threads` each, computing up
    to that many batches at once, and optionally a `lead` instance of `lead_threads`, used for a
    batch only while nothing else computes."""

    parallel: int
    threads: int
    lead_threads: int = 0  # 0: no lead instance
    why: str = ""
    # A batch of up to this many examples may compute on the event loop thread, not the
    # instance's (models/ensemble.py says when); 0: never.
    loop_examples: int = 0
    # The lead spreads the members over its threads (one-thread sessions, a group of members
    # per thread), not one session's intra-op threads.
    lead_spread: bool = False

    @property
    def on_loop(self) -> bool:
        """Whether a lone request may compute on the event loop (of `loop_examples` or fewer)."""
        return self.loop_examples > 0

    @property
    def lead(self) -> str:
        """The lead instance, in words (GetModel's `lead_instance`)."""
        if not self.lead_threads:
            return "none"
        if self.lead_spread:
            return f"the members spread over {self.lead_threads} threads"
        return f"{self.lead_threads} intra-op threads"

    @property
    def thread_counts(self) -> tuple[int, ...]:
        """Threads of each instance, the lead's first."""
        lead = (self.lead_threads,) if self.lead_threads else ()
        return lead + (self.threads,) * self.parallel


def plan_threads(instances: int, intra_op_threads: int, cores: int,
                 seconds_per_example: float | None, lone_seconds: tuple[float, float] | None,
                 batch_seconds: float | None = None,
                 spread_seconds: tuple[float, float] | None = None) -> ThreadPlan:
    """The plan for these settings (AUTO: decide) on `cores` cores.

    Explicit values are kept as given; a lead instance is added only when both are AUTO.
    `seconds_per_example`: one single-thread instance's compute per example at the largest
    batch, measured at load (None: not measured, e.g. on a GPU: one instance). `lone_seconds`:
    a lone example's seconds on 1 thread and on `cores` threads, the latter as the former over
    the measured gain (planning.intra_op_gain; None: not measured).
    `batch_seconds`: that instance's largest batch, measured (None: not measured).
    `spread_seconds`: a lone example's CPU seconds on one thread and its largest group of
    members' when spread over `cores` threads, the latter as the former over the measured gain
    (planning.spread_gain; None: the members cannot be spread).
    """
    if instances != AUTO and intra_op_threads != AUTO:
        return ThreadPlan(instances, intra_op_threads, why="as configured")
    threads = intra_op_threads or 1
    reasons = []
    parallel = instances
    if parallel == AUTO:
        # Parallel instances pay when the model, not the loop's handling, is what a request
        # waits for: the handling is the "simpler" side the compute must clearly pass.
        heavy = (seconds_per_example is not None
                 and clearly_better(seconds_per_example, LOOP_COST_S))
        parallel = max(cores // threads, 1) if heavy else 1
        if seconds_per_example is None:
            reasons.append("1 instance (compute not measured)")
        else:
            reasons.append(f"{parallel} parallel instance(s): {1e3 * seconds_per_example:.2f} ms "
                           f"of compute per example {'>' if heavy else '<='} "
                           f"{1 + PLAN_MARGIN:.2f} x {1e3 * LOOP_COST_S:.2f} ms of request "
                           "handling")
    lead, spread = 0, False  # only when both are auto: N instances asked for are N instances
    if instances == AUTO and intra_op_threads == AUTO and cores > 1 and lone_seconds is not None:
        one, every = lone_seconds
        splits = False  # the members' CPU times say a lone example splits over the cores
        if spread_seconds is not None:
            alone, largest = spread_seconds
            splits = alone >= SPREAD_MIN_S and clearly_better(alone, largest, LEAD_MARGIN)
            # The prediction runs high (each group timed alone; run at once they share the
            # caches and memory, and the helpers' hops add up): it must beat intra-op's measured
            # gain, the simpler lead (one session), by the plan's margin too. Where it does not,
            # the parallelism it shows is intra-op's to take.
            spread = splits and clearly_better(every / one, largest / alone)
        if splits or clearly_better(one, every, LEAD_MARGIN):
            lead = cores
        if spread_seconds is None:
            reasons.append(f"{'a' if lead else 'no'} lead instance of {cores} threads (a lone "
                           f"example: {1e3 * every:.2f} ms on {cores} threads, {1e3 * one:.2f} ms "
                           f"on 1; kept when over {1 + LEAD_MARGIN:.2f} x faster)")
        else:
            kind = (f"the members spread over {cores} threads" if spread
                    else f"{cores} intra-op threads")
            reasons.append(
                f"{f'a lead instance of {kind}' if lead else 'no lead instance'} (a lone example: "
                f"{1e3 * one:.2f} ms on 1 thread, {1e3 * every:.2f} ms on {cores} intra-op "
                f"threads; {1e3 * alone:.2f} ms of CPU on 1 thread against {1e3 * largest:.2f} ms "
                f"for the largest of {cores} groups of members, {alone / largest:.2f} x; kept "
                f"when either is over {1 + LEAD_MARGIN:.2f} x faster, the members spread from "
                f"{1e3 * SPREAD_MIN_S:.0f} ms and when over {1 + PLAN_MARGIN:.2f} x intra-op's "
                "gain, else intra-op)")
    loop_examples = 0
    if (instances == AUTO and parallel == 1 and threads == 1 and not lead
            and batch_seconds is not None and seconds_per_example):
        largest = round(batch_seconds / seconds_per_example)
        loop_examples = min(int(ON_LOOP_MAX_S / ((1 + PLAN_MARGIN) * seconds_per_example)),
                            largest)
        if loop_examples:
            reasons.append(
                f"batches of up to {loop_examples} example(s) computed on the event loop "
                f"({1e3 * seconds_per_example:.2f} ms per example x {1 + PLAN_MARGIN:.2f} fits "
                f"{loop_examples} in {1e3 * ON_LOOP_MAX_S:.0f} ms: cheaper than a thread hop)")
    why = f"auto on {cores} core(s): " + "; ".join(reasons)
    if lead and parallel == 1:  # one batch at a time: the lead alone, never a second instance
        return ThreadPlan(1, lead, why=why, lead_spread=spread)
    return ThreadPlan(parallel, threads, lead, why, loop_examples, lead_spread=spread)
