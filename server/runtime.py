"""The ensemble runtime: one ONNX Runtime session per member, member probabilities out.

Knows no gRPC and no batching: `run(x)` takes a whole batch and is called from a worker thread
(ONNX Runtime releases the GIL while it computes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from server.errors import ConfigError, InferenceError, ModelLoadError
from server.scores import softmax

__all__ = ["DEVICES", "EnsembleRuntime", "RuntimeConfig", "execution_providers"]

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RuntimeConfig:
    # auto: CUDA when this onnxruntime build has it, else CPU; cuda: refuse to start without it.
    device: str = "auto"
    # Threads per member session for one run. Small by default: members run one after another,
    # several models may share the machine, and spinning threads steal cores from the event loop.
    # 0 lets ONNX Runtime pick (one per physical core).
    intra_op_threads: int = 1
    device_id: int = 0  # which GPU, with cuda

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not isinstance(self.intra_op_threads, int) or self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be an integer >= 0, got {self.intra_op_threads!r}")
        if not isinstance(self.device_id, int) or self.device_id < 0:
            raise ConfigError(f"device_id must be an integer >= 0, got {self.device_id!r}")


def execution_providers(config: RuntimeConfig) -> list[str | tuple[str, dict[str, object]]]:
    """The provider list for a session, CPU always last as the fallback ONNX Runtime expects."""
    available = ort.get_available_providers()
    if config.device == "cuda" and CUDA not in available:
        raise ConfigError(f"device is 'cuda' but this onnxruntime build has no {CUDA} "
                          f"(available: {', '.join(available)}); install onnxruntime-gpu or use "
                          "device 'auto' or 'cpu'")
    if config.device != "cpu" and CUDA in available:
        return [(CUDA, {"device_id": config.device_id}), CPU]
    return [CPU]


def session_options(config: RuntimeConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1  # sequential execution uses no inter-op pool
    options.log_severity_level = 3  # errors only: ORT's own warnings would drown our log
    return options


class EnsembleRuntime:
    """The members of one model version, loaded as ONNX Runtime sessions."""

    def __init__(self, member_paths: Sequence[Path], input_name: str, output_name: str,
                 config: RuntimeConfig = RuntimeConfig()) -> None:
        if not member_paths:
            raise ModelLoadError("an ensemble needs at least one member")
        self.input_name = input_name
        self.output_name = output_name
        providers = execution_providers(config)
        options = session_options(config)
        self._sessions: list[ort.InferenceSession] = []
        for path in member_paths:
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # ORT raises its own unnamed exception types
                raise ModelLoadError(f"{path.name}: ONNX Runtime cannot load it: {exc}") from exc
            self._check_names(session, path)
            self._sessions.append(session)
        # ORT falls back to CPU quietly when the CUDA libraries fail to load: report what it did.
        self.provider: str = self._sessions[0].get_providers()[0]
        if config.device == "cuda" and self.provider != CUDA:
            raise ModelLoadError(f"device is 'cuda' but ONNX Runtime placed the session on "
                                 f"{self.provider} (CUDA libraries missing?)")

    def _check_names(self, session: ort.InferenceSession, path: Path) -> None:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [self.input_name]:
            raise ModelLoadError(f"{path.name}: graph inputs are {inputs}; the manifest expects "
                                 f"exactly [{self.input_name!r}]")
        if self.output_name not in outputs:
            raise ModelLoadError(f"{path.name}: graph outputs are {outputs}; the manifest expects "
                                 f"{self.output_name!r}")

    @property
    def members(self) -> int:
        return len(self._sessions)

    def run(self, x: np.ndarray) -> np.ndarray:
        """[B, ...] model input -> [B, M, C] float32: each member's softmax(logits)."""
        feed = {self.input_name: x}
        try:
            logits = [session.run([self.output_name], feed)[0] for session in self._sessions]
        except Exception as exc:  # ORT's exception types are not public API
            raise InferenceError(f"ONNX Runtime failed: {exc}") from exc
        shapes = {tuple(l.shape) for l in logits}
        if len(shapes) != 1 or len(logits[0].shape) != 2 or logits[0].shape[0] != x.shape[0]:
            raise InferenceError(f"members returned logits of shapes {sorted(shapes)} for a batch "
                                 f"of {x.shape[0]}; expected [batch, classes] from every member")
        return softmax(np.stack(logits, axis=1).astype(np.float32, copy=False), axis=-1)
