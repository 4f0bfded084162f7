"""One served model version: its manifest, its runtime and the batcher in front of it.

`predict` is what every service calls (through ModelRegistry.predict): check the input, queue it,
get this request's rows of the batch's scores back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import numpy as np

from snapserve.proto.scores import EnsembleScores
from snapserve.server.engine.batcher import Batcher, BatcherConfig
from snapserve.server.engine.cores import AUTO, ThreadPlan, plan_threads, usable_cores
from snapserve.server.engine.handoff import start_in_thread
from snapserve.server.engine.runtime import (CUDA, FUSED, MEMBERS, EnsembleRuntime, GraphTiming,
                                             RuntimeConfig, choose_graph)
from snapserve.server.errors import (FusedOutputsMismatch, GraphMismatch, InferenceError,
                                     InvalidInput, ModelLoadError, ModelRefusedInput,
                                     NonFiniteOutput)
from snapserve.server.models.inputs import conform_input
from snapserve.server.engine.runtime import GraphBytes
from snapserve.server.models.manifest import Manifest, read_manifest, read_verified
from snapserve.server.models.statistics import InferenceObserver, ModelStatistics
from snapserve.server.observability.request_context import current_request
from snapserve.server.observability.tracing import record_inference

__all__ = ["ServedEnsemble", "load_version"]

logger = logging.getLogger(__name__)


class _Answer(NamedTuple):
    scores: EnsembleScores | None  # None: refused, see error
    started_ns: int  # perf_counter_ns() when its batch started computing: ends its queue time
    error: InvalidInput | None = None  # this request alone failed; the rest of its batch did not
    compute_ns: int = 0  # how long its batch took
    batch_examples: int = 0  # examples in its batch, all requests together

T = TypeVar("T")
_ANSWER_HEADS = 1024  # per version: batch sizes x output selections

# What a client is told when the model failed on its values alone: ONNX Runtime's own text
# names internal nodes and tensors, so it goes to the log, not to the caller.
REFUSED_MESSAGE = ("the model could not compute this request's input: its values are outside "
                   "what the model accepts (e.g. an index out of range); the other requests of "
                   "its batch were answered, and the server log has the model's own error")


class ServedEnsemble:
    """A loaded model version behind a dynamic batcher.

    `instances` (default: just `runtime`) are copies of the runtime; the batcher computes up to
    that many batches at once, each on an instance of its own, in that instance's own thread:
    a thread that always runs the same sessions finds their weights and buffers warm in its
    core's caches (measured 5-10% faster per small batch than a shared pool's next free thread).
    A cheap model's lone requests compute on the event loop instead, when its thread plan says
    so (`on_loop`, engine/cores.py): the thread hop costs more than such a run.
    `lead` (optional, not among `instances`): an instance with more threads, given a batch only
    when nothing else computes, so a lone request has every core and a full queue the
    parallel instances (engine/cores.py).
    """

    def __init__(self, manifest: Manifest, path: Path, runtime: EnsembleRuntime,
                 batcher_config: BatcherConfig, instances: Sequence[EnsembleRuntime] = (),
                 lead: EnsembleRuntime | None = None) -> None:
        self.manifest = manifest
        self.path = path
        self.runtime = runtime
        parallel: list[EnsembleRuntime] = list(instances) or [runtime]
        self.instances: list[EnsembleRuntime] = ([lead] if lead is not None else []) + parallel
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"inference-{manifest.name}-{i}")
                         for i in range(len(self.instances))]
        pairs = list(zip(self.instances, self._threads))
        # The lead's (instance, thread) pair, and the parallel ones not computing now; touched
        # only on the event loop thread.
        self._lead = pairs.pop(0) if lead is not None else None
        self._free = pairs
        self._busy = 0  # batches computing now
        self._loop: asyncio.AbstractEventLoop | None = None  # the batches' loop, once known
        self.graph_timing: GraphTiming | None = None  # fused vs members at load, when measured
        self.thread_plan: ThreadPlan | None = None  # how instances and threads were chosen
        batcher_config = dataclasses.replace(batcher_config, max_concurrent_batches=len(parallel))
        self.allow_nonfinite = False  # RuntimeConfig.allow_nonfinite, set by load_version
        # The effective per-model settings (models.settings), set by the lifecycle: reported
        # beside the runtime parameters.
        self.settings: dict[str, str] = {}
        self.statistics = ModelStatistics()
        # What the front ends' answers share, per key (answer_head): lives and goes with the version.
        self._answer_heads: dict[tuple[object, ...], Any] = {}
        # Told about every request and batch: the statistics above, and what the server adds
        # (its Prometheus metrics).
        self.observers: list[InferenceObserver] = [self.statistics]
        self.batcher: Batcher[np.ndarray, _Answer] = Batcher(
            self._infer_batch, batcher_config, size=len, name=f"{manifest.name}:{manifest.version}")

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def max_batch_size(self) -> int:
        return self.batcher.config.max_batch_size

    async def predict(self, x: np.ndarray, timeout: float | None = None) -> EnsembleScores:
        """Scores for the examples in x ([B, ...]); InvalidInput if x does not fit the model."""
        examples = int(x.shape[0]) if x.ndim else 0
        start = time.perf_counter_ns()
        try:
            x = conform_input(x, self.manifest.input, self.max_batch_size, self.allow_nonfinite)
            answer = await self.batcher.submit(x, timeout=timeout)
            if answer.error is not None:
                raise answer.error
        except Exception:  # not CancelledError: a caller that went away is no failure of ours
            for observer in self.observers:
                observer.record_request(examples, False, time.perf_counter_ns() - start, 0)
            raise
        assert answer.scores is not None  # an answer without scores carries its error
        for observer in self.observers:
            observer.record_request(examples, True, time.perf_counter_ns() - start,
                                    max(answer.started_ns - start, 0))
        # In the request's own context: its log lines name this version, its span gets the
        # queue wait and the batch (server/observability/request_context.py, server/observability/tracing.py).
        request = current_request()
        if request is not None:
            request.version = self.version
        record_inference(start, max(answer.started_ns, start), answer.compute_ns,
                         answer.batch_examples)
        return answer.scores

    def answer_head(self, key: tuple[object, ...], build: Callable[..., T], *args: object) -> T:
        """`build(*args)`, made once per `key` for this version: what a front end's answers of
        one shape share (api/messages.py, api/kserve_messages.py). At most _ANSWER_HEADS are
        kept (KServe outputs may be named in any order)."""
        head = self._answer_heads.get(key)
        if head is None:
            if len(self._answer_heads) >= _ANSWER_HEADS:
                self._answer_heads.clear()
            head = self._answer_heads[key] = build(*args)
        return head  # type: ignore[no-any-return]

    @property
    def runtime_parameters(self) -> dict[str, str]:
        """How this version runs, for metadata (KServe ModelConfig parameters) and logs."""
        parameters = {"graph": self.runtime.graph, "instances": str(len(self.instances)),
                      "execution_provider": self.runtime.provider}
        if self.graph_timing is not None:
            parameters["graph_timing"] = self.graph_timing.describe()
        if self.thread_plan is not None:
            parameters["intra_op_threads"] = ",".join(map(str, self.thread_plan.thread_counts))
            parameters["concurrent_batches"] = str(self.thread_plan.parallel)
            parameters["lone_request_compute"] = ("event_loop" if self.thread_plan.on_loop
                                                  else "instance_thread")
            parameters["threads_choice"] = self.thread_plan.why
        return {**self.settings, **parameters}

    async def _infer_batch(self, inputs: list[np.ndarray]) -> list[_Answer]:
        if self._loop is None:  # kept: asyncio.get_running_loop() is a getpid() system call
            self._loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        # The batcher runs at most len(self._free) batches at once, so one is always free; the
        # lead only when nothing else computes (so it is never taken twice).
        pair = self._lead if self._lead is not None and self._busy == 0 else self._free.pop()
        self._busy += 1
        try:
            # A lone request of a cheap model: on the event loop, no thread hop (engine/cores.py).
            # Batches of more go to the instance's thread, so the loop takes in the next
            # requests while they compute (on the loop, they formed convoys of eight at c=32).
            if len(inputs) == 1 and self.thread_plan is not None and self.thread_plan.on_loop:
                scores, answered = self._infer_batch_sync(pair[0], inputs)
            else:
                # Started before the loop goes on: the thread gets the GIL now, not after the
                # loop's next idle moment (engine/handoff.py).
                scores, answered = await start_in_thread(self._loop, pair[1],
                                                         self._infer_batch_sync, pair[0], inputs)
        finally:
            self._busy -= 1
            if pair is not self._lead:
                self._free.append(pair)
        compute_ns = time.perf_counter_ns() - started
        examples = sum(len(x) for x in inputs)
        for observer in self.observers:
            observer.record_batch(examples, compute_ns)
            for part in answered:
                observer.record_scores(part)
        return [_Answer(None, started, r) if isinstance(r, InvalidInput)
                else _Answer(r, started, None, compute_ns, examples) for r in scores]

    def _infer_batch_sync(self, runtime: EnsembleRuntime, inputs: list[np.ndarray]
                          ) -> tuple[list[EnsembleScores | InvalidInput], list[EnsembleScores]]:
        """Each request's scores or why it is refused, and the answered scores for the
        observers (the whole batch's at once when every request was answered).

        Runs where the batch computes (an instance's thread, or the loop for a cheap model's
        lone request): the scores come from the fused graph or numpy over the whole batch, so
        the event loop only slices views. The common case is one run and one check of the
        outputs (the inputs were checked per request, so that a bad one is refused before it
        takes a place in the queue). A run the model refuses is re-run in halves until the
        requests it cannot compute are found (_isolate), and a non-finite output is looked for
        per request: those requests alone are refused, with one log line for the batch."""
        try:
            scores = runtime.scores(_join(inputs))
        except InferenceError as exc:
            results = _halves(runtime, inputs, exc)
        else:
            if self.allow_nonfinite or np.isfinite(scores.probabilities).all():
                return _rows(scores, inputs), [scores]
            results = list(_rows(scores, inputs))
        failed = [r for r in results if isinstance(r, InferenceError)]
        if failed:
            cause = str(failed[0]).splitlines()[0] if str(failed[0]) else type(failed[0]).__name__
            logger.warning("%s: the model could not compute %d of %d requests of a batch (refused "
                           "with INVALID_ARGUMENT; the others were answered): %s",
                           self.batcher.name, len(failed), len(inputs), cause)
        answers = [ModelRefusedInput(REFUSED_MESSAGE) if isinstance(r, InferenceError)
                   else r if self.allow_nonfinite else _finite_or_refused(r, x)
                   for r, x in zip(results, inputs)]
        return answers, [a for a in answers if not isinstance(a, InvalidInput)]

    def warm_up(self) -> None:
        """One example through every instance: loads kernels now, and checks the class count."""
        for runtime in self.instances:
            warm_up(self.manifest, runtime)

    async def start(self) -> None:
        await self.batcher.start()

    def terminate(self) -> None:
        """Stop every run in progress at its next node: the grace period is over."""
        for runtime in self.instances:
            runtime.terminate()

    async def close(self) -> None:
        await self.batcher.close()  # answers what it holds first: the threads are idle after
        for thread in self._threads:
            thread.shutdown(wait=False)


def _join(inputs: list[np.ndarray]) -> np.ndarray:
    """The requests as one batch: one copy joins them; a lone request's read-only view of its
    message goes as is."""
    return inputs[0] if len(inputs) == 1 else np.concatenate(inputs, axis=0)


def _rows(scores: EnsembleScores, inputs: list[np.ndarray]) -> list[EnsembleScores]:
    """The batch's scores cut back into each request's rows (views)."""
    if len(inputs) == 1:
        return [scores]
    bounds = np.cumsum([0] + [len(i) for i in inputs]).tolist()
    return [scores.rows(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _isolate(runtime: EnsembleRuntime,
             inputs: list[np.ndarray]) -> list[EnsembleScores | InferenceError]:
    """Each request's scores, or the error the model raised on it alone. A failed batch is
    re-run in halves (bisection): k bad requests among n cost about 2k*log2(n) extra runs,
    and the good ones are answered."""
    try:
        return _rows(runtime.scores(_join(inputs)), inputs)
    except InferenceError as exc:
        return _halves(runtime, inputs, exc)


def _halves(runtime: EnsembleRuntime, inputs: list[np.ndarray],
            exc: InferenceError) -> list[EnsembleScores | InferenceError]:
    """After `inputs` failed together with `exc`: each half on its own (_isolate)."""
    if len(inputs) == 1:
        return [exc]
    half = len(inputs) // 2
    return _isolate(runtime, inputs[:half]) + _isolate(runtime, inputs[half:])


def _finite_or_refused(scores: EnsembleScores, x: np.ndarray) -> EnsembleScores | InvalidInput:
    """The scores, or NonFiniteOutput naming the examples whose probabilities are NaN or Inf
    (finite inputs can overflow a model: 3e38 everywhere gives Inf logits, NaN softmax)."""
    finite = np.isfinite(scores.probabilities).reshape(len(x), -1).all(axis=1)
    if finite.all():
        return scores
    bad = np.flatnonzero(~finite).tolist()
    largest = float(np.max(np.abs(x))) if x.size and x.dtype.kind in "fiu" else float("nan")
    return NonFiniteOutput(
        f"the model's output for example{'s' if len(bad) > 1 else ''} "
        f"{', '.join(map(str, bad))} of this request is not finite (NaN or Inf): the input "
        f"drives the model beyond the range of its numbers (largest |value| sent: {largest:.3g}); "
        "send inputs of the scale the model was trained on (normalised as its metadata says)")


def warm_up(manifest: Manifest, runtime: EnsembleRuntime) -> None:
    """One example through the runtime: loads kernels now, and checks the class count."""
    x = np.zeros((1, *manifest.input.shape[1:]), dtype=manifest.input.dtype)
    try:
        classes = runtime.run(x).shape[-1]
    except InferenceError as exc:
        raise GraphMismatch(f"warm-up inference failed: {exc}") from exc
    if classes != len(manifest.classes):
        raise GraphMismatch(f"members output {classes} logits; the manifest lists "
                             f"{len(manifest.classes)} classes")


def _graphs_to_load(manifest: Manifest, config: RuntimeConfig) -> tuple[Path | None, tuple[str, ...]]:
    """The fused file to load (the FP16 one when asked and present) and which graphs to open."""
    fused = manifest.ensemble
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


def _build_runtime(manifest: Manifest, verified: dict[Path, GraphBytes], config: RuntimeConfig,
                   graphs: Sequence[str], fused_file: Path | None) -> EnsembleRuntime:
    """A runtime over the verified bytes (read_verified): the graph files are not opened again."""
    fused = manifest.ensemble
    return EnsembleRuntime(
        [verified[Path(m.file)] for m in manifest.members], manifest.input.name,
        manifest.output_name, config, temperature=manifest.temperature,
        fused_path=None if fused_file is None else verified[fused_file],
        temperature_input=fused.temperature_input if fused is not None else "temperature",
        graphs=graphs)


def load_version(path: Path, runtime_config: RuntimeConfig,
                 batcher_config: BatcherConfig) -> ServedEnsemble:
    """Read, verify and load <repository>/<model>/<version>; raises ModelLoadError if unusable.

    With a fused graph and `graph=auto`, the first instance opens both graphs, times them
    (runtime.choose_graph) and keeps the faster; the other instances open only that one. A fused
    graph whose outputs are not `SCORE_NAMES` refuses the version (FusedOutputsMismatch): it was
    built for other scores than this server computes. Any other fused-graph fault is logged and
    the members serve.
    """
    manifest = read_manifest(path)
    verified = read_verified(manifest, path)  # read once: what was hashed is what loads
    fused_file, graphs = _graphs_to_load(manifest, runtime_config)
    # The first instance: one thread when auto (the graphs are timed on it, then the threads).
    first_config = dataclasses.replace(runtime_config,
                                       intra_op_threads=runtime_config.intra_op_threads or 1)
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
    # FP16 members round: the export checked them within 1e-2 of FP32 (trainer/fuse.py).
    fp16 = manifest.ensemble is not None and fused_file == Path(manifest.ensemble.fp16_file or "")
    graph, timing = choose_graph(runtime, example, batcher_config.max_batch_size,
                                 tolerance=1e-2 if fp16 else 1e-4)
    runtime.keep(graph)

    def build(threads: int) -> EnsembleRuntime:
        config = dataclasses.replace(runtime_config, intra_op_threads=threads)
        return _build_runtime(manifest, verified, config, (graph,), fused_file)

    plan, runtime, lead = _plan_instances(runtime, runtime_config, timing, example,
                                          batcher_config.max_batch_size, build)
    instances = [runtime] + [build(plan.threads) for _ in range(plan.parallel - 1)]
    served = ServedEnsemble(manifest, path, runtime, batcher_config, instances, lead)
    served.allow_nonfinite = runtime_config.allow_nonfinite
    served.graph_timing = timing
    served.thread_plan = plan
    served.warm_up()
    logger.info("%s version %d: serving the %s graph on %d instance(s) of %s thread(s) (%s)%s",
                manifest.name, manifest.version, graph, len(served.instances),
                ",".join(map(str, plan.thread_counts)), plan.why,
                f"; measured {timing.describe()}" if timing is not None else "")
    return served


_MEASURE_BUDGET_S = 0.3  # seconds of runs per measurement at load


def _fastest_seconds(fn: Callable[[np.ndarray], object], x: np.ndarray, budget_s: float) -> float:
    """The fastest of a few runs after a warm-up: other processes' work only ever adds time, so
    the minimum is the least disturbed estimate of the model's own cost (a median at load
    was 2-6x off on a busy machine, enough to flip the choice)."""
    fn(x)
    best, deadline = float("inf"), time.perf_counter() + budget_s
    while best == float("inf") or time.perf_counter() < deadline:
        began = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - began)
    return best


def _plan_instances(runtime: EnsembleRuntime, config: RuntimeConfig, timing: GraphTiming | None,
                    example: np.ndarray, max_batch_size: int,
                    build: Callable[[int], EnsembleRuntime],
                    ) -> tuple[ThreadPlan, EnsembleRuntime, EnsembleRuntime | None]:
    """How many instances of how many threads (engine/cores.py), measured on `runtime` (open
    with `intra_op_threads`, 1 when auto); the first parallel instance (`runtime`, or the one
    with every core's threads when that alone serves) and the lead instance when the plan has
    one. Nothing is measured when both settings are given, or on a GPU (one instance)."""
    cores = config.cores or usable_cores()
    if (config.instances != AUTO and config.intra_op_threads != AUTO) or runtime.provider == CUDA:
        return plan_threads(config.instances or 1, config.intra_op_threads or 1, cores,
                            None, None), runtime, None
    # Bounded by time (a warm-up run and at least one more each): a model that takes seconds
    # per example must not take minutes to load.
    one = _fastest_seconds(runtime.scores, example, 0.1)
    per_example = one  # at batch 1: an upper bound, and plainly heavy when this slow
    batch_seconds = None  # the largest batch, when measured
    if one * max_batch_size < _MEASURE_BUDGET_S:
        batch = np.ascontiguousarray(np.repeat(example, max_batch_size, axis=0))
        try:
            batch_seconds = _fastest_seconds(runtime.scores, batch, _MEASURE_BUDGET_S)
            per_example = batch_seconds / max_batch_size
        except InferenceError:  # a model that refuses large batches is its requests' business
            pass
    lone, candidate = None, None
    if config.instances == AUTO and config.intra_op_threads == AUTO and cores > 1:
        candidate = build(cores)
        lone = (one, _fastest_seconds(candidate.scores, example, 0.1))
    plan = plan_threads(config.instances, config.intra_op_threads, cores,
                        per_example if config.instances == AUTO else None, lone, batch_seconds)
    if candidate is not None and plan.lead_threads:
        return plan, runtime, candidate
    if candidate is not None and plan.threads == cores:  # every core's threads, one instance
        return plan, candidate, None
    return plan, runtime, None
