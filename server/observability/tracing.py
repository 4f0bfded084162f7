"""OpenTelemetry tracing, when the `tracing` extra is installed (`pip install
snapserve-ensembles[tracing]`); without it every function here returns at once.

One span per inference request (`snapserve.predict`, kind SERVER), a child of the caller's span
when the call's metadata carries W3C trace context (`traceparent`, `tracestate`), with two
children laid out on the request's own timeline: `snapserve.queue` (waiting for its batch) and
`snapserve.compute` (the batch it rode in, whose size is an attribute). The spans go to the global
tracer provider: set one up in the process (`opentelemetry-instrument ensemble-server ...`, or
`trace.set_tracer_provider(...)` before `start_server`); without one they cost next to nothing
(OpenTelemetry's no-op spans).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator, Sequence

try:
    from opentelemetry import propagate, trace
except ImportError:  # the extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

__all__ = ["ENABLED", "active", "end_request_span", "extract_parent", "record_inference",
           "request_span"]

ENABLED = trace is not None
_tracer = trace.get_tracer("snapserve.server") if ENABLED else None  # follows a later provider
_PLACEHOLDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider) if ENABLED else ()


# The provider set_tracer_provider() installed, read from OpenTelemetry's module global:
# get_tracer_provider() also looks an environment variable up on every call, and a request
# checks three times (docs/performance.md, "Second pass"). The public call when that variable
# names a provider (loaded on first use) or a later release moves the global.
_DIRECT = (ENABLED and hasattr(trace, "_TRACER_PROVIDER")
           and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ)


def active() -> bool:
    """Whether spans go anywhere: a tracer provider has been set (its class is not one of
    OpenTelemetry's placeholders). Checked per request, so a provider set after start counts;
    without one, a request skips the no-op span's context managers (1.4% of the event loop's
    time per request, docs/performance.md)."""
    if not ENABLED:
        return False
    provider = trace._TRACER_PROVIDER if _DIRECT else trace.get_tracer_provider()
    return provider is not None and not isinstance(provider, _PLACEHOLDERS)


def extract_parent(metadata: Sequence[tuple[str, Any]] | None) -> Any:
    """The caller's trace context from a call's metadata (None without tracing)."""
    if not active():
        return None
    return propagate.extract({key: value for key, value in metadata or ()
                              if isinstance(value, str)})


@contextlib.contextmanager
def request_span(parent: Any, attributes: dict[str, str]) -> Iterator[Any]:
    """The request's span for the block (None without tracing); failures are the caller's to
    record (`end_request_span`), as a status code rather than an exception."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span("snapserve.predict", context=parent,
                                       kind=trace.SpanKind.SERVER, attributes=attributes,
                                       record_exception=False,
                                       set_status_on_exception=False) as span:
        yield span


def end_request_span(span: Any, code: str, version: int | None) -> None:
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code", code)
    if version is not None:
        span.set_attribute("snapserve.version", version)
    if code != "OK":
        span.set_status(trace.Status(trace.StatusCode.ERROR, code))


def record_inference(request_start_ns: int, compute_start_ns: int, compute_ns: int,
                     batch_examples: int) -> None:
    """The current request's queue wait and its batch's compute, as child spans of its span.
    Times are time.perf_counter_ns(); spans take wall-clock nanoseconds."""
    if _tracer is None or not active():
        return
    parent = trace.get_current_span()
    if not parent.is_recording():
        return
    offset = time.time_ns() - time.perf_counter_ns()
    queue = _tracer.start_span("snapserve.queue", start_time=request_start_ns + offset)
    queue.end(end_time=compute_start_ns + offset)
    compute = _tracer.start_span("snapserve.compute", start_time=compute_start_ns + offset,
                                 attributes={"snapserve.batch_size": batch_examples})
    compute.end(end_time=compute_start_ns + compute_ns + offset)
    parent.set_attributes({"snapserve.queue_ms": (compute_start_ns - request_start_ns) / 1e6,
                           "snapserve.compute_ms": compute_ns / 1e6,
                           "snapserve.batch_size": batch_examples})
