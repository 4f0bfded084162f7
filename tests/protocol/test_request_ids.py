"""Request ids (taken, or made up, and returned) and the JSON log lines that carry them."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any, Iterator

import grpc
import pytest
import tritonclient.grpc.aio as triton

from snapserve.client import AsyncEnsembleClient, ClientError
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.server import RunningServer
from snapserve.server.observability.logs import configure_logging
from snapserve.server.observability.request_context import request_context
from tests.support.calls import digits_input, native_stub, predict_request

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the server logs during the test, as `--log-format json --log-requests` writes it."""
    stream = io.StringIO()
    root, access = logging.getLogger(), logging.getLogger("snapserve.server.access")
    levels = root.level, access.level
    handler = configure_logging("INFO", "json", log_requests=True, stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(levels[0])
    access.setLevel(levels[1])


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def predict(running: RunningServer, request: pb.PredictRequest,
                  metadata: tuple[tuple[str, str], ...] = ()) -> tuple[pb.PredictResponse, str]:
    async with native_stub(running) as stub:
        call = stub.Predict(request, metadata=metadata)
        response = await call
        trailers = dict(await call.trailing_metadata())
    return response, trailers["x-request-id"]


async def test_the_request_field_wins_then_the_header_then_a_made_up_id(
        running: RunningServer) -> None:
    response, trailer = await predict(running, predict_request(digits_input(1), request_id="mine"),
                                      (("x-request-id", "header"),))
    assert response.request_id == trailer == "mine"
    response, trailer = await predict(running, predict_request(digits_input(1)),
                                      (("x-request-id", "header"),))
    assert response.request_id == trailer == "header"
    response, trailer = await predict(running, predict_request(digits_input(1)))
    assert response.request_id == trailer and GENERATED.fullmatch(trailer)
    # A caller's id cannot forge log lines: control characters and spaces are dropped.
    response, _ = await predict(running, predict_request(digits_input(1),
                                                         request_id="a b\nc" + "x" * 200))
    assert response.request_id == "abc" + "x" * 125


async def test_kserve_echoes_its_id_field(client: triton.InferenceServerClient) -> None:
    x = digits_input(1)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = await client.infer("digits", [tensor], request_id="kserve-7")
    assert result.get_response().id == "kserve-7"
    result = await client.infer("digits", [tensor])
    assert GENERATED.fullmatch(result.get_response().id)


async def test_each_request_of_a_stream_gets_its_own_id(running: RunningServer) -> None:
    requests = [predict_request(digits_input(1), request_id="first"),
                predict_request(digits_input(1)), predict_request(digits_input(1), model="nope")]
    async with native_stub(running) as stub:
        answers = [a async for a in stub.PredictStream(iter(requests))]
    assert answers[0].request_id == "first"
    assert GENERATED.fullmatch(answers[1].request_id)
    assert answers[2].HasField("error") and GENERATED.fullmatch(answers[2].request_id)
    assert answers[1].request_id != answers[2].request_id


async def test_a_failure_names_its_id_to_the_caller_and_in_the_log(
        running: RunningServer, json_log: io.StringIO) -> None:
    async with AsyncEnsembleClient(f"127.0.0.1:{running.port}") as c:
        with pytest.raises(ClientError) as info:
            await c.predict("nope", digits_input(1), request_id="lost-1")
        assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.request_id == "lost-1"
        answer = await c.predict("digits", digits_input(2), request_id="ok-1")
        assert answer.request_id == "ok-1"
    by_id = {line.get("request_id"): line for line in lines(json_log)
             if line["logger"] == "snapserve.server.access"}
    failed = by_id["lost-1"]
    assert failed["level"] == "INFO" and failed["status"] == "NOT_FOUND"
    assert failed["model"] == "nope" and "version" not in failed
    ok = by_id["ok-1"]
    assert ok["level"] == "DEBUG" and ok["status"] == "OK"  # shown by --log-requests
    assert (ok["model"], ok["version"]) == ("digits", 1) and ok["latency_ms"] > 0
    assert ok["message"].startswith("native digits version 1: OK in ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["time"])


def test_text_lines_carry_the_id_too() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", "text", stream=stream)
    try:
        with request_context("abc"):
            logging.getLogger("snapserve.test").warning("inside")
        logging.getLogger("snapserve.test").warning("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("WARNING snapserve.test [abc]: inside")
    assert outside.endswith("WARNING snapserve.test: outside")
