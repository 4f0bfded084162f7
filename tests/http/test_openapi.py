"""The REST API describes itself (GET /v2/openapi.json), and real requests and answers are valid
against that description; /metrics on the REST port says where the metrics are."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import numpy as np
import pytest

from snapserve.server.api.kserve_messages import OUTPUTS
from snapserve.server import RunningServer
from snapserve.server.api.openapi import OPENAPI_PATH
from tests.support.servers import serving


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The document's operation for a concrete path ('/v2/models/digits/infer')."""
    for template, item in document["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method in item:
            return item[method]
    raise AssertionError(f"{method.upper()} {path} is not in the OpenAPI document")


def _validate(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    # The document as the root, so "#/components/schemas/..." references resolve.
    root = {**schema, "components": document["components"]}
    jsonschema.Draft202012Validator(root).validate(instance)


async def _check_call(session: aiohttp.ClientSession, document: dict[str, Any], method: str,
                      path: str, body: Any = None) -> tuple[int, Any]:
    operation = _operation(document, method, path)
    if body is not None:
        _validate(document, operation["requestBody"]["content"]["application/json"]["schema"], body)
    async with session.request(method, path, json=body) as answer:
        status = answer.status
        payload = await answer.json() if answer.content_length else None
    response = operation["responses"].get(str(status))
    assert response is not None, f"{method.upper()} {path} answered {status}, not in the document"
    if "content" in response:
        _validate(document, response["content"]["application/json"]["schema"], payload)
    return status, payload


@pytest.fixture
async def described(rest: RunningServer, session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get(OPENAPI_PATH) as answer:
        assert answer.status == 200
        return await answer.json()


async def test_every_served_route_is_described(rest: RunningServer, described: dict[str, Any]) -> None:
    assert described["openapi"] == "3.1.0"
    assert rest.http is not None
    served = {resource.canonical for resource in rest.http.application().router.resources()}
    assert served - {"/metrics"} == set(described["paths"])
    names = {item["properties"]["name"]["const"] for item in
             described["components"]["schemas"]["InferenceResponse"]["properties"]["outputs"]
             ["items"]["oneOf"]}
    assert names == set(OUTPUTS) >= {"mutual_information", "member_kl"}  # the ensemble's scores


async def test_real_requests_and_answers_match_the_description(
        session: aiohttp.ClientSession, described: dict[str, Any]) -> None:
    x = np.random.default_rng(0).normal(size=(3, 1, 4, 4)).astype(np.float32)
    infer = {"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}]}
    status, answer = await _check_call(session, described, "post", "/v2/models/digits/infer", infer)
    assert status == 200 and {o["name"] for o in answer["outputs"]} >= {"probabilities",
                                                                         "mutual_information"}
    asked = {**infer, "outputs": [{"name": "member_probabilities"}, {"name": "vote_disagreement"}]}
    status, answer = await _check_call(session, described, "post",
                                       "/v2/models/digits/versions/1/infer", asked)
    assert status == 200, answer
    assert [o["name"] for o in answer["outputs"]] == ["member_probabilities", "vote_disagreement"]
    bad = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert (await _check_call(session, described, "post", "/v2/models/digits/infer", bad))[0] == 400
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/digits",
                 "/v2/models/digits/ready", "/v2/models/digits/config", "/v2/models/stats",
                 "/v2/models/nope"):
        await _check_call(session, described, "get", path)
    await _check_call(session, described, "post", "/v2/repository/index", {"ready": True})


async def test_metrics_on_the_rest_port_say_where_they_are(model_repo: Path) -> None:
    async with serving(model_repo, http_port=0, metrics_port=0) as running:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{running.http_port}/metrics") as answer:
                assert answer.status == 404
                message = (await answer.json())["error"]
    assert (f"metrics are not on the REST port: they are served at "
            f"http://127.0.0.1:{running.metrics_port}/metrics") in message
    async with serving(model_repo, http_port=0) as running:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{running.http_port}/metrics") as answer:
                assert answer.status == 404
                assert "they are off on this server (--metrics-port off)" in (await answer.json())["error"]
