"""The ensemble runtime: ONNX Runtime sessions for one model version, scores out.

Knows no gRPC and no batching: `scores(x)` takes a whole batch and is called from a worker
thread (ONNX Runtime releases the GIL while it computes). Two ways to compute the same scores:

- `members`: one session per member, then the numpy scores (snapserve.proto.scores);
- `fused`: the version's `ensemble.onnx`, one session that runs every member and computes the
  scores in the graph, so one `run` replaces M runs and the Python math.

`choose_graph` times both at load and keeps the faster (the fused graph on a near-tie).
Settings (docs/performance.md): full graph optimisation, sequential execution,
`intra_op_threads` per session, no thread spinning
(spinning threads steal the cores the event loop and the gRPC threads need), the CPU memory
arena on (batch shapes repeat, so its blocks are reused). On CUDA, inputs are copied to the
device once per batch and bound with IO binding (every member reads the same device copy) and
outputs are written straight to host memory (`io_binding`, on by default); the fused graph may
use CUDA graphs, one per batch-size bucket, with inputs padded up to the bucket, captured at load
by the warm-up on each instance's own thread (`EnsembleRuntime.warm_up`).
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor, wait
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence, Union

import numpy as np
import onnxruntime as ort

from snapserve.proto.scores import (FUSED_REQUIRED_SCORES, SCORE_NAMES, SCORE_SPECS,
                                    EnsembleScores, complete_scores, ensemble_scores, softmax)
from snapserve.proto.spec import LOGITS, PROBABILITIES
from snapserve.proto.tensors import ONNX_TO_NUMPY
from snapserve.server.engine.adaptive import AdaptiveMembers, adaptive_scores
from snapserve.server.config import DEVICES, GRAPHS, PRECISIONS, RuntimeConfig
from snapserve.server.engine.cores import PLAN_MARGIN, clearly_better
from snapserve.server.errors import (ConfigError, FusedOutputsMismatch, GraphMismatch,
                                     InferenceError, InvalidGraph, ModelLoadError)
from snapserve.server.observability.threads import name_os_thread

__all__ = ["DEVICES", "GRAPHS", "PRECISIONS", "EnsembleRuntime", "GraphBytes", "GraphTiming", "RuntimeConfig",
           "agreement_tolerance", "check_score_outputs", "choose_graph", "compute_clock",
           "cuda_provider_options", "execution_providers", "fastest_in_turn", "session_options",
           "times_in_turn", "warm_up_batch_sizes"]

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
FUSED, MEMBERS = "fused", "members"

# cuDNN picks each convolution's algorithm on the first run of a shape. EXHAUSTIVE times every
# candidate there, which a live batch pays for whenever its size is one the warm-up did not run
# (dynamic batching forms every size from 1 to max_batch_size); HEURISTIC asks cuDNN's
# heuristics, with no timed runs, and usually gets the fastest or close to it. So no request
# waits on a search, whatever size its batch has.
CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"

# How far the fused graph's probabilities may be from the members' before `choose_graph`
# refuses it, by (provider, precision). A stale or foreign fused graph (other weights) differs
# by far more than any of these. CPU kernels are the same code on the same data in both
# graphs: only the order of float sums differs. On CUDA, cuDNN's and cuBLAS's algorithm choice
# (per graph and per batch shape) and TF32 change the low bits. FP16 is the export's own check
# (trainer/fuse.py FP16_TOLERANCE).
_TOLERANCE = {(CPU, "fp32"): 1e-4, (CUDA, "fp32"): 5e-3, (CPU, "fp16"): 1e-2, (CUDA, "fp16"): 1e-2}

# ONNX Runtime runs a CUDA graph id normally first (to allocate its memory), then captures it;
# recent versions repeat the run inside the first call, older ones need more calls. Three
# calls capture in both, and a captured graph's extra calls are plain replays.
_CAPTURE_RUNS = 3


def cuda_provider_options(config: RuntimeConfig) -> dict[str, object]:
    """What the CUDA provider is given besides ONNX Runtime's defaults."""
    return {"device_id": config.device_id, "cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH}


def agreement_tolerance(provider: str, precision: str) -> float:
    """The largest difference in probabilities between the fused graph and the members that
    still counts as the same ensemble, where they run on `provider` at `precision`."""
    return _TOLERANCE[(CUDA if provider == CUDA else CPU, precision)]


def warm_up_batch_sizes(max_batch_size: int, cuda_graph_buckets: Sequence[int] = (),
                        provider: str = CUDA) -> tuple[int, ...]:
    """The batch sizes the load-time warm-up runs on every instance: 1 (a lone request, the
    first and most frequent batch at low load); on CUDA also each captured CUDA-graph bucket up
    to max_batch_size (the only shapes that path runs) and max_batch_size (a full queue; the
    largest shape also grows the device memory pools to their working size once, at load). The
    sizes in between run on memory already there and, with HEURISTIC algorithm choice, search
    nothing. On the CPU there is no algorithm search or capture to move out of live traffic,
    and a full batch of a heavy model would cost the load as much as its largest request."""
    if provider != CUDA:
        return (1,)
    return tuple(sorted({1, max_batch_size, *(b for b in cuda_graph_buckets if b <= max_batch_size)}))


def execution_providers(config: RuntimeConfig,
                        cuda_options: dict[str, object] | None = None,
                        ) -> list[str | tuple[str, dict[str, object]]]:
    """The provider list for a session, CPU always last as the fallback ONNX Runtime expects."""
    available = ort.get_available_providers()
    if config.device == "cuda" and CUDA not in available:
        raise ConfigError(f"device is 'cuda' but this onnxruntime build has no {CUDA} "
                          f"(available: {', '.join(available)}); install onnxruntime-gpu or use "
                          "device 'auto' or 'cpu'")
    if config.device != "cpu" and CUDA in available:
        _preload_cuda_libraries()
        return [(CUDA, {**cuda_provider_options(config), **(cuda_options or {})}), CPU]
    return [CPU]


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels, where they are installed, before
    the first CUDA session: without it ORT finds them only on LD_LIBRARY_PATH (or after torch was
    imported), and a session it cannot place on CUDA quietly runs on the CPU. Once per process."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 (libraries found elsewhere still work; the check above says)
        logger.warning("could not preload the CUDA libraries from the nvidia-* wheels: %s", exc)


def session_options(config: RuntimeConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1  # sequential execution uses no inter-op pool
    options.enable_cpu_mem_arena = True
    # Idle pool threads sleep instead of spinning: a spinning thread holds a core the event
    # loop, the gRPC threads and the other instances need, which costs more than the wake-up.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's own warnings would drown our log
    return options


@dataclass(frozen=True)
class GraphBytes:
    """A graph as the bytes that were checked against its manifest, with its external-data
    files' bytes by the `location` the graph names them: loaded from memory, so nothing is
    re-opened between the check and the load."""

    name: str  # the file's name, for messages
    data: bytes
    external: Mapping[str, bytes] = field(default_factory=dict)


GraphSource = Union[Path, GraphBytes]


@functools.lru_cache(maxsize=1)
def _no_external_files() -> str:
    """An empty folder: where ONNX Runtime is told to look for external data of a graph loaded
    from memory. Otherwise it resolves such files against the working directory, so a graph
    naming files the manifest does not list would read whatever lies there."""
    return tempfile.mkdtemp(prefix="snapserve-no-external-data-")


def _load(source: GraphSource, config: RuntimeConfig,
          cuda_options: dict[str, object] | None = None) -> ort.InferenceSession:
    options = session_options(config)
    model: str | bytes = str(source)
    if isinstance(source, GraphBytes):
        model = source.data
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         _no_external_files())
        if source.external:
            names = list(source.external)
            buffers = [np.frombuffer(source.external[n], dtype=np.uint8) for n in names]
            options.add_external_initializers_from_files_in_memory(
                names, buffers, [len(b) for b in buffers])
    try:
        return ort.InferenceSession(model, sess_options=options,
                                    providers=execution_providers(config, cuda_options))
    except Exception as exc:  # ORT raises its own unnamed exception types
        raise InvalidGraph(f"{source.name}: ONNX Runtime cannot load it: {exc}") from exc


def input_mismatch(session: ort.InferenceSession, input_name: str, dtype: np.dtype,
                   shape: Sequence[int]) -> str | None:
    """Why the graph's declared input differs from the manifest's (dtype; rank; a size the
    graph fixes, the batch included), or None. Symbolic sizes ("batch") fit anything."""
    declared = next((i for i in session.get_inputs() if i.name == input_name), None)
    if declared is None:
        return f"it has no input {input_name!r}"
    expected = f"the manifest declares {dtype} {list(shape)}"
    if ONNX_TO_NUMPY.get(declared.type) != dtype:
        return f"its input {input_name!r} is {declared.type}; {expected}"
    if len(declared.shape) != len(shape):
        return f"its input {input_name!r} has shape {declared.shape}; {expected}"
    for axis, (got, want) in enumerate(zip(declared.shape, shape)):
        if isinstance(got, int) and got != want:
            what = "a fixed batch size" if axis == 0 else f"size {got} on axis {axis}"
            return f"its input {input_name!r} has shape {declared.shape} ({what}); {expected}"
    return None


def _input_names(session: ort.InferenceSession) -> list[str]:
    return [i.name for i in session.get_inputs()]


class ScoresGraph(Protocol):
    """One way to compute a batch's scores; `run_members` gives the [B, M, C] probabilities."""

    name: str
    members: int
    provider: str
    precision: str  # fp32 or fp16: what the graph's members compute in
    named_sessions: list[tuple[str, ort.InferenceSession]]  # (file name, session)
    run_options: ort.RunOptions  # passed to every run; its terminate flag stops them

    def scores(self, x: np.ndarray) -> EnsembleScores: ...

    def run_members(self, x: np.ndarray) -> np.ndarray: ...


def as_probabilities(outputs: np.ndarray, output_kind: str) -> np.ndarray:
    """Members' outputs (float32, classes last) -> probabilities: softmax of logits; rows a
    graph's own softmax gave (`output_kind` probabilities) as they are, not softmaxed again,
    only rescaled to sum to one (float32 rounding)."""
    if output_kind == PROBABILITIES:
        return outputs / np.sum(outputs, axis=-1, keepdims=True)
    return softmax(outputs, axis=-1)


class MemberGraph:
    """One session per member, then the numpy scores. `spread(n)` runs a batch's members on n
    threads at once."""

    name = MEMBERS
    precision = "fp32"

    def __init__(self, paths: Sequence[GraphSource], input_name: str, output_name: str,
                 temperature: float, config: RuntimeConfig, output_kind: str = LOGITS,
                 served: Sequence[int] | None = None) -> None:
        self.input_name, self.output_name, self.temperature = input_name, output_name, temperature
        self.output_kind = output_kind
        self._sessions = [_load(path, config) for path in paths]
        for path, session in zip(paths, self._sessions):
            inputs, outputs = _input_names(session), [o.name for o in session.get_outputs()]
            if inputs != [input_name]:
                raise ModelLoadError(f"{path.name}: graph inputs are {inputs}; the manifest expects "
                                     f"exactly [{input_name!r}]")
            if output_name not in outputs:
                raise ModelLoadError(f"{path.name}: graph outputs are {outputs}; the manifest "
                                     f"expects {output_name!r}")
        # A member selection with repeats runs each member once and gathers its probabilities
        # into the listed order, so the scores are those of the listed multiset.
        identity = served is None or list(served) == list(range(len(paths)))
        self.served = None if identity else np.asarray(served, dtype=np.intp)
        self.members = len(self._sessions) if self.served is None else len(self.served)
        self.named_sessions = [(path.name, s) for path, s in zip(paths, self._sessions)]
        self.provider: str = self._sessions[0].get_providers()[0]
        self._device_id = config.device_id
        self.io_binding = self.provider == CUDA and config.io_binding
        self.run_options = ort.RunOptions()  # terminate() sets its flag: runs stop between nodes
        # The members in groups, each run on a thread of its own (spread): one group, on the
        # calling thread, unless spread.
        self._groups: list[list[int]] = [list(range(len(self._sessions)))]
        self._helpers: ThreadPoolExecutor | None = None

    @property
    def spread_threads(self) -> int:
        """The threads a batch's members run on at once (1: one after another)."""
        return len(self._groups)

    def spread(self, threads: int) -> int:
        """Run each batch's members on `threads` threads at once (at most one per member), in
        contiguous groups: the first on the calling thread, each other on a helper thread of
        this graph's own. ONNX Runtime drops the GIL while a session runs, so the groups compute
        in parallel and a lone example costs about its largest group, not every member (the
        members-spread lead, engine/cores.py). The threads it spreads over."""
        threads = max(1, min(threads, len(self._sessions)))
        self.close()
        self._groups = [group.tolist() for group in
                        np.array_split(np.arange(len(self._sessions)), threads)]
        if threads > 1:
            self._helpers = ThreadPoolExecutor(threads - 1, thread_name_prefix="members",
                                               initializer=name_os_thread, initargs=("members",))
        return threads

    def group_runs(self, x: np.ndarray) -> list[Callable[[np.ndarray], object]]:
        """A run of each group on `x`, on the calling thread: what a group costs on a thread of
        its own, to be timed (`fastest_in_turn`)."""
        feed = {self.input_name: x}
        return [functools.partial(self._run_group, group, feed) for group in self._groups]

    def close(self) -> None:
        """Stop the helper threads (a spread graph's)."""
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)
            self._helpers = None

    def _run_group(self, group: Sequence[int], feed: dict[str, np.ndarray],
                   *_: object) -> list[np.ndarray]:
        return [self._sessions[i].run([self.output_name], feed, self.run_options)[0]
                for i in group]

    def _logits_cpu(self, x: np.ndarray) -> list[np.ndarray]:
        feed = {self.input_name: x}
        if self._helpers is None:
            return self._run_group(self._groups[0], feed)
        others = [self._helpers.submit(self._run_group, group, feed) for group in self._groups[1:]]
        try:
            logits = self._run_group(self._groups[0], feed)
        finally:
            wait(others)  # no run of this batch outlives it, whatever failed
        for other in others:
            logits += other.result()  # a helper's failure raises here
        return logits

    def _logits_cuda(self, x: np.ndarray) -> list[np.ndarray]:
        # One host->device copy per batch, shared by every member (IO binding), instead of one
        # per member; logits land in host memory, where the scores are computed.
        device_x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", self._device_id)
        logits = []
        for session in self._sessions:
            binding = session.io_binding()
            binding.bind_ortvalue_input(self.input_name, device_x)
            binding.bind_output(self.output_name, "cpu")
            session.run_with_iobinding(binding, self.run_options)
            logits.append(binding.copy_outputs_to_cpu()[0])
        return logits

    def run_members(self, x: np.ndarray) -> np.ndarray:
        """[B, ...] model input -> [B, M, C] float32: each member's probabilities."""
        try:
            logits = self._logits_cuda(x) if self.io_binding else self._logits_cpu(x)
        except Exception as exc:  # ORT's exception types are not public API
            raise InferenceError(f"ONNX Runtime failed: {exc}") from exc
        shapes = {tuple(l.shape) for l in logits}
        if len(shapes) != 1 or len(logits[0].shape) != 2 or logits[0].shape[0] != x.shape[0]:
            raise InferenceError(f"members returned logits of shapes {sorted(shapes)} for a batch "
                                 f"of {x.shape[0]}; expected [batch, classes] from every member")
        probs = as_probabilities(np.stack(logits, axis=1).astype(np.float32, copy=False), self.output_kind)
        return probs if self.served is None else probs[:, self.served]

    def scores(self, x: np.ndarray) -> EnsembleScores:
        return ensemble_scores(self.run_members(x), self.temperature)

    def run_member(self, index: int, x: np.ndarray) -> np.ndarray:
        """[B, ...] model input -> [B, C] float32: member `index`'s probabilities alone, for
        adaptive evaluation (engine/adaptive.py), which runs a member on the rows still open."""
        try:
            logits = self._sessions[index].run([self.output_name], {self.input_name: x},
                                               self.run_options)[0]
        except Exception as exc:  # ORT's exception types are not public API
            raise InferenceError(f"ONNX Runtime failed: {exc}") from exc
        if len(logits.shape) != 2 or logits.shape[0] != x.shape[0]:
            raise InferenceError(f"member {index} returned logits of shape {list(logits.shape)} "
                                 f"for a batch of {x.shape[0]}; expected [batch, classes]")
        return as_probabilities(logits.astype(np.float32, copy=False), self.output_kind)


def check_score_outputs(path: GraphSource, outputs: Sequence[str]) -> tuple[str, ...]:
    """The fused graph's scores, in the table's order; FusedOutputsMismatch unless its outputs
    are scores this server knows and include FUSED_REQUIRED_SCORES. A graph exported before a
    score existed lacks it (the server computes it from the member probabilities); an output
    that is no known score means a graph built for other scores, which would be misread."""
    missing = [n for n in SCORE_NAMES if n not in outputs]
    unexpected = [n for n in outputs if n not in SCORE_NAMES]
    if unexpected:
        raise FusedOutputsMismatch(
            f"{path.name}: its outputs do not match the score names this server computes: "
            f"missing {missing}, unexpected {unexpected} (expected a subset of "
            f"{list(SCORE_NAMES)}); export the version again, or serve it with --graph members")
    if absent := [n for n in FUSED_REQUIRED_SCORES if n not in outputs]:
        raise FusedOutputsMismatch(
            f"{path.name}: its outputs lack {absent}, which every fused graph must have (the "
            "other scores are computed from them); export the version again, or serve it with "
            "--graph members")
    if predates := [n for n in missing if SCORE_SPECS[n].fused]:
        logger.info("%s: computing %s from its member probabilities (the graph predates them)",
                    path.name, predates)
    return tuple(n for n in SCORE_NAMES if n in outputs)


class FusedGraph:
    """The version's ensemble.onnx: one run gives every score it has; `complete_scores` adds
    those it predates from its member probabilities."""

    name = FUSED

    def __init__(self, path: GraphSource, input_name: str, temperature_input: str, temperature: float,
                 members: int, config: RuntimeConfig, precision: str = "fp32") -> None:
        self.input_name, self.members, self.precision = input_name, members, precision
        self._temperature_input = temperature_input
        self._temperature = np.array(temperature, dtype=np.float32)
        self._session = _load(path, config)
        inputs = _input_names(self._session)
        overridable = [i.name for i in self._session.get_overridable_initializers()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [input_name] or temperature_input not in inputs + overridable:
            raise ModelLoadError(f"{path.name}: graph inputs are {inputs} (+ defaults {overridable}); "
                                 f"expected [{input_name!r}] and {temperature_input!r}")
        self._outputs = check_score_outputs(path, outputs)
        self.provider: str = self._session.get_providers()[0]
        self.named_sessions = [(path.name, self._session)]
        self._device_id = config.device_id
        self.io_binding = self.provider == CUDA and config.io_binding
        self.run_options = ort.RunOptions()  # terminate() sets its flag: runs stop between nodes
        self._file = path.name
        self._cuda_graphs: _CudaGraphs | None = None
        # What GetModel says about CUDA graphs: the captured sizes, or off and why.
        self.cuda_graphs = "off: cuda_graph_batch_sizes is empty"
        if config.cuda_graph_batch_sizes and self.provider != CUDA:
            self.cuda_graphs = f"off: they need the CUDA provider, this graph runs on {self.provider}"
        elif config.cuda_graph_batch_sizes:
            try:
                self._cuda_graphs = _CudaGraphs(path, input_name, temperature_input,
                                                self._temperature, config)
                self.cuda_graphs = "not captured yet (the load-time warm-up captures them)"
            except Exception as exc:  # capture needs every node on CUDA; the plain path works
                self._without_cuda_graphs(f"the session refuses them: {exc}")

    @property
    def cuda_graph_buckets(self) -> tuple[int, ...]:
        """The batch sizes with a CUDA graph (empty when they are off)."""
        return self._cuda_graphs.buckets if self._cuda_graphs is not None else ()

    def _without_cuda_graphs(self, why: str) -> None:
        logger.warning("%s: no CUDA graphs (%s); running without them", self._file, why)
        self._cuda_graphs = None
        self.cuda_graphs = f"off: {why}"

    def capture_cuda_graphs(self) -> None:
        """Capture every bucket's CUDA graph on the calling thread, or fall back to the plain
        session, logged with the reason. ONNX Runtime keeps a captured graph in the thread that
        captured it, so this runs on the thread that will serve the batches (and a thread that
        did not capture runs the plain session: live traffic never captures)."""
        if self._cuda_graphs is None or self._cuda_graphs.captured_here():
            return
        try:
            self._cuda_graphs.capture()
        except Exception as exc:  # ORT's exception types are not public API
            self._without_cuda_graphs(f"capture failed: {exc}")
            return
        self.cuda_graphs = "batch sizes " + ",".join(map(str, self._cuda_graphs.buckets))

    def _outputs_cuda(self, x: np.ndarray) -> list[np.ndarray]:
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(x), "cuda", self._device_id))
        binding.bind_cpu_input(self._temperature_input, self._temperature)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding, self.run_options)
        return binding.copy_outputs_to_cpu()

    def scores(self, x: np.ndarray) -> EnsembleScores:
        try:
            graphs = self._cuda_graphs
            if graphs is not None and len(x) <= graphs.largest and graphs.captured_here():
                outputs = graphs.run(x, self._outputs)
            elif self.io_binding:
                outputs = self._outputs_cuda(x)
            else:
                outputs = self._session.run(self._outputs, {self.input_name: x,
                                                            self._temperature_input: self._temperature},
                                            self.run_options)
        except Exception as exc:  # ORT's exception types are not public API
            raise InferenceError(f"ONNX Runtime failed on the fused graph: {exc}") from exc
        known = dict(zip(self._outputs, outputs))
        probs = known["member_probabilities"]
        if probs.shape[0] != len(x):
            raise InferenceError(f"the fused graph returned {probs.shape[0]} rows for a batch "
                                 f"of {len(x)}")
        return complete_scores(probs, known, float(self._temperature))

    def run_members(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x).member_probabilities


class _CudaGraphs:
    """The fused graph captured as CUDA graphs, one per batch-size bucket (`gpu_graph_id`).

    A captured graph replays fixed device addresses, so each bucket owns its input and output
    buffers, bound once; a batch is padded up to its bucket, copied into the bucket's input
    (`update_inplace`), replayed, and its rows cut from the outputs. `capture` runs every
    bucket on the calling thread: ONNX Runtime keeps captured graphs per thread. Not run in
    this project's CI (no GPU); if ONNX Runtime refuses capture (a node it cannot place on
    CUDA), the session fails to load or the capture raises, and the plain CUDA path is used.
    """

    def __init__(self, path: GraphSource, input_name: str, temperature_input: str,
                 temperature: np.ndarray, config: RuntimeConfig) -> None:
        self.buckets = config.cuda_graph_batch_sizes
        self.largest = self.buckets[-1]
        session = _load(path, config, {"enable_cuda_graph": "1"})
        device, device_id = "cuda", config.device_id
        meta = session.get_inputs()[0]
        shape, dtype = meta.shape[1:], ONNX_TO_NUMPY[meta.type].type
        outputs = session.get_outputs()
        self._session = session
        self._bindings, self._inputs, self._outputs = [], [], []
        self._temperature = ort.OrtValue.ortvalue_from_numpy(temperature, device, device_id)
        for bucket in self.buckets:
            x = ort.OrtValue.ortvalue_from_shape_and_type([bucket, *shape], dtype, device, device_id)
            outs = [ort.OrtValue.ortvalue_from_shape_and_type(
                        [bucket, *o.shape[1:]], ONNX_TO_NUMPY[o.type].type, device, device_id)
                    for o in outputs]
            binding = session.io_binding()
            binding.bind_ortvalue_input(input_name, x)
            binding.bind_ortvalue_input(temperature_input, self._temperature)
            for meta_out, value in zip(outputs, outs):
                binding.bind_ortvalue_output(meta_out.name, value)
            self._bindings.append(binding)
            self._inputs.append(x)
            self._outputs.append(dict(zip([o.name for o in outputs], outs)))
        self._captured_threads: set[int] = set()

    def captured_here(self) -> bool:
        return threading.get_ident() in self._captured_threads

    def capture(self) -> None:
        """Run every bucket on this thread until ONNX Runtime has captured its graph."""
        for index in range(len(self.buckets)):
            for _ in range(_CAPTURE_RUNS):
                self._replay(index)
        self._captured_threads.add(threading.get_ident())
        logger.info("CUDA graphs for batch sizes %s", list(self.buckets))

    def _replay(self, index: int) -> None:
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(index + 1))  # -1 would mean no capture
        self._session.run_with_iobinding(self._bindings[index], options)

    def run(self, x: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """The outputs `names` for the batch x (at most the largest bucket's rows)."""
        rows = len(x)
        index = next(i for i, b in enumerate(self.buckets) if b >= rows)
        bucket = self.buckets[index]
        if rows < bucket:
            x = np.concatenate([x, np.zeros((bucket - rows, *x.shape[1:]), dtype=x.dtype)])
        self._inputs[index].update_inplace(np.ascontiguousarray(x))
        self._replay(index)
        return [self._outputs[index][name].numpy()[:rows] for name in names]


class EnsembleRuntime:
    """One instance of a model version: the graph its batches run on (`graph`: fused or members).

    Built with both graphs when the version has a fused one and the choice is still open;
    `keep(name)` drops the other. `run` gives member probabilities, `scores` every score.
    """

    def __init__(self, member_paths: Sequence[GraphSource], input_name: str, output_name: str,
                 config: RuntimeConfig = RuntimeConfig(), *, temperature: float = 1.0,
                 fused_path: GraphSource | None = None, temperature_input: str = "temperature",
                 graphs: Sequence[str] = (MEMBERS,), fused_precision: str = "fp32",
                 adaptive: AdaptiveMembers | None = None, output_kind: str = LOGITS,
                 served: Sequence[int] | None = None) -> None:
        if not member_paths:
            raise ModelLoadError("an ensemble needs at least one member")
        # Adaptive evaluation runs member by member: on the members graph only (models/loading.py).
        self.adaptive = adaptive
        self.input_name, self.output_name = input_name, output_name
        self.graphs: dict[str, ScoresGraph] = {}
        if FUSED in graphs and fused_path is not None:
            self.graphs[FUSED] = FusedGraph(fused_path, input_name, temperature_input, temperature,
                                            len(served or member_paths), config, fused_precision)
        if MEMBERS in graphs or not self.graphs:
            self.graphs[MEMBERS] = MemberGraph(member_paths, input_name, output_name, temperature,
                                               config, output_kind, served)
        first = next(iter(self.graphs.values()))
        self.graph: str = first.name
        self._cuda_graphs_asked = bool(config.cuda_graph_batch_sizes)
        self.warmed_batch_sizes: tuple[int, ...] = ()  # what `warm_up` ran, for GetModel
        self.members: int = len(served or member_paths)  # the served list's length, repeats included
        # ORT falls back to CPU quietly when the CUDA libraries fail to load: report what it did,
        # for every session (each member, each graph), not the first one only.
        self.provider: str = first.provider
        placed = {name: session.get_providers()[0]
                  for graph in self.graphs.values() for name, session in graph.named_sessions}
        if config.device == "cuda" and (off := sorted(n for n, p in placed.items() if p != CUDA)):
            raise ModelLoadError(f"device is 'cuda' but ONNX Runtime placed {', '.join(off)} on "
                                 f"{placed[off[0]]} (CUDA libraries missing?)")
        if len(set(placed.values())) > 1:
            self.provider = "mixed: " + ", ".join(f"{n} on {p}" for n, p in sorted(placed.items()))

    def check_input(self, dtype: np.dtype, shape: Sequence[int]) -> None:
        """GraphMismatch unless every graph declares the manifest's input (dtype, rank, sizes):
        a version that cannot take its declared input is refused at load, not at a request."""
        for graph in self.graphs.values():
            for file, session in graph.named_sessions:
                if (why := input_mismatch(session, self.input_name, dtype, shape)) is not None:
                    raise GraphMismatch(f"{file}: {why}")

    @property
    def precision(self) -> str:
        """What the graph in use computes in: fp16 only for the FP16 fused graph."""
        return self.graphs[self.graph].precision

    def warm_up_batch_sizes(self, max_batch_size: int) -> tuple[int, ...]:
        """What `warm_up` should run on each instance (`warm_up_batch_sizes`)."""
        fused = self.graphs.get(FUSED)
        buckets = fused.cuda_graph_buckets if isinstance(fused, FusedGraph) else ()
        return warm_up_batch_sizes(max_batch_size, buckets, self.provider)

    def warm_up(self, example: np.ndarray, batch_sizes: Sequence[int]) -> None:
        """Capture the CUDA graphs, then run each batch size once, on the calling thread: what
        the first runs of a shape cost (kernel loading, cuDNN's algorithm choice, the memory
        arenas' growth) is paid here, at load, not by live requests. Run on the thread that
        will serve this instance's batches, since ONNX Runtime keeps CUDA graphs per thread.
        `example`: one example, [1, ...]."""
        for graph in self.graphs.values():
            if isinstance(graph, FusedGraph):
                graph.capture_cuda_graphs()
        for size in batch_sizes:
            try:
                self.scores(np.ascontiguousarray(np.repeat(example, size, axis=0)))
            except InferenceError as exc:  # a model that refuses large batches still serves small
                logger.warning("warm-up at batch %d failed (%s): that size's first live batch "
                               "pays its first-run cost", size, exc)
                continue
            self.warmed_batch_sizes = tuple(sorted({*self.warmed_batch_sizes, size}))

    def options_in_effect(self) -> dict[str, str]:
        """The CUDA-related options as they apply to the graph in use, for GetModel and
        ModelConfig: precision, CUDA graphs (the captured sizes, or off and why), IO binding
        and cuDNN's algorithm search (not applicable off CUDA), the warm-up's batch sizes."""
        graph = self.graphs[self.graph]
        on_cuda = graph.provider == CUDA
        not_cuda = f"not applicable: runs on {graph.provider}"
        if isinstance(graph, FusedGraph):
            cuda_graphs = graph.cuda_graphs
        elif self._cuda_graphs_asked:
            cuda_graphs = "off: CUDA graphs capture the fused graph only; the members serve"
        else:
            cuda_graphs = "off: cuda_graph_batch_sizes is empty"
        return {"precision": graph.precision,
                "cuda_graphs": cuda_graphs,
                "io_binding": ("on" if graph.io_binding else "off: io_binding is false") if on_cuda
                else not_cuda,
                "cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH if on_cuda else not_cuda,
                "warm_up_batch_sizes": ",".join(map(str, self.warmed_batch_sizes)) or "none",
                "adaptive_members": self.adaptive.describe() if self.adaptive is not None
                else "off: every member runs"}

    def keep(self, name: str) -> None:
        """Serve with `name` from now on and release the other graph's sessions."""
        for other, graph in self.graphs.items():
            if other != name and isinstance(graph, MemberGraph):
                graph.close()
        self.graphs = {name: self.graphs[name]}
        self.graph = name

    def spread_members(self, threads: int) -> int:
        """Serve with the members graph, each batch's members spread over `threads` threads
        (MemberGraph.spread); the threads it spreads over (1: a single member)."""
        graph = self.graphs.get(MEMBERS)
        if not isinstance(graph, MemberGraph):
            raise ValueError("spreading needs the members graph")
        self.keep(MEMBERS)
        return graph.spread(threads)

    @property
    def spread_threads(self) -> int:
        """The threads a batch's members run on at once (1: one after another, or fused)."""
        graph = self.graphs[self.graph]
        return graph.spread_threads if isinstance(graph, MemberGraph) else 1

    def close(self) -> None:
        """Stop this runtime's own helper threads (a spread members graph's)."""
        for graph in self.graphs.values():
            if isinstance(graph, MemberGraph):
                graph.close()

    def run(self, x: np.ndarray) -> np.ndarray:
        """[B, ...] model input -> [B, M, C] float32: each member's softmax(logits)."""
        return self.graphs[self.graph].run_members(x)

    def scores(self, x: np.ndarray) -> EnsembleScores:
        """Every score of the batch x, from the graph in use (member by member when adaptive)."""
        graph = self.graphs[self.graph]
        if self.adaptive is not None and isinstance(graph, MemberGraph):
            return adaptive_scores(graph, x, self.adaptive)
        return graph.scores(x)

    def terminate(self) -> None:
        """Stop the runs in progress (ONNX Runtime checks the flag between nodes) and every later
        one: for a server whose grace period is over, so no thread outlives it by a whole batch."""
        for graph in self.graphs.values():
            graph.run_options.terminate = True


@dataclass(frozen=True)
class GraphTiming:
    """Seconds per batch of each graph (the fastest of runs taken in turn), by batch size, as
    measured at load."""

    batch_sizes: tuple[int, ...]
    seconds: dict[str, tuple[float, ...]]  # empty when the graphs disagreed (see why)
    why: str = ""  # the choice's reason, as logged and reported (GetModel's graph_choice)

    def total(self, graph: str) -> float:
        # Per example, summed over the sizes: each size counts, small ones are not drowned out.
        return sum(t / b for t, b in zip(self.seconds[graph], self.batch_sizes))

    def describe(self) -> str:
        if not self.seconds:
            return "not timed: " + self.why
        return ", ".join(f"{g} " + "/".join(f"{1e3 * t:.2f}" for t in times) + " ms"
                         for g, times in self.seconds.items()) + \
            f" at batch {'/'.join(map(str, self.batch_sizes))}"


def compute_clock(intra_op_threads: int, provider: str) -> Callable[[], float]:
    """The clock that times a session's own cost: the calling thread's CPU time when the
    session computes on that thread alone (one intra-op thread on the CPU), which other
    processes cannot lengthen, only delay; else the wall clock (worker threads' or the GPU's
    time is not the caller's)."""
    return time.thread_time if intra_op_threads == 1 and provider == CPU else time.perf_counter


def times_in_turn(fns: Sequence[Callable[[np.ndarray], object]], x: np.ndarray,
                  budget_s: float, min_rounds: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    """Every run's time by `clock`, [round, function]: the functions run on `x` in turn, round
    after round, for `budget_s` of wall time (at least `min_rounds` rounds), after a warm-up."""
    for fn in fns:
        fn(x)  # the first run of a shape allocates and plans: not counted
    rounds: list[list[float]] = []
    deadline = time.perf_counter() + budget_s
    while len(rounds) < min_rounds or time.perf_counter() < deadline:
        row = []
        for fn in fns:
            began = clock()
            fn(x)
            row.append(clock() - began)
        rounds.append(row)
    return np.array(rounds)


def fastest_in_turn(fns: Sequence[Callable[[np.ndarray], object]], x: np.ndarray,
                    budget_s: float, min_rounds: int = 3,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[float, ...]:
    """The fastest run of each function on `x` by `clock`, their runs taken in turn
    (`times_in_turn`). Other processes' work only ever adds time, so the fastest run is the
    least disturbed; taken in turn, a burst of it slows every function alike instead of
    landing on one and deciding a comparison between them."""
    return tuple(float(t) for t in times_in_turn(fns, x, budget_s, min_rounds, clock).min(axis=0))


def choose_graph(runtime: EnsembleRuntime, example: np.ndarray, max_batch_size: int,
                 budget_s: float = 0.2, tolerance: float | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 known: str | None = None) -> tuple[str, GraphTiming | None]:
    """Which graph to serve with: time both on a few batch sizes (`fastest_in_turn` by `clock`,
    `compute_clock` at load); the fused graph (one run computes every member and score) unless
    the members are faster per example by more than PLAN_MARGIN (engine/cores.py: a near-tie
    must not flip between starts). Refuses a fused graph whose probabilities differ from
    the members' by more than `tolerance` (default: `agreement_tolerance` for the provider
    and the fused graph's precision: a stale or broken file, not kernel rounding) with an
    error log. The timing's `why` says which and why. `example`: one example, [1, ...].
    `known`: the graph chosen before (a plan cache's): the agreement is checked as always,
    nothing is timed, and the timing is None unless the members serve for disagreeing."""
    if FUSED not in runtime.graphs or MEMBERS not in runtime.graphs:
        return runtime.graph, None
    fused_graph = runtime.graphs[FUSED]
    if tolerance is None:
        tolerance = agreement_tolerance(fused_graph.provider, fused_graph.precision)
    sizes = tuple(sorted({1, min(8, max_batch_size), max_batch_size}))
    rng = np.random.default_rng(0)
    seconds: dict[str, list[float]] = {FUSED: [], MEMBERS: []}
    largest_diff = 0.0
    for size in sizes:
        x = np.ascontiguousarray(np.repeat(example, size, axis=0))
        x = (x + rng.normal(0, 1, x.shape)).astype(example.dtype) if x.dtype.kind == "f" else x
        fused, members = fused_graph.scores(x), runtime.graphs[MEMBERS].scores(x)
        diff = float(np.max(np.abs(fused.member_probabilities - members.member_probabilities)))
        diff = max(diff, float(np.max(np.abs(fused.probabilities - members.probabilities))))
        if not diff <= tolerance:
            why = (f"members: the fused graph's probabilities differ from the members' by "
                   f"{diff:.3g} > tolerance {tolerance:.3g} at batch {size}")
            logger.error("the fused graph's probabilities differ from the members' by %.3g "
                         "(tolerance %.3g): serving the members", diff, tolerance)
            return MEMBERS, GraphTiming(sizes, {}, why)
        largest_diff = max(largest_diff, diff)
        if known is not None:
            continue
        fused_s, members_s = fastest_in_turn(
            (fused_graph.scores, runtime.graphs[MEMBERS].scores), x, budget_s, clock=clock)
        seconds[FUSED].append(fused_s)
        seconds[MEMBERS].append(members_s)
    if known is not None:
        return known, None
    timing = GraphTiming(sizes, {k: tuple(v) for k, v in seconds.items()})
    fused_total, members_total = timing.total(FUSED), timing.total(MEMBERS)
    chosen, other = ((MEMBERS, FUSED) if clearly_better(fused_total, members_total)
                     else (FUSED, MEMBERS))
    speedup = timing.total(other) / max(timing.total(chosen), 1e-12)
    why = (f"{chosen}: {speedup:.2f}x faster per example than {other}; the members serve only "
           f"when over {1 + PLAN_MARGIN:.2f}x faster "
           f"(agree within {largest_diff:.3g} <= tolerance {tolerance:.3g})")
    logger.info("graph auto: serving %s (%s)", chosen, why.split(": ", 1)[1])
    return chosen, GraphTiming(timing.batch_sizes, timing.seconds, why)
