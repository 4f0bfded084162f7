"""From the server's named exceptions to status codes, in one place, for every service.

`STATUS_CODES` is the one table (exception -> gRPC code); `HTTP_STATUS` pairs each gRPC code
with its HTTP status, so the REST front end (api/http.py) answers every error with the status
its gRPC code implies and the same message (`describe_http_error`). `abort_on_error` is the one
decorator every handler of both
services (native in service.py, KServe v2 in kserve.py) wears, so a handler only decodes, calls
and encodes. Streams answer a failed request with an error answer instead (`answer_in_order`),
and the interceptors refuse calls with the same codes (`status_code`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import grpc

from snapserve.proto.tensors import TensorError
from snapserve.server.errors import (BatcherClosed, ConfigError, InferenceError, InvalidInput,
                                     InvalidModelName, ItemExpired, ItemTooLarge, MalformedRequest,
                                     ModelNotFound, ModelRefusedInput, NoLoadableVersion,
                                     NonFiniteOutput, Overloaded, QueueFull, RepositoryControlDenied,
                                     ShuttingDown, Unauthenticated, VersionNotFound)
from snapserve.server.observability.request_context import (REQUEST_ID_KEY, RequestContext, current_request,
                                              metadata_value, open_request, request_context)
from snapserve.server.observability import tracing
from snapserve.server.observability.tracing import end_request_span, extract_parent, request_span

if TYPE_CHECKING:  # only its type: an interceptor needs the codes, not the metrics
    from snapserve.server.observability.metrics import ServerMetrics

__all__ = ["HTTP_STATUS", "STATUS_CODES", "abort_on_error", "answer_in_order",
           "describe_error", "describe_http_error", "http_status", "observed_request",
           "status_code"]

logger = logging.getLogger(__name__)

STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    VersionNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    # The model failed on this request's values alone (its batch re-run apart), or its output
    # was NaN/Inf: the request is refused, the rest of its batch answered (models/ensemble.py).
    ModelRefusedInput: grpc.StatusCode.INVALID_ARGUMENT,
    NonFiniteOutput: grpc.StatusCode.INVALID_ARGUMENT,
    TensorError: grpc.StatusCode.INVALID_ARGUMENT,
    ItemTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidModelName: grpc.StatusCode.INVALID_ARGUMENT,
    RepositoryControlDenied: grpc.StatusCode.PERMISSION_DENIED,
    # An explicit load found the model's files unusable: the request was fine, the disk is not.
    NoLoadableVersion: grpc.StatusCode.FAILED_PRECONDITION,
    MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,  # raised by api/intake.py's parsing
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,  # api/intake.py's server-wide bound
    BatcherClosed: grpc.StatusCode.UNAVAILABLE,
    ItemExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferenceError: grpc.StatusCode.INTERNAL,  # the model failed: logged with its traceback
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,  # raised by api.security's interceptor
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,  # raised by api.shutdown's interceptor
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status for an exception: its class or nearest listed base; INTERNAL for the unexpected."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def describe_error(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and the message a caller gets for an exception (INTERNAL ones are logged)."""
    code = status_code(exc)
    if code is grpc.StatusCode.INTERNAL:
        # Our bug or the model's: log the traceback here, give the caller the gist only.
        logger.error("internal error: %r", exc, exc_info=exc)
        return code, f"internal error: {type(exc).__name__}: {exc}"
    return code, str(exc)


# The HTTP status of each gRPC code, as google.rpc.Code pairs them (grpc-gateway and Envoy's
# gRPC-JSON transcoder use the same pairs). An exception's one row in STATUS_CODES decides its
# status on both transports, so a REST and a gRPC caller cannot be told different things.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status(exc: BaseException) -> int:
    """The HTTP status for an exception (its gRPC code's, HTTP_STATUS)."""
    return HTTP_STATUS[status_code(exc)]


def describe_http_error(exc: Exception) -> tuple[int, str]:
    """The HTTP status and the message a REST caller gets: the message a gRPC caller gets."""
    code, message = describe_error(exc)
    return HTTP_STATUS[code], message


Handler = TypeVar("Handler", bound=Callable[..., Any])


def abort_on_error(handler: Handler) -> Handler:
    """Wrap a servicer method: an exception it raises ends the call with the exception's status
    (STATUS_CODES) and message. The call runs as a request (server/observability/request_context.py): its id
    from the request's id field or `x-request-id` metadata or made up, echoed in the answer's id
    field and the `x-request-id` trailer; its trace parent from the metadata.

    A unary method is a coroutine function. A method that answers with a stream returns (or
    is) an async iterator of answers; the wrapper relays it and closes it as soon as the call
    ends, so what it still computes (a stream's requests in flight) is cancelled at once.
    """
    if not inspect.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def streaming(self: object, request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            # The stream's own id and trace parent, for what it logs as a whole; each request of
            # it gets its own (answer_in_order). Set for the rest of the call's task, not reset:
            # a token reset from the generator's close could run in another context.
            metadata = context.invocation_metadata()
            open_request(metadata_value(metadata, REQUEST_ID_KEY), extract_parent(metadata))
            try:
                async with contextlib.aclosing(handler(self, request, context)) as answers:
                    async for answer in answers:
                        yield answer
            except grpc.aio.AbortError:
                raise  # the call is already ending with its status
            except Exception as exc:
                await context.abort(*describe_error(exc))

        return streaming  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: object, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Opened for the rest of the call's task (grpc.aio runs each call in a task of its own,
        # with its own copy of the context), so nothing needs resetting: no context manager on
        # the per-request path.
        metadata = context.invocation_metadata()
        current = open_request(_request_id(request) or metadata_value(metadata, REQUEST_ID_KEY),
                               extract_parent(metadata))
        _answer_with_id(request, current.request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, current.request_id),))
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*describe_error(exc))

    return unary  # type: ignore[return-value]


# The field an inference request carries its id in, by message type; the answer echoes it.
REQUEST_ID_FIELDS = {"snapserve.v1.PredictRequest": "request_id",
                     "inference.ModelInferRequest": "id"}


def _id_field(request: Any) -> str | None:
    descriptor = getattr(request, "DESCRIPTOR", None)
    return None if descriptor is None else REQUEST_ID_FIELDS.get(descriptor.full_name)


def _request_id(request: Any) -> str:
    field = _id_field(request)
    return "" if field is None else getattr(request, field)


def _answer_with_id(request: Any, request_id: str) -> None:
    """Write the request's effective id (cleaned, or made up) into its id field, which every
    encoder copies into the answer: the caller gets back the id the logs use."""
    field = _id_field(request)
    if field is not None:
        setattr(request, field, request_id)


def observed_request(metrics: ServerMetrics, model: str, api: str
                     ) -> contextlib.AbstractContextManager[None]:
    """One inference request, for either API: counted by its outcome's status code and timed,
    traced (a span when tracing is on), and logged on `snapserve.server.access` (failures at
    INFO, answers at DEBUG), each under the current request's id (one is opened if none is)."""
    request = current_request()
    if request is None or tracing.active():
        return _traced_request(metrics, request, model, api)
    # Every gRPC call already has its request context (abort_on_error) and, without a tracer
    # provider, a span goes nowhere: no ExitStack, no span, no generator (docs/performance.md,
    # the profile).
    return _Observed(metrics, request, model, api, None)


@contextlib.contextmanager
def _traced_request(metrics: ServerMetrics, request: RequestContext | None, model: str,
                    api: str) -> Iterator[None]:
    """The general case, with its context managers: a request context if none is open, a span."""
    with contextlib.ExitStack() as stack:
        request = request or stack.enter_context(request_context())
        span = stack.enter_context(request_span(request.trace_parent, {
            "snapserve.model": model, "snapserve.api": api,
            "snapserve.request_id": request.request_id}))
        with _Observed(metrics, request, model, api, span):
            yield


class _Observed:
    """The block's outcome (its status code) and duration: metrics, span, access log."""

    __slots__ = ("_metrics", "_request", "_model", "_api", "_span", "_start")

    def __init__(self, metrics: ServerMetrics, request: RequestContext, model: str, api: str,
                 span: Any) -> None:
        self._metrics, self._request, self._model, self._api, self._span = (
            metrics, request, model, api, span)
        self._start = 0.0

    def __enter__(self) -> None:
        self._request.model, self._request.api = self._model, self._api
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: Any) -> bool:
        seconds = time.perf_counter() - self._start
        if kind is None or exc is None:
            code = grpc.StatusCode.OK
        elif isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, Exception):
            code = status_code(exc)
        else:  # KeyboardInterrupt, GeneratorExit: not the request's outcome
            code = grpc.StatusCode.OK
        self._metrics.observe_request(self._model, self._api, code, seconds)
        end_request_span(self._span, code.name, self._request.version)
        _log_request(code, seconds)
        return False  # the exception, if any, goes on


access_logger = logging.getLogger("snapserve.server.access")


def _log_request(code: grpc.StatusCode, seconds: float) -> None:
    level = logging.DEBUG if code is grpc.StatusCode.OK else logging.INFO
    if access_logger.isEnabledFor(level):  # the common case at INFO: an answer, not logged
        request = current_request()
        api, model, version = ("", "", None) if request is None else (
            request.api, request.model, request.version)
        access_logger.log(level, "%s %s%s: %s in %.2f ms", api, model,
                          "" if version is None else f" version {version}", code.name,
                          seconds * 1000,
                          extra={"status": code.name, "latency_ms": round(seconds * 1000, 3)})


Request = TypeVar("Request")
Answer = TypeVar("Answer")


async def answer_in_order(requests: AsyncIterator[Request],
                          answer: Callable[[Request], Awaitable[Answer]],
                          error_answer: Callable[[Request, grpc.StatusCode, str], Answer],
                          window: int) -> AsyncIterator[Answer]:
    """A stream's answers, in request order. Requests are read ahead and started at once (up to
    `window`), so the requests of one stream share batches. A request that fails gets
    `error_answer(request, code, message)` and the stream goes on; a read error (the client went
    away) is re-raised."""
    stream = current_request()
    parent = None if stream is None else stream.trace_parent

    async def settled(request: Request) -> Answer:
        # In a task of its own (a copy of the stream's context): its own id, the stream's parent.
        with request_context(_request_id(request), parent) as current:
            _answer_with_id(request, current.request_id)
            try:
                return await answer(request)
            except Exception as exc:
                return error_answer(request, *describe_error(exc))

    # At most `window` requests started and not yet answered (the slot is taken before the task
    # is made, and given back once its answer is sent): a bounded queue alone let window + 2 in.
    slots = asyncio.Semaphore(window)
    in_flight: asyncio.Queue[asyncio.Task[Answer] | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                await in_flight.put(asyncio.ensure_future(settled(request)))
        except Exception:
            await in_flight.put(None)  # wake the writer, which re-raises from `await reader`
            raise
        await in_flight.put(None)  # not in a finally: a cancelled reader must not block here

    reader = asyncio.ensure_future(read())
    try:
        while (task := await in_flight.get()) is not None:
            try:
                yield await task
            finally:
                slots.release()
        await reader  # re-raises a read error (e.g. the client went away mid-stream)
    finally:
        reader.cancel()
        while not in_flight.empty():
            task = in_flight.get_nowait()
            if task is not None:
                task.cancel()
