"""OpenTelemetry spans of real requests, caught by the SDK's in-memory exporter; and tracing off
when the extra is not installed."""

from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from snapserve.server import RunningServer  # noqa: E402
from tests.support.calls import digits_input, native_stub, predict_request  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (set once; later tests' spans are dropped at shutdown)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


async def test_a_span_per_request_under_the_callers_trace(
        running: RunningServer, spans: InMemorySpanExporter) -> None:
    spans.clear()
    async with native_stub(running) as stub:
        await stub.Predict(predict_request(digits_input(2), request_id="traced"),
                           metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
        with pytest.raises(Exception):
            await stub.Predict(predict_request(digits_input(1), model="nope"))
    by_name: dict[str, list] = {}
    for span in spans.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    ok, failed = sorted(by_name["snapserve.predict"], key=lambda s: s.start_time)
    assert ok.kind is trace.SpanKind.SERVER
    assert format(ok.context.trace_id, "032x") == TRACE_ID  # W3C trace context from the metadata
    assert ok.parent is not None and format(ok.parent.span_id, "016x") == PARENT_ID
    attributes = dict(ok.attributes)
    assert attributes["snapserve.model"] == "digits" and attributes["snapserve.version"] == 1
    assert attributes["snapserve.request_id"] == "traced"
    assert attributes["rpc.grpc.status_code"] == "OK" and attributes["snapserve.batch_size"] == 2
    assert attributes["snapserve.queue_ms"] >= 0 and attributes["snapserve.compute_ms"] > 0
    (queue,), (compute,) = by_name["snapserve.queue"], by_name["snapserve.compute"]
    for child in (queue, compute):
        assert child.parent is not None and child.parent.span_id == ok.context.span_id
        assert ok.start_time <= child.start_time <= child.end_time <= ok.end_time
    assert queue.end_time == compute.start_time and compute.attributes["snapserve.batch_size"] == 2
    assert failed.parent is None  # no traceparent: a trace of its own
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert failed.attributes["rpc.grpc.status_code"] == "NOT_FOUND"


def test_without_the_extra_tracing_is_off() -> None:
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "from snapserve.server.observability import tracing\n"
            "assert not tracing.ENABLED and tracing.extract_parent([('traceparent', 'x')]) is None\n"
            "with tracing.request_span(None, {}) as span: assert span is None\n"
            "tracing.record_inference(0, 1, 1, 1)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
