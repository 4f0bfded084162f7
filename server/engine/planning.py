"""How many instances of a model version, of how many threads each: measured at load.

The plan itself is engine/cores.py's `plan_threads`; this module measures what it needs on an
opened runtime (a lone example, the largest batch, every core's threads) within a time budget.
Knows nothing of models or the API: it takes a runtime and a function that builds more.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from snapserve.server.engine.cores import AUTO, ThreadPlan, plan_threads, usable_cores
from snapserve.server.engine.runtime import (CUDA, MEMBERS, EnsembleRuntime, GraphTiming,
                                             RuntimeConfig, compute_clock, times_in_turn)
from snapserve.server.errors import InferenceError

__all__ = ["fastest_seconds", "gain_estimates", "intra_op_gain", "open_planned", "plan_instances",
           "spread_gain"]

_MEASURE_BUDGET_S = 0.3  # seconds of runs per measurement at load


def fastest_seconds(fn: Callable[[np.ndarray], object], x: np.ndarray, budget_s: float,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """The fastest of a few runs after a warm-up, by `clock`: other processes' work only ever
    adds time, so the minimum is the least disturbed estimate of the model's own cost (a
    median at load is far off on a busy machine, enough to flip the choice)."""
    fn(x)
    best, deadline = float("inf"), time.perf_counter() + budget_s
    while best == float("inf") or time.perf_counter() < deadline:
        began = clock()
        fn(x)
        best = min(best, clock() - began)
    return best


def gain_estimates(times: np.ndarray) -> tuple[float, float]:
    """Two estimates of how much faster than the first function the slowest of the others
    runs, from `times_in_turn` of (the example on one thread, what would replace it: each group
    of spread members, or every core's threads): the fastest run of each side, and the median
    over the rounds of each round's own ratio."""
    fastest = times.min(axis=0)
    paired = np.median(times[:, 0] / times[:, 1:].max(axis=1))
    return float(fastest[0] / fastest[1:].max()), float(paired)


def spread_gain(times: np.ndarray) -> float:
    """The gain a spread lead is credited with: the larger of `gain_estimates` of its CPU
    times, each of which a different kind of interference pulls down, rarely both in one load.

    CPU time still moves with what shares the core (a hyperthread sibling's work, a VM's
    neighbours). The fastest run of each side can pair a rare quiet run of the example with
    slow runs of its groups, enough to put a plain gain under the lead's margin and flip the
    plan; each round's own ratio (runs milliseconds apart, slowed alike) cannot, but a slowdown
    of most rounds' group runs pulls their median down instead. Measured in docs/performance.md
    ("A stable plan") by benchmarks/plan_stability.py."""
    return max(gain_estimates(times))


def intra_op_gain(times: np.ndarray) -> float:
    """The gain an intra-op lead is credited with: the fastest run of each side of
    `gain_estimates` of its wall times, the one-thread run's against every core's.

    Not the smaller of the two estimates, though busy processes can inflate this one (a load
    whose one-thread runs all miss a quiet slice while an every-core run catches one): where
    intra-op's threads really help, the median round understates them in quiet loads (an
    every-core run's wake-ups vary from round to round), and the spread, whose prediction runs
    high, then takes the lead from the faster intra-op. Measured both ways in
    docs/performance.md ("A stable plan")."""
    return gain_estimates(times)[0]


def plan_instances(runtime: EnsembleRuntime, config: RuntimeConfig, timing: GraphTiming | None,
                    example: np.ndarray, max_batch_size: int,
                    build: Callable[[int], EnsembleRuntime],
                    build_spread: Callable[[int], EnsembleRuntime | None] | None = None,
                    ) -> tuple[ThreadPlan, EnsembleRuntime, EnsembleRuntime | None]:
    """How many instances of how many threads (engine/cores.py), measured on `runtime` (open
    with `intra_op_threads`, 1 when auto); the first parallel instance (`runtime`, or the one
    with every core's threads when that alone serves) and the lead instance when the plan has
    one. `build(threads)` opens another instance; `build_spread(threads)` one whose members run
    spread over that many threads, or None where they cannot be. Nothing is measured when both
    settings are given, or on a GPU (one instance)."""
    cores = config.cores or usable_cores()
    if (config.instances != AUTO and config.intra_op_threads != AUTO) or runtime.provider == CUDA:
        return plan_threads(config.instances or 1, config.intra_op_threads or 1, cores,
                            None, None), runtime, None
    # Bounded by time (a warm-up run and at least one more each): a model that takes seconds
    # per example must not take minutes to load. The model's own cost, compared with the
    # request handling's CPU and the loop's bound: on a one-thread session, its CPU time.
    clock = compute_clock(config.intra_op_threads or 1, runtime.provider)
    one = fastest_seconds(runtime.scores, example, 0.1, clock)
    per_example = one  # at batch 1: an upper bound, and plainly heavy when this slow
    batch_seconds = None  # the largest batch, when measured
    if one * max_batch_size < _MEASURE_BUDGET_S:
        batch = np.ascontiguousarray(np.repeat(example, max_batch_size, axis=0))
        try:
            batch_seconds = fastest_seconds(runtime.scores, batch, _MEASURE_BUDGET_S, clock)
            per_example = batch_seconds / max_batch_size
        except InferenceError:  # a model that refuses large batches is its requests' business
            pass
    lone, candidate, spread, spread_seconds = None, None, None, None
    if config.instances == AUTO and config.intra_op_threads == AUTO and cores > 1:
        candidate = build(cores)
        # A lead's gain is in wall time (threads in parallel), timed in turn so a burst of
        # other work cannot land on one thread count alone.
        rounds = times_in_turn((runtime.scores, candidate.scores), example, 0.2, 1)
        one = float(rounds[:, 0].min())
        lone = (one, one / intra_op_gain(rounds))
        spread = build_spread(cores) if build_spread is not None else None
        if spread is not None:
            # Spread members run in parallel: their gain is predicted from CPU times (each
            # group's on one thread against every member's), which other processes' threads
            # cannot lengthen, not from a wall-time race that they would decide.
            cpu = compute_clock(1, runtime.provider)
            groups = spread.graphs[MEMBERS].group_runs(example)
            times = times_in_turn((runtime.scores, *groups), example, 0.2, clock=cpu)
            alone = float(times[:, 0].min())
            spread_seconds = (alone, alone / spread_gain(times))
    plan = plan_threads(config.instances, config.intra_op_threads, cores,
                        per_example if config.instances == AUTO else None, lone, batch_seconds,
                        spread_seconds)
    chosen, unused = (spread, candidate) if plan.lead_spread else (candidate, spread)
    if unused is not None:
        unused.close()
    if chosen is not None and plan.lead_threads:
        return plan, runtime, chosen
    if chosen is not None and plan.threads == cores:  # every core's threads, one instance
        return plan, chosen, None
    if chosen is not None:
        chosen.close()
    return plan, runtime, None


def open_planned(plan: ThreadPlan, runtime: EnsembleRuntime, threads: int,
                 build: Callable[[int], EnsembleRuntime],
                 build_spread: Callable[[int], EnsembleRuntime | None] | None = None,
                 ) -> tuple[EnsembleRuntime, EnsembleRuntime | None] | None:
    """The first parallel instance and the lead instance of a plan known before the load (a
    plan cache's), as `plan_instances` returns them, without measuring: `runtime` is open with
    `threads` intra-op threads, `build` and `build_spread` as there. None when the plan needs
    spread members that this runtime cannot spread (`runtime` is then still open)."""

    def opened(count: int, spread: bool) -> EnsembleRuntime | None:
        if not spread:
            return build(count)
        return build_spread(count) if build_spread is not None else None

    if plan.lead_threads:
        lead = opened(plan.lead_threads, plan.lead_spread)
        return None if lead is None else (runtime, lead)
    if plan.threads == threads:
        return runtime, None
    # One instance of every core's threads, the lead alone (plan_threads): it replaces `runtime`.
    first = opened(plan.threads, plan.lead_spread)
    if first is None:
        return None
    runtime.close()
    return first, None
