"""One served model version: its manifest, its runtime instances and the batcher in front of them.

`predict` is what the pipeline calls (api/pipeline.py `submit`): check
the input, queue it, get this request's rows of the batch's scores back. A batch runs on an
instance (`_infer_batch`); its answers, bad requests found by bisection, come from
models/bisection.py. Loading a version is models/loading.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from snapserve.proto.scores import EnsembleScores
from snapserve.server.engine.batcher import Batcher, BatcherConfig
from snapserve.server.engine.cores import ThreadPlan
from snapserve.server.engine.handoff import start_in_thread
from snapserve.server.engine.runtime import EnsembleRuntime, GraphTiming
from snapserve.server.errors import InvalidInput
from snapserve.server.models.bisection import answer_batch
from snapserve.server.models.inputs import conform_input
from snapserve.server.models.manifest import Manifest
from snapserve.server.models.statistics import InferenceObserver, ModelStatistics
from snapserve.server.observability.request_context import current_request
from snapserve.server.observability.threads import name_os_thread
from snapserve.server.observability.tracing import record_inference

__all__ = ["LONE_CALL", "TAKEN_IN_OFF_LOOP", "ServedEnsemble"]

logger = logging.getLogger(__name__)

# True in the task of a request that a front end took in off the event loop (the C++ one: gRPC's
# threads read and queue its calls while the loop computes); grpc.aio and REST take theirs in
# on the loop itself, so a loop busy computing holds their next requests back.
TAKEN_IN_OFF_LOOP: ContextVar[bool] = ContextVar("snapserve_taken_in_off_loop", default=False)
# Set by a front end that takes calls in off the loop, in a unary call's task: asked when the
# request reaches an idle batcher, whether it is the only call the front end holds now (no other
# could join its batch). A cheap model then computes it at once, without the batcher's queue.
LONE_CALL: ContextVar[Callable[[], bool] | None] = ContextVar("snapserve_lone_call", default=None)


class _Answer(NamedTuple):
    scores: EnsembleScores | None  # None: refused, see error
    started_ns: int  # perf_counter_ns() when its batch started computing: ends its queue time
    error: InvalidInput | None = None  # this request alone failed; the rest of its batch did not
    compute_ns: int = 0  # how long its batch took
    batch_examples: int = 0  # examples in its batch, all requests together


class ServedEnsemble:
    """A loaded model version behind a dynamic batcher.

    `instances` (default: just `runtime`) are copies of the runtime; the batcher computes up to
    that many batches at once, each on an instance of its own, in that instance's own thread:
    a thread that always runs the same sessions finds their weights and buffers warm in its
    core's caches (measured 5-10% faster per small batch than a shared pool's next free thread).
    A cheap model's batches compute on the event loop instead, when its thread plan says so
    (`on_loop`, engine/cores.py): the thread hop costs more than such a run. A lone request
    always may; a batch of several only while every request waiting was taken in off the loop
    (`TAKEN_IN_OFF_LOOP`), and the batcher then sends what is queued at once: the next requests
    queue in the front end while the loop computes, and form the next batch. A request that is
    the front end's only call (`LONE_CALL`) and finds the batcher idle computes at once in its
    own task (`Batcher.at_once`): three turns of the loop fewer than through the queue.
    `lead` (optional, not among `instances`): an instance with more threads, given a batch only
    when nothing else computes, so a lone request has every core and a full queue the
    parallel instances (engine/cores.py).
    """

    def __init__(self, manifest: Manifest, path: Path, runtime: EnsembleRuntime,
                 batcher_config: BatcherConfig, instances: Sequence[EnsembleRuntime] = (),
                 lead: EnsembleRuntime | None = None, thread_plan: ThreadPlan | None = None
                 ) -> None:
        self.manifest = manifest
        self.path = path
        self.runtime = runtime
        parallel: list[EnsembleRuntime] = list(instances) or [runtime]
        self.instances: list[EnsembleRuntime] = ([lead] if lead is not None else []) + parallel
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"inference-{manifest.name}-{i}",
                                            initializer=name_os_thread,
                                            initargs=(f"inference-{i}",))
                         for i in range(len(self.instances))]
        pairs = list(zip(self.instances, self._threads))
        # The lead's (instance, thread) pair, and the parallel ones not computing now; touched
        # only on the event loop thread.
        self._lead = pairs.pop(0) if lead is not None else None
        self._free = pairs
        self._busy = 0  # batches computing now
        self._loop: asyncio.AbstractEventLoop | None = None  # the batches' loop, once known
        self.graph_timing: GraphTiming | None = None  # fused vs members at load, when measured
        self.thread_plan = thread_plan  # how instances and threads were chosen, when planned
        # Whether the graph and plan were measured at this load or read from the plan cache.
        self.plan_source = "measured at load"
        # A batch of up to this many examples may compute on the event loop (0: never).
        self._loop_examples = thread_plan.loop_examples if thread_plan is not None else 0
        # Requests in predict() now that a front end took in on the event loop (grpc.aio, REST,
        # an in-process caller): while there are any, batches of several go to the thread.
        self._taken_in_on_loop = 0
        batcher_config = batcher_config.replace(max_concurrent_batches=len(parallel))
        self.allow_nonfinite = False  # RuntimeConfig.allow_nonfinite, set by load_version
        # The effective per-model settings (models.settings), set by the lifecycle: reported
        # beside the runtime parameters.
        self.settings: dict[str, str] = {}
        self.statistics = ModelStatistics()
        # Told about every request and batch: the statistics above, and what the server adds
        # (its Prometheus metrics).
        self.observers: list[InferenceObserver] = [self.statistics]
        self.batcher: Batcher[np.ndarray, _Answer] = Batcher(
            self._infer_batch, batcher_config, size=len, name=f"{manifest.name}:{manifest.version}",
            fn_now=self._infer_now)
        self.batcher.waits_for_company = lambda: not self._batches_on_loop()
        self.batcher.at_once = self._alone

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
        taken_in_on_loop = not TAKEN_IN_OFF_LOOP.get()
        self._taken_in_on_loop += taken_in_on_loop
        try:
            x = conform_input(x, self.manifest.input, self.max_batch_size, self.allow_nonfinite)
            answer = await self.batcher.submit(x, timeout=timeout)
            if answer.error is not None:
                raise answer.error
        except Exception:  # not CancelledError: a caller that went away is no failure of ours
            for observer in self.observers:
                observer.record_request(examples, False, time.perf_counter_ns() - start, 0)
            raise
        finally:
            self._taken_in_on_loop -= taken_in_on_loop
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

    @property
    def runtime_parameters(self) -> dict[str, str]:
        """How this version runs, for metadata (KServe ModelConfig parameters) and logs."""
        parameters = {"graph": self.runtime.graph, "instances": str(len(self.instances)),
                      "execution_provider": self.runtime.provider}
        if self.graph_timing is not None:
            parameters["graph_timing"] = self.graph_timing.describe()
            parameters["graph_choice"] = self.graph_timing.why
        # precision, cuda_graphs, io_binding, cudnn_conv_algo_search as they apply
        parameters.update(self.runtime.options_in_effect())
        if self.thread_plan is not None:
            counts = list(self.thread_plan.thread_counts)
            if self.thread_plan.lead_spread:  # its sessions run on one thread each
                counts[0] = 1
            parameters["intra_op_threads"] = ",".join(map(str, counts))
            parameters["lead_instance"] = self.thread_plan.lead
            parameters["concurrent_batches"] = str(self.thread_plan.parallel)
            parameters["lone_request_compute"] = ("event_loop" if self._loop_examples
                                                  else "instance_thread")
            if self._loop_examples:  # the largest batch computed there
                parameters["loop_max_examples"] = str(self._loop_examples)
            parameters["threads_choice"] = self.thread_plan.why
        if self.graph_timing is not None or self.thread_plan is not None:
            parameters["plan_source"] = self.plan_source
        return {**self.settings, **parameters}

    def _alone(self, x: np.ndarray) -> bool:
        """Whether x, finding the batcher idle, computes at once on the loop: the plan puts
        its size there, and its front end holds no other call that could join it."""
        lone_call = LONE_CALL.get()
        return len(x) <= self._loop_examples and lone_call is not None and lone_call()

    def _infer_now(self, inputs: list[np.ndarray]) -> list[_Answer]:
        """Batcher.at_once's batch: one request, on the event loop, in its own task."""
        return self._compute_on_loop(inputs, len(inputs[0]))

    def _compute_on_loop(self, inputs: list[np.ndarray], examples: int) -> list[_Answer]:
        started = time.perf_counter_ns()
        pair = self._take_instance()
        try:
            scores, answered = answer_batch(pair[0], inputs, self.allow_nonfinite,
                                            self.batcher.name)
        finally:
            self._give_back(pair)
        return self._answers(started, examples, scores, answered)

    def _take_instance(self) -> tuple[EnsembleRuntime, ThreadPoolExecutor]:
        # The batcher runs at most len(self._free) batches at once, so one is always free; the
        # lead only when nothing else computes (so it is never taken twice).
        pair = self._lead if self._lead is not None and self._busy == 0 else self._free.pop()
        self._busy += 1
        return pair

    def _give_back(self, pair: tuple[EnsembleRuntime, ThreadPoolExecutor]) -> None:
        self._busy -= 1
        if pair is not self._lead:
            self._free.append(pair)

    async def _infer_batch(self, inputs: list[np.ndarray]) -> list[_Answer]:
        examples = sum(len(x) for x in inputs)
        # A cheap model's batch on the event loop, no thread hop (engine/cores.py): a lone
        # request always, a batch of several while the front ends take the next requests in
        # off the loop meanwhile; where the loop takes them in, it would hold them back while
        # it computes, and the batches that follow shrink to convoys of one or two.
        if examples <= self._loop_examples and (len(inputs) == 1 or self._batches_on_loop()):
            return self._compute_on_loop(inputs, examples)
        if self._loop is None:  # kept: asyncio.get_running_loop() is a getpid() system call
            self._loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        pair = self._take_instance()
        try:
            # Started before the loop goes on: the thread gets the GIL now, not after the
            # loop's next idle moment (engine/handoff.py).
            scores, answered = await start_in_thread(self._loop, pair[1], answer_batch, pair[0],
                                                     inputs, self.allow_nonfinite,
                                                     self.batcher.name)
        finally:
            self._give_back(pair)
        return self._answers(started, examples, scores, answered)

    def _answers(self, started: int, examples: int, scores: list[EnsembleScores | InvalidInput],
                 answered: Sequence[EnsembleScores]) -> list[_Answer]:
        compute_ns = time.perf_counter_ns() - started
        for observer in self.observers:
            observer.record_batch(examples, compute_ns)
            for part in answered:
                observer.record_scores(part)
        return [_Answer(None, started, r) if isinstance(r, InvalidInput)
                else _Answer(r, started, None, compute_ns, examples) for r in scores]

    def _batches_on_loop(self) -> bool:
        """Whether batches of several requests compute on the event loop now: the plan allows
        it, and no request waiting was taken in on the loop (TAKEN_IN_OFF_LOOP)."""
        return self._loop_examples > 0 and self._taken_in_on_loop == 0

    def on_instance_threads(self, fn: Callable[[EnsembleRuntime], None]) -> None:
        """fn(instance) for each instance on the thread that computes its batches, one after
        another: what ONNX Runtime keeps per thread (CUDA graphs) is made where it is used."""
        for instance, thread in zip(self.instances, self._threads):
            thread.submit(fn, instance).result()

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
        for runtime in self.instances:
            runtime.close()
