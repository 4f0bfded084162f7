"""From the server's named exceptions to gRPC status codes, in one place, for every service.

`STATUS_CODES` is the one table; `abort_on_error` is the one decorator every handler of both
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

if TYPE_CHECKING:  # only its type: an interceptor needs the codes, not the metrics
    from snapserve.server.metrics import ServerMetrics

__all__ = ["STATUS_CODES", "abort_on_error", "answer_in_order", "describe_error",
           "observed_request", "status_code"]

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


Handler = TypeVar("Handler", bound=Callable[..., Any])


def abort_on_error(handler: Handler) -> Handler:
    """Wrap a servicer method: an exception it raises ends the call with the exception's status
    (STATUS_CODES) and message.

    A unary method is a coroutine function. A method that answers with a stream returns (or
    is) an async iterator of answers; the wrapper relays it and closes it as soon as the call
    ends, so what it still computes (a stream's requests in flight) is cancelled at once.
    """
    if not inspect.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def streaming(self: object, request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
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
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*describe_error(exc))

    return unary  # type: ignore[return-value]


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
    async def settled(request: Request) -> Answer:
        try:
            return await answer(request)
        except Exception as exc:
            return error_answer(request, *describe_error(exc))

    in_flight: asyncio.Queue[asyncio.Task[Answer] | None] = asyncio.Queue(window)

    async def read() -> None:
        try:
            async for request in requests:
                await in_flight.put(asyncio.ensure_future(settled(request)))
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
