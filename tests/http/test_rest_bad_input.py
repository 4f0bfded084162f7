"""Hand-written (curl-style) REST requests: JSON data flat and nested, every bad input with its
status and `{"error": ...}` body (the gRPC message where gRPC has the same check), overload and
deadlines; the server keeps answering good requests throughout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from snapserve.server import BatcherConfig, RunningServer
from tests.support.calls import digits_input
from tests.support.models import reference_member_probs
from tests.support.servers import serving
from tests.support.waiting import eventually

INFER = "/v2/models/digits/infer"
BINARY_HEADER = "Inference-Header-Content-Length"


def tensor(x: Any, shape: list[int] | None = None, datatype: str = "FP32",
           name: str = "input") -> dict[str, Any]:
    data = x.tolist() if isinstance(x, np.ndarray) else x
    return {"name": name, "datatype": datatype,
            "shape": list(np.shape(x)) if shape is None else shape, "data": data}


def body(*inputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **fields}


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {BINARY_HEADER: str(len(head))}


async def post(session: aiohttp.ClientSession, payload: Any, path: str = INFER,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with session.post(path, data=data, headers=headers) as response:
        return response.status, json.loads(await response.read() or b"{}")


async def assert_still_serving(running: RunningServer, session: aiohttp.ClientSession) -> None:
    x = digits_input(2, seed=11)
    status, answer = await post(session, body(tensor(x), outputs=[{"name": "probabilities"}]))
    assert status == 200, answer
    probabilities = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(2, 5)
    expected = reference_member_probs(running.config.model_repository / "digits" / "1", x)
    np.testing.assert_allclose(probabilities, expected.mean(axis=1), rtol=1e-5, atol=1e-6)


async def test_json_data_flat_and_nested_give_the_same_answer(rest: RunningServer,
                                                              session: aiohttp.ClientSession) -> None:
    x = digits_input(3, seed=2)
    nested = await post(session, body(tensor(x)))
    flat = await post(session, body(tensor(x.ravel().tolist(), shape=list(x.shape))))
    half = await post(session, body(tensor(x.reshape(3, 16).tolist(), shape=list(x.shape))))
    assert nested[0] == flat[0] == half[0] == 200
    assert nested[1]["outputs"] == flat[1]["outputs"] == half[1]["outputs"]
    probabilities = nested[1]["outputs"][0]
    assert (probabilities["name"], probabilities["shape"]) == ("probabilities", [3, 5])
    assert nested[1]["id"]  # every answer carries its request id (made up when none was sent)
    # FP64 and integer data into the FP32 model are converted, as on gRPC.
    as_fp64 = await post(session, body(tensor(x.astype(np.float64), datatype="FP64")))
    assert as_fp64[0] == 200 and as_fp64[1]["outputs"] == nested[1]["outputs"]
    await assert_still_serving(rest, session)


async def test_a_request_id_comes_back_in_the_body_and_the_header(session: aiohttp.ClientSession
                                                                 ) -> None:
    x = digits_input(1)
    async with session.post(INFER, json=body(tensor(x), id="mine-1")) as response:
        assert response.headers["x-request-id"] == "mine-1"
        assert (await response.json())["id"] == "mine-1"
    async with session.post(INFER, json=body(tensor(x)), headers={"x-request-id": "hdr-2"}) as response:
        assert (await response.json())["id"] == response.headers["x-request-id"] == "hdr-2"


X = digits_input(1).tolist()
HEADER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                      "parameters": {"binary_data_size": 64}}]}
BAD: dict[str, tuple[Any, dict[str, str] | None, int, str]] = {
    "not JSON": (b"{nope", None, 400, "the request body is not valid JSON"),
    "NaN is not JSON": (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], '
                        b'"data": [NaN]}]}', None, 400, "is not valid JSON"),
    "not an object": (b"[1, 2]", None, 400, "the request body must be a JSON object"),
    "no inputs": ({}, None, 400, "inputs must be a JSON array"),
    "data count": (body(tensor(list(range(15)), shape=[1, 1, 4, 4])), None, 400,
                   "input 'input' data holds 15 values; shape [1, 1, 4, 4] needs 16"),
    "ragged data": (body(tensor([[1.0, 2.0], [3.0]], shape=[1, 1, 4, 4])), None, 400,
                    "input 'input' data is not a flat or evenly nested array of numbers"),
    "strings": (body(tensor(["a"] * 16, shape=[1, 1, 4, 4])), None, 400,
                "data holds values that are not numbers; datatype FP32 takes numbers"),
    "booleans into FP32": (body(tensor([True] * 16, shape=[1, 1, 4, 4])), None, 400,
                           "data holds booleans; datatype FP32 takes numbers"),
    # The declared datatype is checked against the model's before the data is read.
    "INT64 into a float model": (body(tensor([0.5] * 16, shape=[1, 1, 4, 4], datatype="INT64")),
                                 None, 400, "input dtype int64 is not accepted; the model takes "
                                            "float32"),
    "beyond FP32": (body(tensor([1e39] * 16, shape=[1, 1, 4, 4])), None, 400,
                    "data has values outside FP32's range"),
    "BYTES": (body(tensor(["a"], shape=[1], datatype="BYTES")), None, 400,
              "input 'input' datatype 'BYTES' is not supported"),
    "negative shape": (body(tensor([], shape=[-1, 1, 4, 4])), None, 400, "has a negative dimension"),
    "shape of strings": (body(tensor([1.0], shape=["1"])), None, 400,
                         "input 'input' shape must be a list of integers"),
    "no data": (body({"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4]}), None, 400,
                "has neither data nor parameters.binary_data_size"),
    "bad timeout": (body(tensor(X), parameters={"timeout": -5}), None, 400,
                    "parameters.timeout must be a positive number of microseconds"),
    "outputs not a list": (body(tensor(X), outputs={"name": "probabilities"}), None, 400,
                           "outputs must be a JSON array"),
    "header length not a number": (binary_body(HEADER, bytes(64))[0], {BINARY_HEADER: "x"}, 400,
                                   "Inference-Header-Content-Length 'x' is not a byte count"),
    "header length past the body": (b"{}", {BINARY_HEADER: "99"}, 400,
                                    "Inference-Header-Content-Length is 99 but the body has only 2"),
    "binary past the body": (*binary_body(HEADER, bytes(60)), 400,
                             "binary_data_size 64 runs past the body's 60 bytes"),
    "binary left over": (*binary_body(HEADER, bytes(72)), 400,
                         "8 bytes of binary tensor data that no input's binary_data_size accounts for"),
    "binary size for another shape": (*binary_body(
        {"inputs": [{**HEADER["inputs"][0], "parameters": {"binary_data_size": 60}}]}, bytes(60)),
        400, "input 'input' raw contents hold 60 bytes; expected 64"),
    "NaN in binary": (*binary_body(HEADER, np.full(16, np.nan, np.float32).tobytes()), 400,
                      "input holds 16 non-finite values (NaN or Inf)"),
    # The protocol's own checks, after the REST decoding: the gRPC messages (next test).
    "wrong shape": (body(tensor(list(range(16)), shape=[1, 16])), None, 400,
                    "input shape [1, 16] does not match the model's [-1, 1, 4, 4]"),
    "empty batch": (body(tensor([], shape=[0, 1, 4, 4])), None, 400, "input batch is empty"),
    "batch too large": (body(tensor(digits_input(9))), None, 400,
                        "exceeds the server's max batch size 8"),
    "wrong input name": (body(tensor(X, name="pixels")), None, 400,
                         "the model takes one input named 'input'"),
    "two inputs": (body(tensor(X), tensor(X, name="extra")), None, 400,
                   "the request has inputs ['input', 'extra']"),
    "unknown output": (body(tensor(X), outputs=[{"name": "logits"}]), None, 400,
                       "unknown output 'logits'; outputs are probabilities"),
    "output twice": (body(tensor(X), outputs=[{"name": "probabilities"}] * 2), None, 400,
                     "output 'probabilities' is asked for twice"),
    "classification": (body(tensor(X), outputs=[{"name": "probabilities",
                                                 "parameters": {"classification": 2}}]),
                       None, 400, "the classification extension is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_every_bad_input_gets_400_with_an_error_body(rest: RunningServer,
                                                           session: aiohttp.ClientSession,
                                                           case: str) -> None:
    payload, headers, status, message = BAD[case]
    got, answer = await post(session, payload, headers=headers)
    assert got == status and list(answer) == ["error"], answer
    assert message in answer["error"], answer["error"]
    await assert_still_serving(rest, session)


PATHS = {
    "unknown model": ("POST", "/v2/models/nope/infer", 404, "model 'nope' is not served; models: digits, tiny"),
    "unknown version": ("POST", "/v2/models/digits/versions/7/infer", 404,
                        "model 'digits' has no version 7"),
    "malformed version": ("POST", "/v2/models/digits/versions/v2/infer", 400,
                          "model_version 'v2' is not a version"),
    "unknown metadata": ("GET", "/v2/models/nope", 404, "model 'nope' is not served"),
    "not ready": ("GET", "/v2/models/nope/ready", 503, "model 'nope' is not ready"),
    "wrong method": ("GET", INFER, 405, "GET is not allowed on /v2/models/digits/infer; use POST"),
    "no such endpoint": ("GET", "/v1/models", 404, "no endpoint /v1/models"),
    "shared memory": ("GET", "/v2/systemsharedmemory/status", 404, "no endpoint"),
}


@pytest.mark.parametrize("case", list(PATHS))
async def test_unknown_models_versions_and_paths(rest: RunningServer, session: aiohttp.ClientSession,
                                                 case: str) -> None:
    method, path, status, message = PATHS[case]
    async with session.request(method, path, json=body(tensor(X))) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert message in (await response.json())["error"]
    await assert_still_serving(rest, session)


SAME_AS_GRPC = {"wrong shape": digits_input(1).reshape(1, 16), "batch too large": digits_input(9),
                "int32": np.ones((1, 1, 4, 4), np.int32),
                "NaN": np.full((1, 1, 4, 4), np.nan, np.float32)}


@pytest.mark.parametrize("case, binary", [(case, binary) for case in SAME_AS_GRPC
                                           for binary in (True, False)
                                           if binary or case != "NaN"])  # JSON has no NaN
async def test_refusals_say_what_grpc_says(http_client: triton_http.InferenceServerClient,
                                           grpc_client: triton_grpc.InferenceServerClient,
                                           case: str, binary: bool) -> None:
    x = SAME_AS_GRPC[case]
    datatype = "INT32" if x.dtype == np.int32 else "FP32"
    rest_input = triton_http.InferInput("input", list(x.shape), datatype)
    rest_input.set_data_from_numpy(x, binary_data=binary)
    grpc_input = triton_grpc.InferInput("input", list(x.shape), datatype)
    grpc_input.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as over_rest:
        await http_client.infer("digits", [rest_input])
    with pytest.raises(InferenceServerException) as over_grpc:
        await grpc_client.infer("digits", [grpc_input])
    assert over_rest.value.status() == "400"
    assert over_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert over_rest.value.message() == over_grpc.value.message()


async def test_a_body_over_the_limit_gets_413(model_repo: Path) -> None:
    async with serving(model_repo, http_port=0, max_message_bytes=4096) as running, \
            aiohttp.ClientSession(f"http://127.0.0.1:{running.http_port}") as session:
        status, answer = await post(session, b"{" + b" " * 5000 + b"}")
        assert status == 413
        assert answer["error"] == ("the request body is larger than this server's limit of 4096 "
                                   "bytes (--max-message-mb)")
        await assert_still_serving(running, session)


async def test_a_full_queue_gets_429_and_a_passed_timeout_504(model_repo: Path) -> None:
    slow = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.5, max_queue_size=1,
                         adaptive_wait=False)
    async with serving(model_repo, http_port=0, batcher=slow) as running, \
            aiohttp.ClientSession(f"http://127.0.0.1:{running.http_port}") as session:
        first = asyncio.ensure_future(post(session, body(tensor(X))))
        batcher = running.registry.get("digits").batcher
        await eventually(lambda: batcher.queued == 1, "the first request queued, waiting for company")
        status, answer = await post(session, body(tensor(X)))
        assert status == 429 and "queue is full" in answer["error"], answer
        assert (await first)[0] == 200
        started = asyncio.get_running_loop().time()
        status, answer = await post(session, body(tensor(X), parameters={"timeout": 100_000}))
        assert status == 504, answer
        assert answer["error"] == "the request's timeout of 100 ms passed before it was answered"
        assert asyncio.get_running_loop().time() - started < 0.4  # told at the deadline
        await eventually(lambda: batcher.queued == 0, "the abandoned request out of the queue")
        assert (await post(session, body(tensor(X))))[0] == 200
