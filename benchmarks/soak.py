"""Soak: mixed valid, invalid, cancelled and short-deadline requests at high concurrency against a
real `python -m snapserve.server` process, then SIGTERM under load. Nothing may be lost.

Every request is classified when it ends:
- answered: an answer whose probabilities equal a direct ONNX Runtime computation;
- refused: the status code its kind calls for (INVALID_ARGUMENT / NOT_FOUND for bad requests,
  RESOURCE_EXHAUSTED when the bounded queue is full, DEADLINE_EXCEEDED for a too-short deadline,
  UNAVAILABLE once shutdown began);
- cancelled: the client cancelled it (CANCELLED);
- lost: anything else (a wrong answer, an unexpected code, a broken stream). Must be 0.
The server's resident memory (VmRSS from /proc/<pid>/status) is read after a warm-up, during the
run, and at the end.

    python -m benchmarks.soak                     # 60 s; writes benchmarks/soak_results.json
    python -m benchmarks.soak --duration 10 --out -

Run from the repository root; builds a small model repository in a temporary folder (the test
fixtures' writer) unless --model-repository names one with a model `soak`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor, to_tensor

__all__ = ["FloodReport", "Reference", "ServerProcess", "ShutdownReport", "SoakReport",
           "SlowReport", "build_repository", "slow_args", "flood_holds", "run_shutdown", "run_slow_clients",
           "run_soak", "run_stream_flood", "slow_holds"]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "soak"
INPUT_SHAPE = (1, 8, 8)
CLASSES = 10
MAX_BATCH = 16
READY = re.compile(r"serving on 127\.0\.0\.1:(\d+)")
CLOSED = re.compile(r"(\S+):(\d+) closed: (\d+) items computed")
OK = "OK"


# -- the server under test ----------------------------------------------------------------------

class ServerProcess:
    """`python -m snapserve.server` on 127.0.0.1:0. Its stderr is drained by a thread (a full pipe would
    block the server's logging) and kept in `log`."""

    def __init__(self, repo: Path, *args: str, ready_timeout_s: float = 90) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapserve.server", "--model-repository", str(repo), "--port", "0",
             "--http-port", "0", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(ready_timeout_s) or not self.port:
            self.proc.kill()
            raise RuntimeError("server did not report ready:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if not self.port and (match := READY.search(line)):
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # exited before ready: wake the waiter

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        """Resident memory now, from /proc/<pid>/status (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def threads(self) -> int:
        """OS threads of the server now (ONNX Runtime's and gRPC's too), from /proc (Linux)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def computed(self) -> dict[str, int]:
        """Items each batcher computed, from its `closed` log line (after the server stopped)."""
        return {f"{m.group(1)}:{m.group(2)}": int(m.group(3))
                for line in self.log if (m := CLOSED.search(line))}

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60) -> int:
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_repository(root: Path, members: int = 4) -> Path:
    """A model `soak` ([-1, 1, 8, 8] -> 10 classes) written as the trainer writes a version."""
    from tests.support.models import random_members, write_model_version

    write_model_version(root, MODEL, random_members(members, int(np.prod(INPUT_SHAPE)), CLASSES,
                                                    seed=7), INPUT_SHAPE,
                        [f"class-{i}" for i in range(CLASSES)])
    return root


class Reference:
    """A pool of inputs and their probabilities computed directly with ONNX Runtime (float64)."""

    def __init__(self, version_dir: Path, pool: int = 64, seed: int = 0) -> None:
        from tests.support.models import reference_member_probs

        self.inputs = np.random.default_rng(seed).normal(size=(pool, *INPUT_SHAPE)).astype(np.float32)
        self.probabilities = reference_member_probs(version_dir, self.inputs).mean(axis=1)

    def sample(self, rng: random.Random, batch: int) -> tuple[np.ndarray, np.ndarray]:
        rows = [rng.randrange(len(self.inputs)) for _ in range(batch)]
        return self.inputs[rows], self.probabilities[rows]

    @staticmethod
    def matches(probabilities: np.ndarray, expected: np.ndarray) -> bool:
        return probabilities.shape == expected.shape and bool(
            np.allclose(probabilities, expected, rtol=1e-5, atol=1e-6))


# -- requests -------------------------------------------------------------------------------------

@dataclass
class Tally:
    sent: int = 0
    answered: int = 0     # correct answers
    refused: int = 0      # the right refusal code
    cancelled: int = 0    # cancelled by the client
    cut_off: int = 0      # shutdown only: CANCELLED by gRPC in transit, never computed
    lost: int = 0         # anything else: must stay 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    lost_examples: list[str] = field(default_factory=list)

    def record(self, kind: str, outcome: str, code: str, detail: str = "") -> None:
        self.sent += 1
        self.by_kind[kind] += 1
        self.codes[code] += 1
        if outcome == "lost":
            self.lost += 1
            if len(self.lost_examples) < 10:
                self.lost_examples.append(f"{kind}: {code}: {detail}"[:300])
        else:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["codes"], data["by_kind"] = dict(self.codes), dict(self.by_kind)
        return data


def _z(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


def _nan() -> np.ndarray:
    x = np.ones((2, *INPUT_SHAPE), np.float32)
    x[1, 0, 3, 3] = np.nan
    return x


INVALID_ARGUMENT, NOT_FOUND = "INVALID_ARGUMENT", "NOT_FOUND"
# (name, request, the code it must get)
BAD_NATIVE: list[tuple[str, pb.PredictRequest, str]] = [
    ("wrong rank", pb.PredictRequest(model=MODEL, input=to_tensor(_z(2, 64))), INVALID_ARGUMENT),
    ("wrong dtype", pb.PredictRequest(model=MODEL, input=to_tensor(_z(2, 1, 8, 8, dtype=np.int64))),
     INVALID_ARGUMENT),
    ("NaN", pb.PredictRequest(model=MODEL, input=to_tensor(_nan())), INVALID_ARGUMENT),
    ("empty batch", pb.PredictRequest(model=MODEL, input=to_tensor(_z(0, 1, 8, 8))), INVALID_ARGUMENT),
    ("batch too large", pb.PredictRequest(model=MODEL, input=to_tensor(_z(MAX_BATCH + 1, 1, 8, 8))),
     INVALID_ARGUMENT),
    ("byte length", pb.PredictRequest(model=MODEL, input=pb.Tensor(
        dtype=pb.FLOAT32, shape=[1, 1, 8, 8], data=b"\0" * 10)), INVALID_ARGUMENT),
    ("overflowing shape", pb.PredictRequest(model=MODEL, input=pb.Tensor(
        dtype=pb.FLOAT32, shape=[2**62, 2**62, 8, 8], data=b"")), INVALID_ARGUMENT),
    ("missing input", pb.PredictRequest(model=MODEL), INVALID_ARGUMENT),
    ("unknown model", pb.PredictRequest(model="nope", input=to_tensor(_z(1, 1, 8, 8))), NOT_FOUND),
    ("unknown version", pb.PredictRequest(model=MODEL, version=99, input=to_tensor(_z(1, 1, 8, 8))),
     NOT_FOUND),
]


def _infer_request(x: np.ndarray, outputs: Sequence[str] = ("probabilities",),
                   inputs: Sequence[str] = ("input",)) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=MODEL)
    for name in inputs:
        request.inputs.add(name=name, datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


BAD_KSERVE: list[tuple[str, kpb.ModelInferRequest, str]] = [
    ("duplicated output", _infer_request(_z(1, 1, 8, 8), ("probabilities", "probabilities")),
     INVALID_ARGUMENT),
    ("unknown output", _infer_request(_z(1, 1, 8, 8), ("logits",)), INVALID_ARGUMENT),
    ("two inputs", _infer_request(_z(1, 1, 8, 8), inputs=("input", "extra")), INVALID_ARGUMENT),
    ("NaN", _infer_request(_nan()), INVALID_ARGUMENT),
]

# How often each kind of request is sent.
MIX: dict[str, float] = {"valid": 0.45, "invalid": 0.12, "cancel": 0.1, "deadline": 0.05,
                         "stream": 0.1, "kserve": 0.1, "kserve_invalid": 0.08}
# Refusals a valid request may get: the queue was full (overload), the server is shutting down.
OVERLOAD_CODES = {"RESOURCE_EXHAUSTED"}


class Client:
    """One worker's view: stubs on a shared channel, the reference, and where results go."""

    def __init__(self, channel: grpc.aio.Channel, reference: Reference, tally: Tally,
                 rng: random.Random, valid_refusals: set[str]) -> None:
        self.native = pb_grpc.EnsembleServiceStub(channel)
        self.kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        self.reference = reference
        self.tally = tally
        self.rng = rng
        self.valid_refusals = valid_refusals
        self.retry_unavailable_s: float | None = None
        self.gone = False  # stopped calling this server

    def _valid(self) -> tuple[pb.PredictRequest, np.ndarray]:
        x, expected = self.reference.sample(self.rng, self.rng.randint(1, 4))
        return pb.PredictRequest(model=MODEL, input=to_tensor(x)), expected

    def _refusal(self, kind: str, exc: grpc.aio.AioRpcError, allowed: set[str]) -> None:
        code = exc.code().name
        outcome = "refused" if code in allowed else "lost"
        self.tally.record(kind, outcome, code, exc.details() or "")

    def _answer(self, kind: str, probabilities: np.ndarray, expected: np.ndarray) -> None:
        right = Reference.matches(probabilities, expected)
        self.tally.record(kind, "answered" if right else "lost", OK, "" if right else "wrong answer")

    async def valid(self) -> None:
        request, expected = self._valid()
        try:
            response = await self.native.Predict(request)
        except grpc.aio.AioRpcError as exc:
            self._refusal("valid", exc, self.valid_refusals)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the server is going away
                if self.retry_unavailable_s is None:
                    self.gone = True  # as a client behind a balancer: go to another instance
                else:
                    await asyncio.sleep(self.retry_unavailable_s)  # as a retry policy would
            return
        self._answer("valid", from_tensor(response.probabilities), expected)

    async def invalid(self) -> None:
        name, request, code = self.rng.choice(BAD_NATIVE)
        try:
            await self.native.Predict(request)
        except grpc.aio.AioRpcError as exc:
            return self._refusal("invalid", exc, {code} | self.valid_refusals - OVERLOAD_CODES)
        self.tally.record("invalid", "lost", OK, f"{name} was answered")

    async def cancel(self) -> None:
        request, expected = self._valid()
        call = self.native.Predict(request)
        await asyncio.sleep(self.rng.uniform(0, 0.003))
        call.cancel()
        try:
            response = await call
        except asyncio.CancelledError:
            return self.tally.record("cancel", "cancelled", "CANCELLED")
        except grpc.aio.AioRpcError as exc:  # refused before the cancel took effect
            return self._refusal("cancel", exc, self.valid_refusals | {"CANCELLED"})
        self._answer("cancel", from_tensor(response.probabilities), expected)

    async def deadline(self) -> None:
        request, expected = self._valid()
        try:
            response = await self.native.Predict(request, timeout=self.rng.uniform(0.0005, 0.004))
        except grpc.aio.AioRpcError as exc:
            return self._refusal("deadline", exc, self.valid_refusals | {"DEADLINE_EXCEEDED"})
        self._answer("deadline", from_tensor(response.probabilities), expected)

    async def stream(self) -> None:
        """Four requests on one PredictStream, one of them bad: errors come inline, in order."""
        items: list[tuple[pb.PredictRequest, np.ndarray | None, str]] = []
        for i in range(4):
            request, expected = self._valid()
            items.append((request, expected, OK))
        name, bad, code = self.rng.choice(BAD_NATIVE)
        items[self.rng.randrange(4)] = (bad, None, code)
        requests = []
        for i, (request, _, _) in enumerate(items):
            copy = pb.PredictRequest()
            copy.CopyFrom(request)
            copy.request_id = str(i)
            requests.append(copy)
        try:
            responses = [r async for r in self.native.PredictStream(iter(requests))]
        except grpc.aio.AioRpcError as exc:
            for _ in items:
                self._refusal("stream", exc, self.valid_refusals - OVERLOAD_CODES)
            return
        if [r.request_id for r in responses] != [str(i) for i in range(len(items))]:
            for _ in items:
                self.tally.record("stream", "lost", "BROKEN_STREAM", "answers out of order")
            return
        for response, (_, expected, code) in zip(responses, items):
            if response.HasField("error"):
                got = _code_name(response.error.code)
                allowed = {code} if expected is None else set(self.valid_refusals)
                self.tally.record("stream", "refused" if got in allowed else "lost", got,
                                  response.error.message)
            elif expected is None:
                self.tally.record("stream", "lost", OK, "bad request answered")
            else:
                self._answer("stream", from_tensor(response.probabilities), expected)

    async def kserve_valid(self) -> None:
        x, expected = self.reference.sample(self.rng, self.rng.randint(1, 4))
        try:
            response = await self.kserve.ModelInfer(_infer_request(np.ascontiguousarray(x)))
        except grpc.aio.AioRpcError as exc:
            return self._refusal("kserve", exc, self.valid_refusals)
        probabilities = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
            list(response.outputs[0].shape))
        self._answer("kserve", probabilities, expected)

    async def kserve_invalid(self) -> None:
        name, request, code = self.rng.choice(BAD_KSERVE)
        try:
            await self.kserve.ModelInfer(request)
        except grpc.aio.AioRpcError as exc:
            return self._refusal("kserve_invalid", exc, {code} | self.valid_refusals - OVERLOAD_CODES)
        self.tally.record("kserve_invalid", "lost", OK, f"{name} was answered")

    async def one(self, kind: str) -> None:
        await {"valid": self.valid, "invalid": self.invalid, "cancel": self.cancel,
               "deadline": self.deadline, "stream": self.stream, "kserve": self.kserve_valid,
               "kserve_invalid": self.kserve_invalid}[kind]()


def _code_name(value: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == value), f"code {value}")


# -- the soak ---------------------------------------------------------------------------------------

@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    tally: dict[str, Any]
    requests_per_s: float
    rss_start_mib: float  # after the warm-up
    rss_end_mib: float
    rss_peak_mib: float
    rss_samples_mib: list[float]
    threads_start: int = 0  # after the warm-up
    threads_end: int = 0
    threads_peak: int = 0

    @property
    def lost(self) -> int:
        return int(self.tally["lost"])


async def _workers(server: ServerProcess, reference: Reference, tally: Tally, concurrency: int,
                   until: Callable[[], bool], seed: int, kinds: dict[str, float],
                   valid_refusals: set[str], channels: int = 4,
                   retry_unavailable_s: float | None = None) -> None:
    chans = [grpc.aio.insecure_channel(server.target) for _ in range(channels)]
    names, weights = list(kinds), list(kinds.values())

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        client = Client(chans[i % channels], reference, tally, rng, valid_refusals)
        client.retry_unavailable_s = retry_unavailable_s
        while not until() and not client.gone:
            await client.one(rng.choices(names, weights)[0])

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for channel in chans:
            await channel.close()


async def _soak(server: ServerProcess, reference: Reference, duration_s: float, concurrency: int,
                seed: int) -> SoakReport:
    tally = Tally()
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration_s
    warm_up = start + min(max(duration_s * 0.2, 1.0), 10.0)
    samples: list[tuple[float, int]] = []
    threads: list[tuple[float, int]] = []

    async def sample_memory() -> None:
        while loop.time() < end:
            samples.append((loop.time(), server.rss_kib()))
            threads.append((loop.time(), server.threads()))
            await asyncio.sleep(0.5)

    sampler = asyncio.ensure_future(sample_memory())
    await _workers(server, reference, tally, concurrency, lambda: loop.time() >= end, seed, MIX,
                   OVERLOAD_CODES)
    await sampler
    rss_end, threads_end = server.rss_kib(), server.threads()
    threads_after = [n for t, n in threads if t >= warm_up] or [threads_end]
    after_warm_up = [kib for t, kib in samples if t >= warm_up] or [rss_end]
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return SoakReport(
        duration_s=round(loop.time() - start, 2), concurrency=concurrency, tally=tally.as_dict(),
        requests_per_s=round(tally.sent / (loop.time() - start), 1),
        rss_start_mib=mib(after_warm_up[0]), rss_end_mib=mib(rss_end),
        rss_peak_mib=mib(max(kib for _, kib in samples) if samples else rss_end),
        rss_samples_mib=[mib(kib) for _, kib in samples[::max(1, len(samples) // 20)]],
        threads_start=threads_after[0], threads_end=threads_end,
        threads_peak=max(threads_after + [threads_end]))


def run_soak(server: ServerProcess, reference: Reference, duration_s: float = 60,
             concurrency: int = 64, seed: int = 0) -> SoakReport:
    return asyncio.run(_soak(server, reference, duration_s, concurrency, seed))


# -- SIGTERM under load ------------------------------------------------------------------------------

@dataclass
class ShutdownReport:
    clients: str                   # what a client does on UNAVAILABLE: go elsewhere, or retry
    tally_before: dict[str, Any]   # ended before SIGTERM
    tally_after: dict[str, Any]    # ended after SIGTERM: answered or UNAVAILABLE, nothing lost
    exit_code: int
    computed: dict[str, int]       # items each batcher computed, from its closing log line
    health_after_sigterm: list[str]  # what a Health/Watch stream saw from SIGTERM on
    shutdown_s: float

    @property
    def lost(self) -> int:
        return int(self.tally_before["lost"]) + int(self.tally_after["lost"])

    @property
    def answered(self) -> int:
        return int(self.tally_before["answered"]) + int(self.tally_after["answered"])

    @property
    def computed_unanswered(self) -> int:
        """Requests the model computed whose answer never reached the client: must be 0."""
        return sum(self.computed.values()) - self.answered


async def _watch_health(target: str, seen: list[str], stop: asyncio.Event) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for answer in call:
                if stop.is_set():
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
        except grpc.aio.AioRpcError:
            pass  # the server went away: the stream ends


async def _shutdown(server: ServerProcess, reference: Reference, load_s: float, concurrency: int,
                    seed: int, retry_unavailable_s: float | None) -> ShutdownReport:
    loop = asyncio.get_running_loop()
    before, after = Tally(), Tally()
    signalled = asyncio.Event()
    health: list[str] = []
    watcher = asyncio.ensure_future(_watch_health(server.target, health, signalled))

    class Switch(Tally):  # records into `before` until SIGTERM, then into `after`
        def record(self, kind: str, outcome: str, code: str, detail: str = "") -> None:
            if not signalled.is_set():
                return before.record(kind, outcome, code, detail)
            if code == "CANCELLED":  # nobody cancels here: gRPC cut it off at its final stop
                outcome = "cut_off"
            after.record(kind, outcome, code, detail)

    async def terminate() -> float:
        await asyncio.sleep(load_s)
        signalled.set()  # from here on, results count as after SIGTERM
        server.signal(signal.SIGTERM)
        sent = loop.time()
        await loop.run_in_executor(None, server.wait, 120)
        return loop.time() - sent

    stopping = asyncio.ensure_future(terminate())
    # Only valid requests, unary and without deadlines or cancels: each one either reaches the
    # model (then its answer must arrive) or is refused (queue full, or shutting down); the
    # server's count says which.
    await _workers(server, reference, Switch(), concurrency, stopping.done, seed,
                   {"valid": 1.0}, OVERLOAD_CODES | {"UNAVAILABLE"},
                   retry_unavailable_s=retry_unavailable_s)
    shutdown_s = await stopping
    await asyncio.wait_for(watcher, 30)
    clients = ("go elsewhere on UNAVAILABLE" if retry_unavailable_s is None
               else f"retry every {retry_unavailable_s * 1000:.0f} ms on UNAVAILABLE")
    return ShutdownReport(clients, before.as_dict(), after.as_dict(), server.proc.returncode,
                          server.computed(), health, round(shutdown_s, 3))


def run_shutdown(server: ServerProcess, reference: Reference, load_s: float = 3.0,
                 concurrency: int = 64, seed: int = 1,
                 retry_unavailable_s: float | None = None) -> ShutdownReport:
    """SIGTERM after `load_s` of valid requests; clients go elsewhere on UNAVAILABLE (None) or
    retry after `retry_unavailable_s`."""
    return asyncio.run(_shutdown(server, reference, load_s, concurrency, seed,
                                 retry_unavailable_s))


# -- stream flood: streams that write and never read ----------------------------------------------

@dataclass
class FloodReport:
    streams: int
    duration_s: float
    sent: int                # messages the server took (each write completed)
    answered: int            # answers read back once the flood ended, errors included
    errors: dict[str, int]   # inline error answers by code (RESOURCE_EXHAUSTED when queues fill)
    rss_start_mib: float
    rss_peak_mib: float
    health_max_s: float      # slowest Health/Check during the flood
    predicts: int            # unary Predicts answered on another connection meanwhile
    predict_failures: list[str]

    @property
    def lost(self) -> int:
        """Messages taken whose answer never came: must be 0."""
        return self.sent - self.answered


async def _flood(server: ServerProcess, streams: int, duration_s: float,
                 batch: int) -> FloodReport:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    loop = asyncio.get_running_loop()
    x = np.zeros((batch, *INPUT_SHAPE), np.float32)
    request = pb.PredictRequest(model=MODEL, input=to_tensor(x))
    single = pb.PredictRequest(model=MODEL, input=to_tensor(x[:1]))
    stop = asyncio.Event()
    sent, answered, errors = [0], [0], collections.Counter[str]()
    rss, health_s, failures, predicts = [server.rss_kib()], [0.0], list[str](), [0]

    async def write(call: Any) -> None:
        while not stop.is_set():
            await call.write(request)
            sent[0] += 1
        await call.done_writing()

    async def read(call: Any) -> None:
        async for answer in call:
            answered[0] += 1
            if answer.HasField("error"):
                errors[_code_name(answer.error.code)] += 1

    async def probe(channel: grpc.aio.Channel) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        native = pb_grpc.EnsembleServiceStub(channel)
        while not stop.is_set():
            start = loop.time()
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            health_s[0] = max(health_s[0], loop.time() - start)
            try:
                await native.Predict(single, timeout=5)
                predicts[0] += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}"[:200])
            rss.append(server.rss_kib())
            await asyncio.sleep(0.2)

    start = loop.time()
    async with grpc.aio.insecure_channel(server.target) as channel, \
            grpc.aio.insecure_channel(server.target) as side:
        stub = pb_grpc.EnsembleServiceStub(channel)
        calls = [stub.PredictStream(timeout=duration_s + 60) for _ in range(streams)]
        writers = [asyncio.ensure_future(write(call)) for call in calls]
        prober = asyncio.ensure_future(probe(side))
        await asyncio.sleep(duration_s)
        stop.set()
        # Only now are the answers read: the writers blocked on flow control go on and end.
        await asyncio.wait_for(asyncio.gather(*writers, *(read(call) for call in calls), prober),
                               60)
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return FloodReport(streams, round(loop.time() - start, 2), sent[0], answered[0], dict(errors),
                       mib(rss[0]), mib(max(rss)), round(health_s[0], 3), predicts[0],
                       failures[:10])


# The flood's bounds: 128 streams on one connection, and what the server may take meanwhile.
FLOOD_STREAMS = 128
FLOOD_RSS_MIB = 128  # 128 calls x a 256 KiB window is 32 MiB; the rest is answers and buffers
FLOOD_HEALTH_S = 0.5
# Streams keep at most half of the soak's queue (SERVER_ARGS: 32), as the default 128 does of the
# default 256: unary calls keep room, and no streamed request is refused for a full queue.
FLOOD_ARGS = ("--max-stream-requests", "16")


def flood_holds(flood: FloodReport) -> bool:
    """Nothing lost, memory within FLOOD_RSS_MIB of the start, health within FLOOD_HEALTH_S,
    unary calls answered."""
    return (flood.lost == 0 and flood.rss_peak_mib - flood.rss_start_mib < FLOOD_RSS_MIB
            and flood.health_max_s < FLOOD_HEALTH_S and flood.predicts > 0
            and not flood.predict_failures)


def run_stream_flood(server: ServerProcess, streams: int = 64, duration_s: float = 10,
                     batch: int = MAX_BATCH) -> FloodReport:
    """`streams` PredictStreams on one connection write batch-`batch` requests for `duration_s`
    without reading an answer; meanwhile another connection checks health and sends unary
    Predicts. Then every answer is read: one per message taken."""
    return asyncio.run(_flood(server, streams, duration_s, batch))


# -- slow clients: connections that hold places on the REST port -----------------------------------

REST_READY = re.compile(r"serving KServe v2 REST on https?://127\.0\.0\.1:(\d+)")


@dataclass
class SlowReport:
    connections: int         # slow connections the flood keeps open (re-opened when closed)
    duration_s: float
    opened: int              # flood connections opened, re-opens included
    closed_by_server: int    # flood connections the server closed (timed out, cut, evicted, refused)
    cut_408: int             # slow bodies answered 408 (below the minimum rate)
    sent: int                # valid REST requests sent on kept-alive connections
    answered: int            # answered 200 with the reference's probabilities
    refused: int             # answered with a refusal (503 at the connection cap, 429 overload)
    retried: int             # sent again once: the kept-alive connection was closed while idle
    failures: list[str]      # anything else: a wrong answer, a connection error (lost)
    health_checks: int       # REST /v2/health/ready on a fresh connection each, and gRPC health
    health_failures: list[str]
    health_max_s: float      # slowest of either, failures aside
    rss_start_mib: float
    rss_peak_mib: float

    @property
    def lost(self) -> int:
        return self.sent - self.answered - self.refused


async def _rest_port(server: ServerProcess, within_s: float = 30) -> int:
    """The REST port, from the server's log (its line may follow `serving on`)."""
    for _ in range(int(within_s / 0.05)):
        for line in list(server.log):
            if match := REST_READY.search(line):
                return int(match.group(1))
        await asyncio.sleep(0.05)
    raise RuntimeError("the server logged no REST address:\n" + "".join(server.log[-20:]))


async def _slow_connection(port: int, kind: str, stop: asyncio.Event, counts: collections.Counter[str]) -> None:
    """One slow client, re-opened a moment after the server closes it: idle (sends nothing),
    headers a byte at a time (never finished), or a body a byte at a time after whole headers."""
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
            "application/json\r\nContent-Length: 100000\r\n\r\n").encode()
    endless = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 4000
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(SLOW_REOPEN_S)
            continue
        counts["opened"] += 1
        sent = 0
        try:
            if kind == "body":
                writer.write(head + b"[")
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), SLOW_TRICKLE_S)
                except TimeoutError:
                    if kind == "head":
                        writer.write(endless[sent % len(endless):][:1])
                    elif kind == "body":
                        writer.write(b" ")
                    sent += 1
                    continue
                if data.startswith(b"HTTP/1.1 408"):
                    counts["cut_408"] += 1
                if not data:
                    counts["closed"] += 1
                    break
        except OSError:
            counts["closed"] += 1
        finally:
            writer.close()
        await asyncio.sleep(SLOW_REOPEN_S)


async def _slow(server: ServerProcess, reference: Reference, connections: int, duration_s: float,
                clients: int, seed: int) -> SlowReport:
    import aiohttp
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = await _rest_port(server)
    base = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    stop = asyncio.Event()
    counts = collections.Counter[str]()
    tally = {"sent": 0, "answered": 0, "refused": 0, "retried": 0}
    failures: list[str] = []
    health_failures: list[str] = []
    health_s, checks = [0.0], [0]
    rss = [server.rss_kib()]

    async def valid(session: aiohttp.ClientSession) -> None:
        x, expected = reference.sample(rng, rng.randint(1, 4))
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                            "data": x.reshape(-1).tolist()}],
                "outputs": [{"name": "probabilities"}]}
        tally["sent"] += 1
        for attempt in range(2):
            try:
                async with session.post(f"{base}/v2/models/{MODEL}/infer", json=body,
                                        timeout=aiohttp.ClientTimeout(total=30)) as response:
                    answer = await response.json(content_type=None)
                    status = response.status
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A kept-alive connection the server closed while it was idle (evicted at the
                # full count, as nginx does): the request was never taken. Clients retry an
                # idempotent request on a fresh connection then (RFC 9112 9.3.1); once.
                if attempt:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                tally["retried"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return
        if status in (429, 503):
            tally["refused"] += 1
        elif status != 200:
            failures.append(f"{status}: {answer}"[:200])
        else:
            out = answer["outputs"][0]
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            if Reference.matches(got, expected):
                tally["answered"] += 1
            else:
                failures.append("wrong probabilities")

    async def client() -> None:
        # One kept-alive connection per client, as a real client's pool.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            await valid(session)  # before the flood: its place is taken
            await started.wait()
            while not stop.is_set():
                await valid(session)

    async def rest_health() -> None:
        start = loop.time()
        try:
            # A fresh connection each time, as a probe's.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                    s.get(f"{base}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=5)) as r:
                assert r.status == 200, r.status
            health_s[0] = max(health_s[0], loop.time() - start)
        except (aiohttp.ClientError, TimeoutError, AssertionError) as exc:
            health_failures.append(f"REST {type(exc).__name__}: {exc} after "
                                   f"{loop.time() - start:.2f} s"[:200])

    async def grpc_health(stub: Any) -> None:
        start = loop.time()
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            health_s[0] = max(health_s[0], loop.time() - start)
        except grpc.aio.AioRpcError as exc:
            health_failures.append(f"gRPC {exc.code().name} after {loop.time() - start:.2f} s")

    async def probe() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await started.wait()
            while not stop.is_set():
                await asyncio.gather(rest_health(), grpc_health(stub))
                checks[0] += 2
                rss.append(server.rss_kib())
                await asyncio.sleep(0.1)

    started = asyncio.Event()
    workers = [asyncio.ensure_future(client()) for _ in range(clients)]
    prober = asyncio.ensure_future(probe())
    await asyncio.sleep(1.0)  # the clients' first answers: their connections hold places
    kinds = ("idle", "head", "body")
    flood = [asyncio.ensure_future(_slow_connection(port, kinds[i % 3], stop, counts))
             for i in range(connections)]
    started.set()
    start = loop.time()
    await asyncio.sleep(duration_s)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*workers, prober, *flood), 60)
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return SlowReport(connections, round(loop.time() - start, 2), counts["opened"],
                      counts["closed"], counts["cut_408"], tally["sent"], tally["answered"],
                      tally["refused"], tally["retried"], failures[:10], checks[0], health_failures[:10],
                      round(health_s[0], 3), mib(rss[0]), mib(max(rss)))


# The slow clients' bounds: a REST cap of 32 + 8 reserved, three times as many slow connections.
SLOW_CONNECTIONS = 120
SLOW_CLIENTS = 4
SLOW_TRICKLE_S = 0.25    # a byte this often: never a gap as long as the body timeout
SLOW_REOPEN_S = 0.5      # a closed slow connection comes back after this, as slowloris's do
SLOW_RSS_MIB = 64        # 120 connections of a few KiB each; the rest is buffers and answers
SLOW_HEALTH_S = 0.5
SLOW_ARGS = ("--http-max-connections", "32", "--http-reserved-connections", "8",
             "--http-header-timeout-s", "3", "--http-body-timeout-s", "2")


def slow_args() -> tuple[str, ...]:
    """SLOW_ARGS with a free REST port (ServerProcess's `--http-port 0` turns REST off)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return (*SLOW_ARGS, "--http-port", str(port))


def slow_holds(slow: SlowReport) -> bool:
    """Nothing lost, every health check answered within SLOW_HEALTH_S, memory within
    SLOW_RSS_MIB of the start, valid requests answered."""
    return (slow.lost == 0 and not slow.failures and not slow.health_failures
            and slow.health_max_s < SLOW_HEALTH_S and slow.answered > 0
            and slow.rss_peak_mib - slow.rss_start_mib < SLOW_RSS_MIB)


def run_slow_clients(server: ServerProcess, reference: Reference, connections: int = SLOW_CONNECTIONS,
                     duration_s: float = 20, clients: int = SLOW_CLIENTS,
                     seed: int = 0) -> SlowReport:
    """`connections` slow REST connections (idle, headers or a body a byte at a time; each re-opened
    when the server closes it) for `duration_s`, while `clients` kept-alive clients send valid
    requests and a prober checks REST health on fresh connections and gRPC health."""
    return asyncio.run(_slow(server, reference, connections, duration_s, clients, seed))


def slow_summary(slow: SlowReport) -> str:
    return (f"slow clients: {slow.connections} slow REST connections for {slow.duration_s:.0f} s "
            f"({slow.opened} opened, {slow.closed_by_server} closed by the server, {slow.cut_408} "
            f"bodies cut 408): {slow.sent} valid requests, {slow.answered} answered, "
            f"{slow.refused} refused, {slow.lost} lost ({slow.retried} retried once on a fresh "
            f"connection); {slow.health_checks} health checks, "
            f"{len(slow.health_failures)} failed, slowest {slow.health_max_s} s; server RSS "
            f"{slow.rss_start_mib} -> peak {slow.rss_peak_mib} MiB")


# -- command line -------------------------------------------------------------------------------------

SERVER_ARGS = ("--max-batch-size", str(MAX_BATCH), "--max-queue-size", "32", "--grace-s", "10",
               "--max-queue-delay-ms", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of mixed load (default 60)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--shutdown-load", type=float, default=5,
                        help="seconds of load on a fresh server before its SIGTERM (default 5)")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="a repository with a model 'soak' (default: build one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flood", type=float, default=20,
                        help="seconds of the stream flood (streams that never read), 0: none "
                             "(default 20)")
    parser.add_argument("--slow", type=float, default=20,
                        help="seconds of the slow-client phase (slow REST connections beyond the "
                             "cap), 0: none (default 20)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "soak_results.json"),
                        help="JSON results file; '-' for stdout only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.model_repository or build_repository(Path(tmp) / "models")
        reference = Reference(repo / MODEL / "1")
        with ServerProcess(repo, *SERVER_ARGS) as server:
            soak = run_soak(server, reference, args.duration, args.concurrency, args.seed)
            server.signal(signal.SIGTERM)
            soak_exit = server.wait()
        flood = None
        if args.flood:
            with ServerProcess(repo, *SERVER_ARGS, *FLOOD_ARGS) as server:
                flood = run_stream_flood(server, FLOOD_STREAMS, args.flood)
        slow = None
        if args.slow:
            with ServerProcess(repo, *SERVER_ARGS, *slow_args(), "--metrics-port", "off") as server:
                slow = run_slow_clients(server, reference, duration_s=args.slow)
        shutdowns = []
        for retry in (None, 0.05):
            with ServerProcess(repo, *SERVER_ARGS) as server:
                shutdowns.append(run_shutdown(server, reference, args.shutdown_load,
                                              args.concurrency, args.seed + 1, retry))
    results = {
        "soak": asdict(soak) | {"server_exit_code": soak_exit},
        "shutdown": [asdict(s) | {"lost": s.lost, "computed_unanswered": s.computed_unanswered}
                     for s in shutdowns],
        "stream_flood": None if flood is None else asdict(flood) | {"lost": flood.lost},
        "slow_clients": None if slow is None else asdict(slow) | {"lost": slow.lost},
        "server_args": list(SERVER_ARGS),
        "environment": {"python": platform.python_version(), "grpcio": grpc.__version__,
                        "cpus": os.cpu_count(), "machine": platform.machine(),
                        "date": time.strftime("%Y-%m-%d")},
    }
    text = json.dumps(results, indent=2)
    if args.out != "-":
        Path(args.out).write_text(text + "\n")
    print(summary(soak, shutdowns))
    if flood is not None:
        print(flood_summary(flood))
    if slow is not None:
        print(slow_summary(slow))
    good = soak.lost == 0 and (flood is None or flood_holds(flood)) and (slow is None or slow_holds(slow)) and all(s.lost == 0 and s.computed_unanswered == 0 and s.exit_code == 0
                                  for s in shutdowns)
    return 0 if good else 1


def flood_summary(flood: FloodReport) -> str:
    return (f"stream flood: {flood.streams} streams writing without reading for "
            f"{flood.duration_s:.0f} s: {flood.sent} messages taken, {flood.answered} answered "
            f"({flood.lost} lost; inline errors {flood.errors}); server RSS "
            f"{flood.rss_start_mib} -> peak {flood.rss_peak_mib} MiB; slowest health check "
            f"{flood.health_max_s} s; {flood.predicts} unary Predicts answered meanwhile, "
            f"{len(flood.predict_failures)} failed")


def summary(soak: SoakReport, shutdowns: Sequence[ShutdownReport]) -> str:
    t = soak.tally
    lines = [
        f"soak: {soak.duration_s:.0f} s at concurrency {soak.concurrency}: {t['sent']} requests "
        f"({soak.requests_per_s:.0f}/s): {t['answered']} answered correctly, {t['refused']} refused "
        f"with the right code, {t['cancelled']} cancelled, {t['lost']} lost",
        f"  codes: {t['codes']}",
        f"  server RSS: {soak.rss_start_mib} MiB after warm-up, {soak.rss_end_mib} MiB at the end "
        f"(peak {soak.rss_peak_mib})",
        f"  server threads: {soak.threads_start} after warm-up, {soak.threads_end} at the end "
        f"(peak {soak.threads_peak})"]
    for s in shutdowns:
        b, a = s.tally_before, s.tally_after
        lines.append(
            f"shutdown (clients {s.clients}): {b['sent']} requests ended before SIGTERM "
            f"({b['answered']} answered, {b['lost']} lost); after it {a['answered']} answered, "
            f"{a['refused']} refused UNAVAILABLE, {a['cut_off']} cut off in transit, {a['lost']} "
            f"lost; computed {sum(s.computed.values())}, computed but unanswered "
            f"{s.computed_unanswered}; exit {s.exit_code} after {s.shutdown_s} s; health "
            f"{s.health_after_sigterm}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
