"""The one inference pipeline every transport calls: admit -> decode -> resolve -> submit -> encode.

A transport (native gRPC in service.py, KServe v2 gRPC in kserve.py, REST in http.py) takes an
intake ticket when a request's bytes arrive (api/intake.py), parses them, and hands the pipeline
an `InferRequest`: the parsed message, the transport's decoder and encoder, the ticket. The
pipeline observes the request (metrics, span, access log), resolves the model version, decodes
the input against that version's spec (on a decode thread when large), gives the ticket back as
the request joins the batcher's queue, submits it to the version (`submit`, which re-sends a
request whose version a hot reload retired on the way) and encodes the scores. The request and
its ticket are values passed along: nothing is left in context variables for a servicer to
remember.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, TypeVar

import grpc
import numpy as np

from snapserve.proto.scores import EnsembleScores
from snapserve.server.api.intake import OFFLOAD_BYTES, Intake, Ticket
from snapserve.server.api.status import status_code
from snapserve.server.errors import BatcherClosed, InvalidInput
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.registry import ModelRegistry
from snapserve.server.observability import tracing
from snapserve.server.observability.request_context import (RequestContext, current_request,
                                                            loggable, request_context)
from snapserve.server.observability.tracing import end_request_span, request_span

if TYPE_CHECKING:  # only its type: the pipeline reports to the metrics it is given
    from snapserve.server.observability.metrics import ServerMetrics

__all__ = ["DataPlane", "InferRequest", "observed_request", "parse_version", "submit"]

logger = logging.getLogger(__name__)

Message = TypeVar("Message")
Answer = TypeVar("Answer")


def parse_version(text: str, field: str = "model_version") -> int:
    """"" -> 0 (the default version); "3" -> 3; anything else is InvalidInput."""
    if text == "":
        return 0
    # Cut before int(): a version is an int64, and int() refuses (ValueError) past 4,300 digits.
    if (len(text) > 19 or not text.isascii() or not text.isdigit() or text.startswith("0")
            or int(text) >= 2**63):
        raise InvalidInput(f"{field} {text[:40]!r}{'...' if len(text) > 40 else ''} is not a "
                           "version: expected a positive integer below 2**63 such as '2', or "
                           "'' for the default (newest) version")
    return int(text)


class InferRequest(Generic[Message]):
    """One inference request as the transport hands it over.

    `version` is a number (0: the default) or, from the KServe protocols, its text, parsed
    inside the observed request so that a bad one is counted like any other refusal.
    `decode(message, served)` is the input array checked against that version (InvalidInput
    otherwise); `nbytes` is what decoding reads, for the choice of a decode thread. `ticket`,
    when the transport holds one, is given back as the request joins the batcher's queue.
    """

    __slots__ = ("model", "version", "request_id", "message", "decode", "nbytes", "timeout",
                 "ticket")

    def __init__(self, model: str, version: int | str, request_id: str, message: Message,
                 decode: Callable[[Message, ServedEnsemble], np.ndarray], nbytes: int,
                 timeout: float | None, ticket: Ticket | None = None) -> None:
        self.model, self.version, self.request_id, self.message = model, version, request_id, message
        self.decode, self.nbytes, self.timeout, self.ticket = decode, nbytes, timeout, ticket


Encode = Callable[["EnsembleScores", ServedEnsemble, InferRequest[Message]], Answer]


class DataPlane:
    """The pipeline, shared by the transports of one server (one registry, one intake)."""

    def __init__(self, registry: ModelRegistry, intake: Intake, metrics: ServerMetrics) -> None:
        self.registry = registry
        self.intake = intake
        self.metrics = metrics

    async def infer(self, request: InferRequest[Message], encode: Encode[Message, Answer],
                    api: str) -> Answer:
        """The encoded answer to one request; `api` labels it in the metrics. Named exceptions
        for failures (api/status.py maps them for each transport)."""
        with observed_request(self.metrics, request.model, api):
            version = request.version
            if type(version) is str:
                version = parse_version(version)
            served = self.registry.get(request.model, version)
            # A small payload decodes here: not even the coroutine of intake.run.
            x = (request.decode(request.message, served) if request.nbytes < OFFLOAD_BYTES
                 else await self.intake.run(request.nbytes, request.decode, request.message,
                                            served))
            if request.ticket is not None:
                request.ticket.queued()
            served, scores = await submit(self.registry, served, version, x, request.timeout)
            return encode(scores, served, request)


async def submit(registry: ModelRegistry, served: ServedEnsemble, version: int, x: np.ndarray,
                 timeout: float | None = None) -> tuple[ServedEnsemble, EnsembleScores]:
    """The version that answered and its scores for x, sent to `served`: what
    `registry.get(name, version)` gave this request (its input spec decoded x).

    A request that picked a version just before a hot reload retired it finds that version's
    batcher closed; it is sent once more, to what now serves the same name and `version`
    (0: the default), so a reload fails no request. BatcherClosed stands when nothing replaced
    it (the server is stopping); NOT_FOUND when the model went away meanwhile.
    """
    try:
        return served, await served.predict(x, timeout=timeout)
    except BatcherClosed:
        replacement = registry.get(served.name, version)
        if replacement is served:
            raise
        logger.debug("%s version %d was retired while a request was on its way; sending it to "
                     "version %d", served.name, served.version, replacement.version)
        return replacement, await replacement.predict(x, timeout=timeout)


# -- what every request reports: metrics, span, access log ----------------------------------------

def observed_request(metrics: ServerMetrics, model: str, api: str
                     ) -> contextlib.AbstractContextManager[None]:
    """One inference request, for any transport: counted by its outcome's status code and timed,
    traced (a span when tracing is on), and logged on `snapserve.server.access` (failures at
    INFO, answers at DEBUG), each under the current request's id (one is opened if none is)."""
    request = current_request()
    if request is None or tracing.active():
        return _traced_request(metrics, request, model, api)
    # Every call already has its request context (abort_on_error, the REST handler) and,
    # without a tracer provider, a span goes nowhere: no ExitStack, no span, no generator.
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
        access_logger.log(level, "%s %s%s: %s in %.2f ms", api, loggable(model),
                          "" if version is None else f" version {version}", code.name,
                          seconds * 1000,
                          extra={"status": code.name, "latency_ms": round(seconds * 1000, 3)})
