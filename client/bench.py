"""`ensemble-client bench`: the project's load generator (its perf_analyzer).

    ensemble-client bench --target 127.0.0.1:50051 --model digits --concurrency 1,8,32,64 \
        --duration 10 [--batch-size 1] [--request-rate R] [--api native|kserve|http] [--json out.json]
    ensemble-client bench --target 127.0.0.1:8000 --api http [--http-data json|binary] ...

- Closed loop (`--concurrency`): N callers, each sending its next request when the last one is
  answered; one level after another.
- `--api stream`: the native PredictStream, one stream per caller, each sending its next
  request when its last is answered (closed loop only).
- Open loop (`--request-rate R`): requests start on a fixed schedule, R per second, whether
  or not earlier ones were answered; latency is timed from the scheduled start, so a client or
  server that falls behind shows it (no coordinated omission).
- `--input-data x.npy` (or a CSV, one example per row): requests take `--batch-size` examples
  of it in turn, shared by every caller, cycling; without it, one random request is sent again
  and again. A model served adaptively (members evaluated until confident) costs what its
  inputs make it cost, so measure it on real examples.
- Each level runs `--warmup` seconds first, not counted; then `--duration` seconds. Requests
  that finish inside that window count: throughput (requests/s, examples/s), latency
  percentiles (OK requests only), errors by status code.

Cheap by design, so the client is not what is measured: one asyncio loop, one channel, the
requests serialized once, before the first level, and sent as bytes, answers kept as bytes (the
first one is decoded and checked). `--api http` drives the KServe v2 REST API the same way (one
aiohttp session, a keep-alive connection per caller), with JSON tensors or Triton's binary
tensor extension (`--http-data`); its refusals count by HTTP status (`HTTP_429`).
`client_cpu_ms_per_request` (this process's CPU time, gRPC's threads included, per answered
request) says how much of the machine the client itself used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TextIO, Union

import aiohttp
import grpc
import numpy as np

from snapserve.client.credentials import Security, read_token_file
from snapserve.client.errors import ClientError
from snapserve.client.inputs import fit_input, read_input
from snapserve.client.sync_client import MAX_MESSAGE_BYTES, channel_options
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.spec import InputSpec
from snapserve.proto.tensors import (DTYPE_TO_NUMPY, KSERVE_TO_NUMPY, NUMPY_TO_KSERVE, from_tensor,
                                     to_tensor)

__all__ = ["APIS", "BenchConfig", "BenchError", "LevelResult", "Requests", "add_bench_parser",
           "format_table", "prepared_requests", "request_batches", "results_json", "run_bench",
           "run_bench_command", "write_results"]

APIS = ("native", "kserve", "http", "stream")  # stream: native PredictStream, a stream per caller
HTTP_DATA = ("json", "binary")  # --api http: tensors as JSON `data`, or Triton's binary extension
BINARY_HEADER = "Inference-Header-Content-Length"
NATIVE_PREDICT = "/snapserve.v1.EnsembleService/Predict"
NATIVE_GET_MODEL = "/snapserve.v1.EnsembleService/GetModel"
NATIVE_PREDICT_STREAM = "/snapserve.v1.EnsembleService/PredictStream"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
KSERVE_METADATA = "/inference.GRPCInferenceService/ModelMetadata"
KSERVE_STATISTICS = "/inference.GRPCInferenceService/ModelStatistics"
PERCENTILES = (50, 90, 99)
# An --input-data file is read whole and its requests made before the first level: bounded
# before it is read.
MAX_INPUT_BYTES = 512 * 1024 * 1024


class BenchError(ValueError):
    """Bad benchmark settings (the CLI exits 2). A server that refuses raises ClientError."""


@dataclass(frozen=True)
class BenchConfig:
    target: str
    model: str
    version: int = 0  # 0: the server's default
    concurrency: tuple[int, ...] = (1,)  # closed-loop levels; ignored with request_rate
    request_rate: float | None = None  # requests/s: an open-loop run at this rate instead
    duration_s: float = 10.0  # measured window per level
    warmup_s: float = 2.0  # run before each window, not counted
    batch_size: int = 1  # examples per request
    api: str = "native"
    timeout_s: float = 30.0  # per-request deadline
    seed: int = 0
    http_data: str = "json"  # with api http: how tensors travel (HTTP_DATA)
    # gRPC connections the calls are spread over, round robin: more than one reaches every
    # worker of a `--workers N` server (the kernel hands each connection to one worker).
    connections: int = 1
    input_data: str | None = None  # .npy or CSV of examples, sent in turn; None: one random request

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise BenchError(f"api must be one of {', '.join(APIS)}, got {self.api!r}")
        if self.http_data not in HTTP_DATA:
            raise BenchError(f"http_data must be one of {', '.join(HTTP_DATA)}, got "
                             f"{self.http_data!r}")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise BenchError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise BenchError(f"request_rate must be > 0, got {self.request_rate!r}")
        if not self.duration_s > 0 or not self.warmup_s >= 0:
            raise BenchError("duration_s must be > 0 and warmup_s >= 0")
        if self.batch_size < 1:
            raise BenchError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.connections < 1:
            raise BenchError(f"connections must be >= 1, got {self.connections}")
        if self.api == "stream" and self.request_rate is not None:
            raise BenchError("api stream runs closed loops only (a stream per caller); "
                             "drop request_rate")


@dataclass
class LevelResult:
    """One level: a concurrency (closed loop) or a request rate (open loop)."""

    mode: str  # "concurrency" or "rate"
    concurrency: int | None
    request_rate: float | None
    duration_s: float
    requests: int  # answered OK inside the window
    errors: dict[str, int]  # status code name -> count, inside the window
    throughput_rps: float
    examples_per_s: float
    latency_ms: dict[str, float]  # p50, p90, p99, mean, max of OK requests
    client_cpu_ms_per_request: float
    client_cpu_share: float  # client CPU seconds / wall seconds (1.0 = one core busy)
    send_lag_ms_p99: float | None = None  # open loop: how late requests left the client
    distinct_requests: int = 1  # the requests taken in turn (--input-data: examples / batch size)
    server_batches: dict[int, int] | None = None  # batch size -> batches, from ModelStatistics
    server_compute_ms: dict[int, float] | None = None  # batch size -> mean compute ms

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.mode == "concurrency" else f"r={self.request_rate:g}/s"


@dataclass
class _Window:
    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)

    def record(self, began: float, finished: float, code: str) -> None:
        if not self.start <= finished < self.end:
            return
        if code == "OK":
            self.latencies.append(finished - began)
        else:
            self.errors[code] = self.errors.get(code, 0) + 1


Call = Callable[[bytes], Awaitable[bytes]]


class _Target:
    """The model's input spec and a prepared request for one API, over one channel."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], config: BenchConfig,
                 metadata: tuple[tuple[str, str], ...] | None) -> None:
        self.channel, self.config, self.metadata = channels[0], config, metadata
        # Identity (de)serializers: the request is bytes made once, answers stay bytes.
        self.native = config.api in ("native", "stream")  # the same messages
        method = NATIVE_PREDICT if self.native else KSERVE_INFER
        self._infers = [channel.unary_unary(method) for channel in channels]
        self._calls = 0

    async def call(self, payload: bytes) -> bytes:
        self._calls += 1
        infer = self._infers[self._calls % len(self._infers)]
        return await infer(payload, timeout=self.config.timeout_s, metadata=self.metadata)

    async def _unary(self, method: str, request: Any, response_type: Any) -> Any:
        stub = self.channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                                        response_deserializer=response_type.FromString)
        try:
            return await stub(request, timeout=self.config.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise ClientError.from_rpc_error(exc) from exc

    async def input_spec(self) -> tuple[str, np.dtype, tuple[int, ...]]:
        """(input name, dtype, shape with -1 for the batch) from the server's metadata."""
        if self.native:
            meta = await self._unary(NATIVE_GET_MODEL, pb.GetModelRequest(
                model=self.config.model, version=self.config.version), pb.ModelMetadata)
            return meta.input.name, DTYPE_TO_NUMPY[meta.input.dtype], tuple(meta.input.shape)
        from snapserve.proto.inference import grpc_service_pb2 as kpb

        meta = await self._unary(KSERVE_METADATA, kpb.ModelMetadataRequest(
            name=self.config.model, version=self._kserve_version()), kpb.ModelMetadataResponse)
        tensor = meta.inputs[0]
        return tensor.name, KSERVE_TO_NUMPY[tensor.datatype], tuple(tensor.shape)

    def _kserve_version(self) -> str:
        return "" if self.config.version == 0 else str(self.config.version)

    def request(self, name: str, x: np.ndarray) -> bytes:
        if self.native:
            request = pb.PredictRequest(model=self.config.model, version=self.config.version)
            to_tensor(x, request.input)
            return request.SerializeToString()
        from snapserve.proto.inference import grpc_service_pb2 as kpb

        request = kpb.ModelInferRequest(model_name=self.config.model,
                                        model_version=self._kserve_version())
        request.inputs.add(name=name, datatype=NUMPY_TO_KSERVE[x.dtype], shape=x.shape)
        request.raw_input_contents.append(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes())
        return request.SerializeToString()

    def check(self, answer: bytes, examples: int) -> None:
        """The first answer, decoded: a benchmark of wrong answers measures nothing."""
        if self.native:
            response = pb.PredictResponse.FromString(answer)
            rows = from_tensor(response.probabilities, "probabilities").shape[0]
        else:
            from snapserve.proto.inference import grpc_service_pb2 as kpb

            response = kpb.ModelInferResponse.FromString(answer)
            shapes = {o.name: list(o.shape) for o in response.outputs}
            if "probabilities" not in shapes:
                raise ClientError(grpc.StatusCode.UNKNOWN, f"ModelInfer answered outputs "
                                  f"{sorted(shapes)}; no probabilities")
            rows = shapes["probabilities"][0]
        if rows != examples:
            raise ClientError(grpc.StatusCode.UNKNOWN,
                              f"the server answered {rows} rows for {examples} examples")

    async def batch_statistics(self) -> dict[int, tuple[int, int]] | None:
        """batch size -> (batches, compute ns) so far, from KServe ModelStatistics; None when
        the server does not offer it (the counts are the server's, for all its callers)."""
        try:
            from snapserve.proto.inference import grpc_service_pb2 as kpb

            stats = await self._unary(KSERVE_STATISTICS, kpb.ModelStatisticsRequest(
                name=self.config.model, version=self._kserve_version()), kpb.ModelStatisticsResponse)
        except (ClientError, ImportError):
            return None
        totals: dict[int, tuple[int, int]] = {}
        for model in stats.model_stats:
            for batch in model.batch_stats:
                count, ns = totals.get(batch.batch_size, (0, 0))
                totals[batch.batch_size] = (count + batch.compute_infer.count,
                                            ns + batch.compute_infer.ns)
        return totals


class StreamRefused(Exception):
    """A stream's answer that carries an error (the stream itself goes on)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = grpc.StatusCode.UNKNOWN
        for status in grpc.StatusCode:
            if status.value[0] == code:
                self.code = status


class _StreamTarget(_Target):
    """`_Target` over the native PredictStream: each caller (task) has a stream of its own and
    sends its next request when the last is answered, as unary callers do; the answer is parsed
    for its error field only (a stream answers a refusal in the message, not as a status)."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], config: BenchConfig,
                 metadata: tuple[tuple[str, str], ...] | None) -> None:
        super().__init__(channels, config, metadata)
        self._opens = [channel.stream_stream(NATIVE_PREDICT_STREAM) for channel in channels]
        self._streams: dict[asyncio.Task[Any] | None, Any] = {}

    async def call(self, payload: bytes) -> bytes:
        task = asyncio.current_task()
        stream = self._streams.get(task)
        if stream is None:  # the callers' streams spread over the connections
            open_stream = self._opens[len(self._streams) % len(self._opens)]
            stream = self._streams[task] = open_stream(metadata=self.metadata)
        await stream.write(payload)
        answer = await stream.read()
        if answer is grpc.aio.EOF:
            del self._streams[task]
            raise StreamRefused(grpc.StatusCode.UNAVAILABLE.value[0], "the stream ended")
        error = pb.PredictResponse.FromString(answer).error
        if error.code:
            raise StreamRefused(error.code, error.message)
        return answer

    def close_streams(self) -> None:
        """End every caller's stream (after a level: its callers are done)."""
        for stream in self._streams.values():
            stream.cancel()
        self._streams.clear()


class HttpRefused(Exception):
    """A REST answer other than 200, with the server's `{"error": ...}` message."""

    def __init__(self, status: int, body: bytes) -> None:
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body[:200].decode("utf-8", "replace")
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _HttpTarget:
    """`_Target`'s interface over the KServe v2 REST API: one aiohttp session, a keep-alive
    connection per caller, the body encoded once, answers kept as bytes."""

    def __init__(self, session: aiohttp.ClientSession, config: BenchConfig,
                 token: str | None) -> None:
        self.session, self.config = session, config
        version = f"/versions/{config.version}" if config.version else ""
        self._model = f"/v2/models/{config.model}{version}"
        self._auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        self._headers = dict(self._auth)  # the infer request's, set by request()
        self._answer_header: str | None = None  # the last answer's JSON length (binary answers)

    async def call(self, payload: bytes) -> bytes:
        async with self.session.post(f"{self._model}/infer", data=payload,
                                     headers=self._headers) as response:
            body = await response.read()
            if response.status != 200:
                raise HttpRefused(response.status, body)
            self._answer_header = response.headers.get(BINARY_HEADER)
            return body

    async def _get(self, path: str) -> Any:
        async with self.session.get(path, headers=self._auth) as response:
            body = await response.read()
            if response.status != 200:
                raise ClientError(grpc.StatusCode.UNKNOWN, str(HttpRefused(response.status, body)))
            return json.loads(body)

    async def input_spec(self) -> tuple[str, np.dtype, tuple[int, ...]]:
        tensor = (await self._get(self._model))["inputs"][0]
        return tensor["name"], KSERVE_TO_NUMPY[tensor["datatype"]], tuple(tensor["shape"])

    def request(self, name: str, x: np.ndarray) -> bytes:
        tensor = {"name": name, "datatype": NUMPY_TO_KSERVE[x.dtype], "shape": list(x.shape)}
        if self.config.http_data == "json":
            self._headers = {**self._auth, "Content-Type": "application/json"}
            return json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        raw = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
        header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                             "parameters": {"binary_data_output": True}}).encode()
        self._headers = {**self._auth, "Content-Type": "application/octet-stream",
                         BINARY_HEADER: str(len(header))}
        return header + raw

    def check(self, answer: bytes, examples: int) -> None:
        """The first answer, decoded: JSON, or the JSON header of a binary one."""
        header = answer if self._answer_header is None else answer[:int(self._answer_header)]
        shapes = {o["name"]: o["shape"] for o in json.loads(header)["outputs"]}
        if "probabilities" not in shapes:
            raise ClientError(grpc.StatusCode.UNKNOWN, f"infer answered outputs {sorted(shapes)}; "
                              "no probabilities")
        if shapes["probabilities"][0] != examples:
            raise ClientError(grpc.StatusCode.UNKNOWN, f"the server answered "
                              f"{shapes['probabilities'][0]} rows for {examples} examples")

    async def batch_statistics(self) -> dict[int, tuple[int, int]] | None:
        """As `_Target.batch_statistics`, from GET .../stats."""
        try:
            stats = await self._get(f"{self._model}/stats")
        except ClientError:
            return None
        totals: dict[int, tuple[int, int]] = {}
        for model in stats["model_stats"]:
            for batch in model["batch_stats"]:
                count, ns = totals.get(batch["batch_size"], (0, 0))
                totals[batch["batch_size"]] = (count + batch["compute_infer"]["count"],
                                               ns + batch["compute_infer"]["ns"])
        return totals


def _status(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, HttpRefused):
        return f"HTTP_{exc.status}"
    if isinstance(exc, StreamRefused):
        return exc.code.name
    return type(exc).__name__


Target = Union[_Target, _StreamTarget, _HttpTarget]


class Requests:
    """The prepared requests, taken in turn by every caller."""

    def __init__(self, payloads: Sequence[bytes]) -> None:
        if not payloads:
            raise BenchError("no requests to send")
        self.payloads = list(payloads)
        self._next = 0

    def take(self) -> bytes:
        payload = self.payloads[self._next % len(self.payloads)]
        self._next += 1
        return payload


def request_batches(x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`x` ([N, ...] examples) as requests of `batch_size` rows, in order, the last one
    completed from the start: every example is sent, and every request has the same size."""
    count = max(math.ceil(len(x) / batch_size), 1)
    return [np.take(x, np.arange(i * batch_size, (i + 1) * batch_size), axis=0, mode="wrap")
            for i in range(count)]


def _input_batches(config: BenchConfig, name: str, dtype: np.dtype,
                   shape: tuple[int, ...]) -> list[np.ndarray]:
    """The examples the requests carry: `config.input_data` fitted to the model's input, or
    one batch of random normal values."""
    if config.input_data is None:
        x = np.random.default_rng(config.seed).normal(0, 1, (config.batch_size, *shape[1:]))
        return [x.astype(dtype)]
    try:
        size = os.path.getsize(config.input_data)
    except OSError as exc:
        raise BenchError(f"cannot read --input-data {config.input_data}: {exc}") from exc
    if size > MAX_INPUT_BYTES:
        raise BenchError(f"--input-data {config.input_data} is {size:,} bytes; at most "
                         f"{MAX_INPUT_BYTES:,} are read (every request is made before the first "
                         "level): give a sample of it")
    x = fit_input(read_input(config.input_data), InputSpec(name, np.dtype(dtype), shape, None),
                  config.input_data)
    return request_batches(x, config.batch_size)


async def prepared_requests(target: Target, config: BenchConfig) -> Requests:
    """The requests of `config` for `target`'s model (its input spec asked of the server), made
    once, before any level."""
    name, dtype, shape = await target.input_spec()
    return Requests([target.request(name, batch)
                     for batch in _input_batches(config, name, dtype, shape)])


async def _timed(target: Target, requests: Requests, window: _Window, began: float) -> None:
    try:
        await target.call(requests.take())
        code = "OK"
    except Exception as exc:  # every failure is a data point, counted by its status
        code = _status(exc)
    window.record(began, time.perf_counter(), code)


async def _closed_loop(target: Target, requests: Requests, concurrency: int,
                       window: _Window) -> None:
    async def caller() -> None:
        while (now := time.perf_counter()) < window.end:
            await _timed(target, requests, window, now)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def _open_loop(target: Target, requests: Requests, rate: float, window: _Window,
                     started: float) -> None:
    tasks: set[asyncio.Task[None]] = set()
    for i in range(math.ceil((window.end - started) * rate)):
        scheduled = started + i / rate
        # Behind schedule, sleep(0) still yields, so the requests already started get answered.
        await asyncio.sleep(max(scheduled - time.perf_counter(), 0))
        if window.start <= scheduled < window.end:
            window.lags.append(time.perf_counter() - scheduled)
        task = asyncio.ensure_future(_timed(target, requests, window, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


def _percentiles(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1e3
    values = np.percentile(ms, PERCENTILES)
    return {**{f"p{p}": float(v) for p, v in zip(PERCENTILES, values)},
            "mean": float(ms.mean()), "max": float(ms.max())}


def _delta(after: dict[int, tuple[int, int]] | None, before: dict[int, tuple[int, int]] | None,
           ) -> tuple[dict[int, int] | None, dict[int, float] | None]:
    if after is None or before is None:
        return None, None
    batches, compute = {}, {}
    for size, (count, ns) in sorted(after.items()):
        count0, ns0 = before.get(size, (0, 0))
        if count > count0:
            batches[size] = count - count0
            compute[size] = (ns - ns0) / (count - count0) / 1e6
    return batches, compute


async def _level(target: Target, requests: Requests, config: BenchConfig,
                 concurrency: int | None) -> LevelResult:
    started = time.perf_counter()
    window = _Window(started + config.warmup_s, started + config.warmup_s + config.duration_s)
    run = (_open_loop(target, requests, config.request_rate, window, started)
           if concurrency is None else _closed_loop(target, requests, concurrency, window))
    runner = asyncio.ensure_future(run)
    await asyncio.sleep(max(window.start - time.perf_counter(), 0))
    cpu0, before = time.process_time(), await target.batch_statistics()
    await asyncio.sleep(max(window.end - time.perf_counter(), 0))
    cpu = time.process_time() - cpu0
    after = await target.batch_statistics()
    await runner
    if isinstance(target, _StreamTarget):
        target.close_streams()
    batches, compute = _delta(after, before)
    ok = len(window.latencies)
    return LevelResult(
        mode="rate" if concurrency is None else "concurrency", concurrency=concurrency,
        request_rate=config.request_rate if concurrency is None else None,
        duration_s=config.duration_s, requests=ok, errors=dict(sorted(window.errors.items())),
        throughput_rps=ok / config.duration_s,
        examples_per_s=ok * config.batch_size / config.duration_s,
        latency_ms=_percentiles(window.latencies),
        client_cpu_ms_per_request=1e3 * cpu / max(ok + sum(window.errors.values()), 1),
        client_cpu_share=cpu / config.duration_s,
        send_lag_ms_p99=float(np.percentile(window.lags, 99) * 1e3) if window.lags else None,
        distinct_requests=len(requests.payloads), server_batches=batches, server_compute_ms=compute)


@contextlib.asynccontextmanager
async def _open_target(config: BenchConfig, security: Security,
                       ssl_context: ssl.SSLContext | None) -> AsyncIterator[Target]:
    """The target for `config.api`: a gRPC channel, or (http) an aiohttp session."""
    if config.api != "http":
        # Channels of their own connection each (no shared subchannel pool).
        options = [*channel_options(MAX_MESSAGE_BYTES), ("grpc.use_local_subchannel_pool", 1)]
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(security.aio_channel(config.target, options))
                        for _ in range(config.connections)]
            cls = _StreamTarget if config.api == "stream" else _Target
            yield cls(channels, config, security.metadata)
        return
    scheme = "http" if ssl_context is None else "https"
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_context if ssl_context is not None else True)
    async with aiohttp.ClientSession(f"{scheme}://{config.target}", connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as session:
        yield _HttpTarget(session, config, security.token)


async def run_bench(config: BenchConfig, security: Security = Security(),
                    progress: Callable[[LevelResult], None] | None = None,
                    ssl_context: ssl.SSLContext | None = None) -> list[LevelResult]:
    """Every level of `config` against a running server; `progress` sees each level as it ends.
    `ssl_context`: TLS for `--api http` (gRPC's comes from `security`)."""
    async with _open_target(config, security, ssl_context) as target:
        requests = await prepared_requests(target, config)
        try:
            target.check(await target.call(requests.payloads[0]), config.batch_size)
        except grpc.aio.AioRpcError as exc:
            raise ClientError.from_rpc_error(exc) from exc
        except HttpRefused as exc:
            raise ClientError(grpc.StatusCode.UNKNOWN, str(exc)) from exc
        except StreamRefused as exc:
            raise ClientError(exc.code, str(exc)) from exc
        levels: list[int | None] = [None] if config.request_rate else list(config.concurrency)
        results = []
        for level in levels:
            result = await _level(target, requests, config, level)
            results.append(result)
            if progress is not None:
                progress(result)
    return results


def format_table(results: Sequence[LevelResult]) -> str:
    lines = [f"{'level':>12} {'req/s':>9} {'ex/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'errors':>8} {'cli ms/req':>10}  server batches"]
    for r in results:
        lat = r.latency_ms
        errors = sum(r.errors.values())
        batches = ""
        if r.server_batches:
            total = sum(r.server_batches.values())
            mean = sum(s * n for s, n in r.server_batches.items()) / total
            batches = f"mean {mean:.1f} over {total}"
        lines.append(f"{r.label:>12} {r.throughput_rps:>9.1f} {r.examples_per_s:>9.1f} "
                     f"{lat.get('p50', math.nan):>8.2f} {lat.get('p90', math.nan):>8.2f} "
                     f"{lat.get('p99', math.nan):>8.2f} {errors:>8d} "
                     f"{r.client_cpu_ms_per_request:>10.3f}  {batches}")
        if r.errors:
            lines.append(" " * 13 + "errors: " + ", ".join(f"{k} {v}" for k, v in r.errors.items()))
    return "\n".join(lines)


def results_json(config: BenchConfig, results: Sequence[LevelResult]) -> dict[str, Any]:
    return {"config": asdict(config), "levels": [asdict(r) for r in results]}


def write_results(config: BenchConfig, results: Sequence[LevelResult], out: TextIO) -> None:
    json.dump(results_json(config, results), out, indent=2)
    out.write("\n")


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_bench_parser(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `bench` subcommand; `common` adds the shared connection flags (client/cli.py)."""
    bench = commands.add_parser("bench", help="measure throughput and latency under load",
                                description=__doc__.split("\n\n")[0])
    common(bench)
    bench.add_argument("--model", required=True)
    bench.add_argument("--version", type=int, default=0, help="0: the server's default")
    bench.add_argument("--concurrency", type=_levels, default=(1,),
                       help="closed-loop levels, e.g. 1,8,32,64 (default 1)")
    bench.add_argument("--request-rate", type=float, default=None,
                       help="open loop: start this many requests per second instead")
    bench.add_argument("--duration", type=float, default=10.0,
                       help="measured seconds per level (default %(default)s)")
    bench.add_argument("--warmup", type=float, default=2.0,
                       help="unmeasured seconds before each level (default %(default)s)")
    bench.add_argument("--batch-size", type=int, default=1, help="examples per request (default 1)")
    bench.add_argument("--input-data", default=None, metavar="PATH",
                       help=".npy array [N, ...] or CSV (one example per row) of examples: the "
                            "requests take --batch-size of them in turn, cycling (default: one "
                            "random request, sent again and again)")
    bench.add_argument("--api", choices=APIS, default="native",
                       help="native: snapserve.v1 Predict; kserve: GRPCInferenceService/ModelInfer; "
                            "http: KServe v2 REST infer (--target is then the REST port); "
                            "stream: snapserve.v1 PredictStream, a stream per caller")
    bench.add_argument("--http-data", choices=HTTP_DATA, default="json",
                       help="with --api http: tensors as JSON data, or Triton's binary tensor "
                            "extension (default %(default)s)")
    bench.add_argument("--connections", type=int, default=1,
                       help="gRPC connections to spread the calls over (default 1; more reach "
                            "every worker of a --workers server)")
    bench.add_argument("--json", default=None, metavar="PATH",
                       help="write JSON results there ('-': stdout); without it, a table on a "
                            "terminal and JSON otherwise")
    bench.set_defaults(run=run_bench_command)


def _http_ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The REST side's TLS from the same flags as gRPC's (--tls, --tls-ca, --tls-cert/--tls-key)."""
    if args.api != "http" or not (args.tls or args.tls_ca or args.tls_cert):
        return None
    context = ssl.create_default_context(cafile=args.tls_ca)
    if args.tls_cert is not None:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def run_bench_command(client: Any, args: argparse.Namespace, out: TextIO) -> None:
    """`ensemble-client bench`: its own asyncio channel (the sync client is not used)."""
    config = BenchConfig(
        target=args.target, model=args.model, version=args.version, concurrency=args.concurrency,
        request_rate=args.request_rate, duration_s=args.duration, warmup_s=args.warmup,
        batch_size=args.batch_size, api=args.api, http_data=args.http_data,
        connections=args.connections, input_data=args.input_data,
        timeout_s=args.timeout if args.timeout is not None else BenchConfig.timeout_s)
    security = Security.build(tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                              tls_key=args.tls_key, token=None if args.token_file is None
                              else read_token_file(args.token_file))
    table = args.json != "-" and (args.json is not None or out.isatty())
    results = asyncio.run(run_bench(config, security, ssl_context=_http_ssl_context(args)))
    if table:
        print(format_table(results), file=out)
    if args.json not in (None, "-"):
        with open(args.json, "w", encoding="utf-8") as f:
            write_results(config, results, f)
    elif not table:
        write_results(config, results, out)
