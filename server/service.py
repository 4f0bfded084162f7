"""The native gRPC service `snapserve.v1.EnsembleService`: decode, call, encode.

`STATUS_CODES` is the one table from the server's named exceptions to gRPC status codes; every
service (this one, KServe v2 in server/kserve.py) goes through `status_code`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import grpc

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import TensorError
from snapserve.server.errors import (BatcherClosed, ConfigError, InferenceError, InvalidInput,
                           InvalidModelName, ItemExpired, ItemTooLarge, ModelNotFound,
                           NoLoadableVersion, QueueFull, RepositoryControlDenied, ShuttingDown,
                           Unauthenticated, VersionNotFound)
from snapserve.server.messages import (decode_input, encode_metadata, encode_prediction, encode_summary)
from snapserve.server.metrics import API_NATIVE, ServerMetrics
from snapserve.server.registry import ModelRegistry

__all__ = ["STATUS_CODES", "EnsembleServicer", "answer_in_order", "describe_error", "observed_request",
           "status_code"]

logger = logging.getLogger(__name__)

STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    VersionNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    TensorError: grpc.StatusCode.INVALID_ARGUMENT,
    ItemTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidModelName: grpc.StatusCode.INVALID_ARGUMENT,
    RepositoryControlDenied: grpc.StatusCode.PERMISSION_DENIED,
    # An explicit load found the model's files unusable: the request was fine, the disk is not.
    NoLoadableVersion: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BatcherClosed: grpc.StatusCode.UNAVAILABLE,
    ItemExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferenceError: grpc.StatusCode.INTERNAL,  # the model failed: logged with its traceback
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,  # raised by server.security's interceptor
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,  # raised by server.shutdown's interceptor
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status for an exception: its class or nearest listed base; INTERNAL for the unexpected."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


@contextlib.contextmanager
def observed_request(metrics: ServerMetrics, model: str, api: str) -> Iterator[None]:
    """Count one inference request by its outcome's status code and time it, for either API."""
    start, code = time.perf_counter(), grpc.StatusCode.OK
    try:
        yield
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:
        code = status_code(exc)
        raise
    finally:
        metrics.observe_request(model, api, code, time.perf_counter() - start)


def _describe(exc: Exception, code: grpc.StatusCode) -> str:
    if code is grpc.StatusCode.INTERNAL:
        # Our bug or the model's: log the traceback here, give the caller the gist only.
        logger.error("internal error: %r", exc, exc_info=exc)
        return f"internal error: {type(exc).__name__}: {exc}"
    return str(exc)


def describe_error(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and the message a caller gets for an exception (INTERNAL ones are logged)."""
    code = status_code(exc)
    return code, _describe(exc, code)


Request = TypeVar("Request")
Answer = TypeVar("Answer")


async def answer_in_order(requests: AsyncIterator[Request],
                          answer: Callable[[Request], Awaitable[Answer]],
                          window: int) -> AsyncIterator[Answer]:
    """A stream's answers, in request order. Requests are read ahead and started at once (up to
    `window`), so the requests of one stream share batches. `answer` must not raise for a bad
    request (it returns an error answer); a read error (the client went away) is re-raised."""
    in_flight: asyncio.Queue[asyncio.Task[Answer] | None] = asyncio.Queue(window)

    async def read() -> None:
        try:
            async for request in requests:
                await in_flight.put(asyncio.ensure_future(answer(request)))
        except Exception:
            await in_flight.put(None)  # wake the writer, which re-raises from `await reader`
            raise
        await in_flight.put(None)  # not in a finally: a cancelled reader must not block here

    reader = asyncio.ensure_future(read())
    try:
        while (task := await in_flight.get()) is not None:
            yield await task
        await reader  # re-raises a read error (e.g. the client went away mid-stream)
    finally:
        reader.cancel()
        while not in_flight.empty():
            task = in_flight.get_nowait()
            if task is not None:
                task.cancel()


class EnsembleServicer(pb_grpc.EnsembleServiceServicer):
    def __init__(self, registry: ModelRegistry, max_stream_in_flight: int = 64,
                 metrics: ServerMetrics | None = None) -> None:
        self._registry = registry
        self._max_stream_in_flight = max_stream_in_flight
        self._metrics = ServerMetrics(registry) if metrics is None else metrics

    async def _predict(self, request: pb.PredictRequest,
                       timeout: float | None = None) -> pb.PredictResponse:
        with observed_request(self._metrics, request.model, API_NATIVE):
            spec = self._registry.get(request.model, request.version).manifest.input
            x = decode_input(request, spec)
            served, scores = await self._registry.predict(request.model, request.version, x,
                                                          timeout)
            return encode_prediction(scores, served, request.request_id,
                                     request.include_member_probabilities)

    async def Predict(self, request: pb.PredictRequest,
                      context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        try:
            return await self._predict(request, context.time_remaining())
        except Exception as exc:
            code = status_code(exc)
            message = _describe(exc, code)
        await context.abort(code, message)

    async def _answer(self, request: pb.PredictRequest) -> pb.PredictResponse:
        """A stream answer: the prediction, or an error response; the stream never fails for it."""
        try:
            return await self._predict(request)
        except Exception as exc:
            code = status_code(exc)
            return pb.PredictResponse(
                model=request.model, version=request.version, request_id=request.request_id,
                error=pb.Error(code=code.value[0], message=_describe(exc, code)))

    async def PredictStream(self, request_iterator: AsyncIterator[pb.PredictRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PredictResponse]:
        # aclosing: if this call ends early, the requests still in flight are cancelled now.
        async with contextlib.aclosing(answer_in_order(
                request_iterator, self._answer, self._max_stream_in_flight)) as answers:
            async for response in answers:
                yield response

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[encode_summary(self._registry, name) for name in self._registry.names()])

    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> pb.ModelMetadata:
        try:
            served = self._registry.get(request.model, request.version)
        except Exception as exc:
            code = status_code(exc)
            message = _describe(exc, code)
        else:
            return encode_metadata(self._registry, served)
        await context.abort(code, message)
