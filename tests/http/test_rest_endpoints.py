"""The KServe v2 REST API driven by the real tritonclient.http (aio, and the blocking client), every
endpoint, JSON and binary tensors; each answer equals the gRPC answer to the same request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http as triton_sync
import tritonclient.http.aio as triton_http
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as tmc
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.utils import InferenceServerException

from snapserve.server import RunningServer
from snapserve.server.config import RepositoryConfig
from tests.support.calls import SCORES, digits_input
from tests.support.servers import ThreadedServer, local_config, serving

HttpClient = triton_http.InferenceServerClient
GrpcClient = triton_grpc.InferenceServerClient


def http_input(x: np.ndarray, binary: bool = True) -> triton_http.InferInput:
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def grpc_input(x: np.ndarray) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def parsed(obj: object, message: object) -> object:
    """A REST answer read into the gRPC message it mirrors (64-bit integers as numbers parse)."""
    return json_format.ParseDict(obj, message)


async def rest_error(call: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        await call  # type: ignore[misc]
    return info.value.status(), info.value.message()


async def grpc_error(call: object) -> str:
    with pytest.raises(InferenceServerException) as info:
        await call  # type: ignore[misc]
    return info.value.message()


async def test_health_and_server_metadata(http_client: HttpClient, grpc_client: GrpcClient) -> None:
    assert await http_client.is_server_live() and await http_client.is_server_ready()
    assert await http_client.is_model_ready("digits")
    assert await http_client.is_model_ready("digits", "1")
    assert not await http_client.is_model_ready("digits", "7")
    assert not await http_client.is_model_ready("nope")
    rest = parsed(await http_client.get_server_metadata(), tpb.ServerMetadataResponse())
    assert rest == await grpc_client.get_server_metadata()
    assert rest.name == "snapserve" and "model_repository" in rest.extensions


async def test_model_metadata_and_config_equal_the_grpc_answers(http_client: HttpClient,
                                                                grpc_client: GrpcClient) -> None:
    for model in ("digits", "tiny"):
        metadata = await http_client.get_model_metadata(model)
        assert parsed(metadata, tpb.ModelMetadataResponse()) == \
            await grpc_client.get_model_metadata(model)
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32",
                                       "shape": [-1, 1, 4, 4] if model == "digits" else [-1, 3]}]
        config = await http_client.get_model_config(model, "1")  # the config itself, as Triton's
        assert parsed(config, tmc.ModelConfig()) == (await grpc_client.get_model_config(model)).config
    assert (await http_client.get_model_config("tiny"))["max_batch_size"] == 8
    status, message = await rest_error(http_client.get_model_metadata("nope"))
    assert status == "404"
    assert message == await grpc_error(grpc_client.get_model_metadata("nope"))
    status, message = await rest_error(http_client.get_model_metadata("digits", "x1"))
    assert status == "400" and message == await grpc_error(grpc_client.get_model_metadata("digits", "x1"))


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [None, True, False], ids=["default-out", "binary-out", "json-out"])
async def test_infer_equals_grpc_in_every_mode(http_client: HttpClient, grpc_client: GrpcClient,
                                               binary_in: bool, binary_out: bool | None) -> None:
    x = digits_input(3, seed=4)
    # No outputs named: tritonclient asks for every default output in binary (binary_data_output).
    outputs = None if binary_out is None else [
        triton_http.InferRequestedOutput(name, binary_data=binary_out) for name in SCORES]
    rest = await http_client.infer("digits", [http_input(x, binary_in)], outputs=outputs)
    grpc = await grpc_client.infer("digits", [grpc_input(x)])
    answer = rest.get_response()
    assert [o["name"] for o in answer["outputs"]] == list(SCORES)
    assert (answer["model_name"], answer["model_version"]) == ("digits", "1")
    binary = binary_out is not False
    assert all(("data" in o) != binary for o in answer["outputs"])
    for name in SCORES:
        got, expected = rest.as_numpy(name), grpc.as_numpy(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert np.array_equal(got, expected), name  # the same math path, to the last bit


async def test_outputs_named_come_in_their_order_some_binary_some_json(http_client: HttpClient,
                                                                       grpc_client: GrpcClient) -> None:
    x = digits_input(2, seed=5)
    named = [triton_http.InferRequestedOutput("member_probabilities", binary_data=False),
             triton_http.InferRequestedOutput("vote_disagreement", binary_data=True),
             triton_http.InferRequestedOutput("probabilities", binary_data=False)]
    rest = await http_client.infer("digits", [http_input(x)], outputs=named, request_id="req-7")
    answer = rest.get_response()
    assert [o["name"] for o in answer["outputs"]] == ["member_probabilities", "vote_disagreement",
                                                      "probabilities"]
    assert ["data" in o for o in answer["outputs"]] == [True, False, True]
    assert answer["id"] == "req-7"
    grpc = await grpc_client.infer("digits", [grpc_input(x)], outputs=[
        triton_grpc.InferRequestedOutput(n) for n in ("member_probabilities", "vote_disagreement",
                                                      "probabilities")])
    for name in ("member_probabilities", "vote_disagreement", "probabilities"):
        assert np.array_equal(rest.as_numpy(name), grpc.as_numpy(name)), name
    assert rest.as_numpy("member_probabilities").shape == (2, 3, 5)
    default = (await http_client.infer("digits", [http_input(x)])).get_response()
    assert "member_probabilities" not in [o["name"] for o in default["outputs"]]


async def test_versions_statistics_and_metrics(rest: RunningServer, http_client: HttpClient,
                                               grpc_client: GrpcClient) -> None:
    x = digits_input(2, seed=6)
    assert (await http_client.infer("digits", [http_input(x)], model_version="1")
            ).get_response()["model_version"] == "1"
    await http_client.infer("digits", [http_input(x, binary=False)])
    status, message = await rest_error(http_client.infer("digits", [http_input(x)], model_version="7"))
    assert status == "404"
    assert message == await grpc_error(grpc_client.infer("digits", [grpc_input(x)], model_version="7"))
    stats = await http_client.get_inference_statistics("digits")
    assert parsed(stats, tpb.ModelStatisticsResponse()) == \
        await grpc_client.get_inference_statistics("digits")
    model = stats["model_stats"][0]
    assert (model["name"], model["inference_count"]) == ("digits", 4)
    assert model["inference_stats"]["success"]["count"] == 2
    every = await http_client.get_inference_statistics()
    assert [m["name"] for m in every["model_stats"]] == ["digits", "tiny"]
    samples = rest.metrics.registry.get_sample_value
    assert samples("snapserve_inference_requests_total",
                   {"model": "digits", "api": "http", "code": "OK"}) == 2
    assert samples("snapserve_inference_requests_total",
                   {"model": "digits", "api": "http", "code": "NOT_FOUND"}) == 1


async def test_repository_index_and_control_are_refused_without_the_flag(
        http_client: HttpClient, grpc_client: GrpcClient) -> None:
    index = await http_client.get_model_repository_index()
    assert parsed({"models": index}, tpb.RepositoryIndexResponse()) == \
        await grpc_client.get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in index] == \
        [("digits", "1", "READY"), ("tiny", "1", "READY")]
    status, message = await rest_error(http_client.unload_model("digits"))
    assert status == "403" and "--allow-repository-control" in message
    assert message == await grpc_error(grpc_client.unload_model("digits"))
    assert await http_client.is_model_ready("digits")


async def test_repository_load_and_unload_with_the_flag(model_repo: Path) -> None:
    async with serving(model_repo, http_port=0,
                       repository=RepositoryConfig(allow_repository_control=True)) as running:
        async with triton_http.InferenceServerClient(f"127.0.0.1:{running.http_port}") as client:
            x = digits_input(1)
            await client.unload_model("digits")
            assert not await client.is_model_ready("digits")
            status, _ = await rest_error(client.infer("digits", [http_input(x)]))
            assert status == "404"
            index = {(m["name"], m["state"]) for m in await client.get_model_repository_index()}
            assert ("digits", "UNAVAILABLE") in index
            await client.load_model("digits")
            assert await client.is_model_ready("digits")
            assert (await client.infer("digits", [http_input(x)])).as_numpy("probabilities").shape == (1, 5)
            status, message = await rest_error(client.load_model("digits", config="{}"))
            assert status == "400" and "not supported" in message
            status, _ = await rest_error(client.load_model("nope"))
            assert status == "404"


def test_the_blocking_tritonclient_http_works_too(model_repo: Path) -> None:
    """tritonclient.http itself (geventhttpclient), against a server on its own thread."""
    server = ThreadedServer(local_config(model_repo, http_port=0))
    try:
        client = triton_sync.InferenceServerClient(f"127.0.0.1:{server.running.http_port}")
        assert client.is_server_ready() and client.is_model_ready("tiny")
        x = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]], dtype=np.float32)
        for binary in (True, False):
            tensor = triton_sync.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            outputs = [triton_sync.InferRequestedOutput("probabilities", binary_data=binary)]
            probabilities = client.infer("tiny", [tensor], outputs=outputs).as_numpy("probabilities")
            assert probabilities.shape == (2, 2)
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
        assert client.get_model_metadata("tiny")["platform"] == "snapserve_ensemble"
        client.close()
    finally:
        server.stop()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
async def test_compressed_request_bodies_are_read(http_client: HttpClient, grpc_client: GrpcClient,
                                                  algorithm: str) -> None:
    """tritonclient's request_compression_algorithm: the body arrives compressed (Content-Encoding)."""
    x = digits_input(2, seed=8)
    rest = await http_client.infer("digits", [http_input(x)], request_compression_algorithm=algorithm,
                                   response_compression_algorithm=algorithm)
    grpc = await grpc_client.infer("digits", [grpc_input(x)])
    assert np.array_equal(rest.as_numpy("probabilities"), grpc.as_numpy("probabilities"))
