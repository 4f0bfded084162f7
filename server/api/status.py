"""From the server's named exceptions to status codes, in one place, for every service.

`STATUS_CODES` is the one table (exception -> gRPC code); `HTTP_STATUS` pairs each gRPC code
with its HTTP status, so the REST front end (api/http.py) answers every error with the status
its gRPC code implies and the same message (`describe_http_error`). `abort_on_error` is the one
decorator every gRPC handler wears (native in service.py, KServe v2 in kserve.py), so a handler
only decodes, calls and encodes; it opens the call's request context and echoes its id.
Streams answer a failed request with an error answer instead (api/streams.py), and the
interceptors refuse calls with the same codes (`status_code`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any, AsyncIterator, Callable, TypeVar

import grpc

from snapserve.proto.tensors import TensorError
from snapserve.server.errors import (BatcherClosed, ConfigError, InferenceError, InvalidInput,
                                     InvalidModelName, ItemExpired, ItemTooLarge, MalformedRequest,
                                     ModelNotFound, ModelRefusedInput, NoLoadableVersion,
                                     NonFiniteOutput, Overloaded, QueueFull, RepositoryControlDenied,
                                     ShuttingDown, Unauthenticated, VersionNotFound)
from snapserve.server.observability.request_context import (REQUEST_ID_KEY, metadata_value,
                                                            open_request)
from snapserve.server.observability.tracing import extract_parent

__all__ = ["HTTP_STATUS", "STATUS_CODES", "abort_on_error", "answer_with_id", "describe_error",
           "describe_http_error", "http_status", "request_id_of", "status_code"]

logger = logging.getLogger(__name__)

STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    VersionNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    # The model failed on this request's values alone (its batch re-run apart), or its output
    # was NaN/Inf: the request is refused, the rest of its batch answered (models/bisection.py).
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
        return code, _cut(f"internal error: {type(exc).__name__}: {exc}")
    return code, _cut(str(exc))


# Messages echo what the client sent (a model name, a version): a 100 KB name would make a
# status past gRPC's 16 KiB metadata limit, which the client sees as RESOURCE_EXHAUSTED.
MAX_MESSAGE_CHARS = 2048


def _cut(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... [{len(message)} characters, cut]"


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
    async def unary(self: object, request: Any, context: grpc.aio.ServicerContext,
                    *args: Any) -> Any:
        # Opened for the rest of the call's task (grpc.aio runs each call in a task of its own,
        # with its own copy of the context), so nothing needs resetting: no context manager on
        # the per-request path.
        metadata = context.invocation_metadata()
        current = open_request(request_id_of(request) or metadata_value(metadata, REQUEST_ID_KEY),
                               extract_parent(metadata))
        answer_with_id(request, current.request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, current.request_id),))
        try:
            return await handler(self, request, context, *args)
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


def request_id_of(request: Any) -> str:
    """The id an inference request carries in its id field ("" for other messages)."""
    field = _id_field(request)
    return "" if field is None else getattr(request, field)


def answer_with_id(request: Any, request_id: str) -> None:
    """Write the request's effective id (cleaned, or made up) into its id field, which every
    encoder copies into the answer: the caller gets back the id the logs use."""
    field = _id_field(request)
    if field is not None:
        setattr(request, field, request_id)
