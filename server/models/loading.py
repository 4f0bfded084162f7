"""Loading a model version: read and verify its files, choose its graph, plan its instances.

`load_version` is what the lifecycle (models/lifecycle.py) calls for each version folder: the
manifest and the verified graph bytes (models/manifest.py), the graph to serve (fused or
members, runtime.choose_graph), the instances and threads (engine/planning.py), or both from the
plan cache (models/plans.py), a warm-up run through each, and the ServedEnsemble
(models/ensemble.py) over them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from snapserve.server.engine.adaptive import AdaptiveMembers
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.cores import AUTO, check_thread_budget, usable_cores
from snapserve.server.engine.planning import open_planned, plan_instances
from snapserve.server.engine.runtime import (CPU, FUSED, MEMBERS, EnsembleRuntime,
                                             GraphBytes, RuntimeConfig, choose_graph,
                                             compute_clock)
from snapserve.server.errors import (FusedOutputsMismatch, GraphMismatch, InferenceError,
                                     ModelLoadError)
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.manifest import Manifest, read_manifest, read_verified
from snapserve.server.models.plans import PlanCache

__all__ = ["adaptive_plan", "load_version", "warm_up"]

logger = logging.getLogger(__name__)


def warm_up(manifest: Manifest, runtime: EnsembleRuntime, batch_sizes: Sequence[int] = ()) -> None:
    """One example through the runtime, which checks the class count; then its CUDA graphs
    captured and `batch_sizes` run on the calling thread (EnsembleRuntime.warm_up)."""
    x = np.zeros((1, *manifest.input.shape[1:]), dtype=manifest.input.dtype)
    try:
        classes = runtime.run(x).shape[-1]
        runtime.warm_up(x, batch_sizes)
    except InferenceError as exc:
        raise GraphMismatch(f"warm-up inference failed: {exc}") from exc
    if classes != len(manifest.classes):
        raise GraphMismatch(f"members output {classes} logits; the manifest lists "
                             f"{len(manifest.classes)} classes")


def _graphs_to_load(manifest: Manifest, config: RuntimeConfig) -> tuple[Path | None, tuple[str, ...]]:
    """The fused file to load (the FP16 one when asked and present) and which graphs to open."""
    fused = manifest.ensemble
    if config.adaptive_members and manifest.adaptive is not None:
        return None, (MEMBERS,)  # adaptive evaluation runs member by member
    if fused is None or config.graph == MEMBERS:
        if config.graph == FUSED:
            logger.warning("%s version %d has no fused graph: serving the members",
                           manifest.name, manifest.version)
        return None, (MEMBERS,)
    file = fused.file
    if config.precision == "fp16":
        if fused.fp16_file is None:
            logger.warning("%s version %d has no FP16 fused graph: serving FP32",
                           manifest.name, manifest.version)
        else:
            file = fused.fp16_file
    return Path(file), ((FUSED,) if config.graph == FUSED else (FUSED, MEMBERS))


def adaptive_plan(manifest: Manifest, config: RuntimeConfig) -> AdaptiveMembers | None:
    """The stopping plan when the model serves adaptively and the version is calibrated."""
    if not config.adaptive_members or manifest.adaptive is None:
        return None
    if manifest.selection is not None and list(manifest.selection) != list(range(len(manifest.members))):
        # The calibration runs over the distinct members; a selection with repeats is served whole.
        logger.warning("%s version %d: adaptive_members is off for a member selection with repeats "
                       "(%s): every listed member runs", manifest.name, manifest.version,
                       list(manifest.selection))
        return None
    return AdaptiveMembers(manifest.adaptive.order, manifest.adaptive.thresholds,
                           manifest.adaptive.temperatures)


def _log_adaptive(manifest: Manifest, runtime: EnsembleRuntime, config: RuntimeConfig) -> None:
    if runtime.adaptive is not None:
        logger.info("%s version %d: adaptive member evaluation (%s); it serves the members "
                    "graph, since the fused graph runs every member", manifest.name,
                    manifest.version, runtime.adaptive.describe())
    elif config.adaptive_members and manifest.adaptive is None:
        logger.warning("%s version %d: adaptive_members is on but the manifest has no 'adaptive' "
                       "calibration (written by `trainer train`, or `trainer import` with "
                       "validation data): every member runs", manifest.name, manifest.version)


def _build_runtime(manifest: Manifest, verified: dict[Path, GraphBytes], config: RuntimeConfig,
                   graphs: Sequence[str], fused_file: Path | None) -> EnsembleRuntime:
    """A runtime over the verified bytes (read_verified): the graph files are not opened again."""
    fused = manifest.ensemble
    return EnsembleRuntime(
        [verified[Path(m.file)] for m in manifest.members], manifest.input.name,
        manifest.output_name, config, temperature=manifest.temperature,
        output_kind=manifest.output_kind,
        fused_path=None if fused_file is None else verified[fused_file],
        temperature_input=fused.temperature_input if fused is not None else "temperature",
        graphs=graphs, adaptive=adaptive_plan(manifest, config), served=manifest.selection,
        fused_precision="fp16" if fused is not None and fused_file == Path(fused.fp16_file or "")
        else "fp32")


def _plan_cache(manifest: Manifest, runtime: EnsembleRuntime, config: RuntimeConfig,
                max_batch_size: int, cores: int) -> PlanCache | None:
    """The version's plan file, where the cache is on and the load measures something: the
    graphs (both open) or the instances and threads (either auto)."""
    if len(runtime.graphs) < 2 and AUTO not in (config.instances, config.intra_op_threads):
        return None
    return PlanCache.for_version(manifest, config, max_batch_size, cores, runtime.provider)


def load_version(path: Path, runtime_config: RuntimeConfig,
                 batcher_config: BatcherConfig) -> ServedEnsemble:
    """Read, verify and load <repository>/<model>/<version>; raises ModelLoadError if unusable.

    With a fused graph and `graph=auto`, the first instance opens both graphs, times them
    (runtime.choose_graph) and keeps the faster; the other instances open only that one. A fused
    graph whose outputs are not `SCORE_NAMES` refuses the version (FusedOutputsMismatch): it was
    built for other scores than this server computes. Any other fused-graph fault is logged and
    the members serve. With `plan_cache` set, a plan measured at an earlier load of this version
    with these settings on this machine is served instead of measuring (models/plans.py); the
    graphs' agreement is checked all the same.
    """
    # Before any session opens: the first would already start the threads asked for.
    cores = runtime_config.cores or usable_cores()
    check_thread_budget(runtime_config.instances, runtime_config.intra_op_threads, cores)
    manifest = read_manifest(path)
    verified = read_verified(manifest, path)  # read once: what was hashed is what loads
    fused_file, graphs = _graphs_to_load(manifest, runtime_config)
    # The first instance: one thread when auto (the graphs are timed on it, then the threads).
    first_config = runtime_config.replace(intra_op_threads=runtime_config.intra_op_threads or 1)
    try:
        runtime = _build_runtime(manifest, verified, first_config, graphs, fused_file)
    except FusedOutputsMismatch:
        raise  # the version and this server disagree on the scores: refused, not served slower
    except ModelLoadError as exc:
        if graphs == (MEMBERS,):
            raise
        logger.error("%s version %d: the fused graph cannot be used (%s): serving the members",
                     manifest.name, manifest.version, exc)
        graphs = (MEMBERS,)
        runtime = _build_runtime(manifest, verified, first_config, graphs, None)
    runtime.check_input(manifest.input.dtype, manifest.input.shape)
    warm_up(manifest, runtime)
    example = np.zeros((1, *manifest.input.shape[1:]), dtype=manifest.input.dtype)
    cache = _plan_cache(manifest, runtime, runtime_config, batcher_config.max_batch_size, cores)
    cached = cache.read() if cache is not None and not runtime_config.remeasure_plans else None
    if cached is not None and cached.graph not in runtime.graphs:
        cached = None  # its graph did not open this time (logged): measured as it stands
    # The tolerance follows the provider and the fused graph's precision (agreement_tolerance);
    # a cached graph is checked as a measured one is, only not timed.
    graph, timing = choose_graph(runtime, example, batcher_config.max_batch_size,
                                 clock=compute_clock(first_config.intra_op_threads, runtime.provider),
                                 known=None if cached is None else cached.graph)
    if cached is not None and graph != cached.graph:
        cached = None  # the graphs disagree (logged): the members serve, and the plan is theirs
    elif cached is not None:
        timing = cached.timing
    runtime.keep(graph)
    _log_adaptive(manifest, runtime, runtime_config)

    def build(threads: int) -> EnsembleRuntime:
        config = runtime_config.replace(intra_op_threads=threads)
        return _build_runtime(manifest, verified, config, (graph,), fused_file)

    def build_spread(threads: int) -> EnsembleRuntime | None:
        # The members of a lone example spread over the cores: one-thread CPU sessions of two
        # members or more; not when adaptive, which runs them one after another by design.
        if runtime.provider != CPU or runtime.adaptive is not None:
            return None
        spread = _build_runtime(manifest, verified, runtime_config.replace(intra_op_threads=1),
                                (MEMBERS,), None)
        if spread.spread_members(threads) < 2:
            spread.close()
            return None
        return spread

    opened = None if cached is None else open_planned(
        cached.plan, runtime, first_config.intra_op_threads, build, build_spread)
    if cached is not None and opened is None:
        logger.warning("%s version %d: the cached plan spreads the members, which cannot be "
                       "spread here: measuring it again", manifest.name, manifest.version)
    if cached is not None and opened is not None:
        plan, (runtime, lead) = cached.plan, opened
        source = cached.describe()
    else:
        plan, runtime, lead = plan_instances(runtime, runtime_config, timing, example,
                                              batcher_config.max_batch_size, build, build_spread)
        source = "measured at load"
        if cache is not None and cache.write(graph, timing, plan):
            source += f", kept in the plan cache ({cache.path})"
    instances = [runtime] + [build(plan.threads) for _ in range(plan.parallel - 1)]
    served = ServedEnsemble(manifest, path, runtime, batcher_config, instances, lead, plan)
    served.allow_nonfinite = runtime_config.allow_nonfinite
    served.graph_timing = timing
    served.plan_source = source
    # Every instance, on its own thread, before the version is ready: the sizes live traffic
    # meets first, so their first-run costs (CUDA graph capture included) are paid at load.
    sizes = runtime.warm_up_batch_sizes(batcher_config.max_batch_size)
    served.on_instance_threads(lambda instance: warm_up(manifest, instance, sizes))
    logger.info("%s version %d: serving the %s graph on %d instance(s) of %s thread(s) (%s)%s; "
                "plan %s", manifest.name, manifest.version, graph, len(served.instances),
                ",".join(map(str, plan.thread_counts)), plan.why,
                f"; measured {timing.describe()}" if timing is not None else "", source)
    return served
