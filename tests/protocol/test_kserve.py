"""inference.GRPCInferenceService driven by the real tritonclient (grpc.aio), every RPC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as triton
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from snapserve.server import RunningServer

from tests.support.calls import SCORES, digits_input, native_predict, native_stub, triton_client
from tests.support.models import DIGITS_SHAPE, write_int_model, write_repository
from tests.support.servers import serving

Client = triton.InferenceServerClient

# The tests share one server (`running`, `client` below) in one event loop: they only send
# requests and read answers. The ones that count requests or change the repository start their own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    async with serving(write_repository(tmp_path_factory.mktemp("models")), metrics_port=0) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(running: RunningServer) -> AsyncIterator[Client]:
    async with triton_client(running) as c:
        yield c


def infer_input(x: np.ndarray, datatype: str = "FP32", name: str = "input") -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


async def status_of(call: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        await call  # type: ignore[misc]
    return info.value.status(), info.value.message()


async def test_liveness_readiness_and_server_metadata(client: Client) -> None:
    assert await client.is_server_live()
    assert await client.is_server_ready()
    assert await client.is_model_ready("digits")
    assert await client.is_model_ready("digits", "1")
    assert not await client.is_model_ready("digits", "7")
    assert not await client.is_model_ready("nope")
    metadata = await client.get_server_metadata()
    assert metadata.name == "snapserve"
    assert {"model_repository", "model_configuration", "statistics"} <= set(metadata.extensions)


async def test_model_metadata_lists_every_output_with_shape_and_datatype(client: Client) -> None:
    metadata = await client.get_model_metadata("digits")
    assert (metadata.name, list(metadata.versions), metadata.platform) == \
        ("digits", ["1"], "snapserve_ensemble")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == \
        [("input", "FP32", [-1, *DIGITS_SHAPE])]
    assert {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs} == {
        "probabilities": ("FP32", [-1, 5]), "predictive_entropy": ("FP32", [-1]),
        "expected_entropy": ("FP32", [-1]), "mutual_information": ("FP32", [-1]),
        "vote_disagreement": ("FP32", [-1]), "member_kl": ("FP32", [-1, 3]),
        "member_top_class": ("INT64", [-1, 3]), "member_probabilities": ("FP32", [-1, 3, 5]),
        "members_evaluated": ("INT32", [-1])}
    status, message = await status_of(client.get_model_metadata("nope"))
    assert status == "StatusCode.NOT_FOUND" and "model 'nope' is not served" in message
    status, _ = await status_of(client.get_model_metadata("digits", "x1"))
    assert status == "StatusCode.INVALID_ARGUMENT"


async def test_model_config_describes_batching_and_tensors(client: Client) -> None:
    config = (await client.get_model_config("tiny")).config
    assert (config.name, config.max_batch_size, config.backend) == ("tiny", 8, "onnxruntime")
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3])]
    assert {o.name: list(o.dims) for o in config.output}["member_probabilities"] == [2, 2]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.version_policy.HasField("latest")
    assert json.loads(config.parameters["classes"].string_value) == ["no", "yes"]
    assert config.parameters["method"].string_value == "fge"
    as_json = await client.get_model_config("tiny", as_json=True)  # through MessageToJson
    assert as_json["config"]["name"] == "tiny"


async def test_raw_input_equals_the_native_api(running: RunningServer, client: Client) -> None:
    x = digits_input(5, seed=3)
    result = await client.infer("digits", [infer_input(x)], request_id="r-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("digits", "1", "r-1")
    assert [o.name for o in response.outputs] == list(SCORES)  # the default set
    async with native_stub(running) as stub:
        native = await native_predict(stub, x)
    for name in SCORES:
        np.testing.assert_allclose(result.as_numpy(name), native[name], rtol=1e-6, atol=1e-7)
    assert result.as_numpy("member_top_class").dtype == np.int64


async def test_named_outputs_only_those_member_probabilities_on_request(client: Client) -> None:
    x = digits_input(2, seed=4)
    outputs = [triton.InferRequestedOutput("member_probabilities"),
               triton.InferRequestedOutput("mutual_information")]
    result = await client.infer("digits", [infer_input(x)], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == \
        ["member_probabilities", "mutual_information"]
    members = result.as_numpy("member_probabilities")
    assert members.shape == (2, 3, 5)
    np.testing.assert_allclose(members.sum(axis=-1), 1, rtol=1e-5)
    status, message = await status_of(client.infer(
        "digits", [infer_input(x)], outputs=[triton.InferRequestedOutput("top_label")]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown output 'top_label'" in message
    status, message = await status_of(client.infer(
        "digits", [infer_input(x)], outputs=[triton.InferRequestedOutput("probabilities", 2)]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "classification" in message


async def test_typed_contents_equal_raw(running: RunningServer, client: Client) -> None:
    x = digits_input(3, seed=5)
    raw = await client.infer("digits", [infer_input(x)])
    request = tpb.ModelInferRequest(model_name="digits", id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = tpb_grpc.GRPCInferenceServiceStub(channel)
        typed = triton.InferResult(await stub.ModelInfer(request))
    for name in SCORES:
        np.testing.assert_allclose(typed.as_numpy(name), raw.as_numpy(name), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("datatype", ["FP16", "FP64"])
async def test_other_float_widths_are_converted(running: RunningServer, client: Client,
                                                datatype: str) -> None:
    x = digits_input(2, seed=6).astype(np.float16 if datatype == "FP16" else np.float64)
    result = await client.infer("digits", [infer_input(x, datatype)])
    async with native_stub(running) as stub:
        native = await native_predict(stub, x.astype(np.float32))
    np.testing.assert_allclose(result.as_numpy("probabilities"), native["probabilities"], rtol=1e-6)


async def test_int_inputs_widen_into_an_int_model_and_are_refused_by_a_float_one(
        model_repo: Path) -> None:
    write_int_model(model_repo)
    x = np.array([[1, 2, 3], [0, -4, 7]], np.int32)
    async with serving(model_repo) as running, triton_client(running) as client:
        raw = await client.infer("counts", [infer_input(x, "INT32")])
        request = tpb.ModelInferRequest(model_name="counts")
        tensor = request.inputs.add(name="input", datatype="INT32", shape=x.shape)
        tensor.contents.int_contents.extend(x.ravel().tolist())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            typed = triton.InferResult(
                await tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request))
        async with native_stub(running) as stub:
            native = await native_predict(stub, x.astype(np.int64), model="counts")
        for result in (raw, typed):
            np.testing.assert_allclose(result.as_numpy("probabilities"), native["probabilities"])
        status, message = await status_of(client.infer(
            "digits", [infer_input(np.zeros((1, *DIGITS_SHAPE), np.int32), "INT32")]))
        assert status == "StatusCode.INVALID_ARGUMENT"
        assert "input dtype int32 is not accepted; the model takes float32" in message


@pytest.mark.parametrize("case, expected", [
    ("wrong name", "the model takes one input named 'input'"),
    ("wrong shape", "does not match the model's [-1, 1, 4, 4]"),
    ("bytes", "datatype 'BYTES' is not supported"),
    ("short raw", "raw contents hold 60 bytes; expected 64"),
    ("short typed", "contents.fp32_contents holds 3 values; shape [1, 1, 4, 4] needs 16"),
    ("fp16 typed", "FP16 has no typed contents field"),
    ("int8 range", "values outside INT8's range"),
    ("bad version", "model_version 'latest' is not a version"),
])
async def test_bad_requests_are_invalid_argument_with_a_reason(running: RunningServer, case: str,
                                                               expected: str) -> None:
    x = digits_input(1)
    request = tpb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    raw = x.tobytes()
    if case == "wrong name":
        tensor.name = "image"
    elif case == "wrong shape":
        tensor.shape[:] = [1, 16]
    elif case == "bytes":
        tensor.datatype = "BYTES"
    elif case == "short raw":
        raw = raw[:60]
    elif case == "short typed":
        tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
        raw = None
    elif case == "fp16 typed":
        tensor.datatype = "FP16"
        raw = None
    elif case == "int8 range":
        tensor.datatype = "INT8"
        tensor.contents.int_contents.extend([300] * 16)
        raw = None
    elif case == "bad version":
        request.model_version = "latest"
    if raw is not None:
        request.raw_input_contents.append(raw)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert expected in info.value.details()


async def test_unknown_model_and_version_are_not_found(client: Client) -> None:
    x = digits_input(1)
    status, message = await status_of(client.infer("nope", [infer_input(x)]))
    assert status == "StatusCode.NOT_FOUND" and "models: digits, tiny" in message
    status, message = await status_of(client.infer("digits", [infer_input(x)], model_version="4"))
    assert status == "StatusCode.NOT_FOUND" and "no version 4" in message


async def test_stream_infer_answers_each_request_and_errors_inline(client: Client) -> None:
    inputs = [digits_input(1, seed=i) for i in range(4)]

    async def requests() -> AsyncIterator[dict[str, object]]:
        for i, x in enumerate(inputs):
            yield {"model_name": "digits", "inputs": [infer_input(x)], "request_id": f"s{i}"}
        yield {"model_name": "nope", "inputs": [infer_input(inputs[0])], "request_id": "bad"}

    answers = [(result, error) async for result, error in client.stream_infer(requests())]
    assert len(answers) == 5
    for i, (result, error) in enumerate(answers[:4]):
        assert error is None and result.get_response().id == f"s{i}"
        single = await client.infer("digits", [infer_input(inputs[i])])
        np.testing.assert_allclose(result.as_numpy("probabilities"),
                                   single.as_numpy("probabilities"), rtol=1e-6)
    result, error = answers[4]
    assert error is not None and "model 'nope' is not served" in error.message()


async def test_statistics_count_requests_batches_and_time(model_repo: Path) -> None:
    async with serving(model_repo, metrics_port=0) as running, triton_client(running) as client:
        for seed in range(3):
            await client.infer("digits", [infer_input(digits_input(2, seed=seed))])
        await status_of(client.infer("digits", [infer_input(digits_input(1), name="wrong")]))
        stats = (await client.get_inference_statistics("digits")).model_stats
        assert [(s.name, s.version) for s in stats] == [("digits", "1")]
        s = stats[0]
        assert s.inference_count == 6 and 1 <= s.execution_count <= 3
        assert s.inference_stats.success.count == 3 and s.inference_stats.success.ns > 0
        assert s.inference_stats.queue.count == 3
        assert s.inference_stats.compute_infer.count == s.execution_count
        assert sum(b.compute_infer.count for b in s.batch_stats) == s.execution_count
        assert s.last_inference > 0
        everything = (await client.get_inference_statistics()).model_stats
        assert [(m.name, m.version) for m in everything] == [("digits", "1"), ("tiny", "1")]
        status, _ = await status_of(client.get_inference_statistics("nope"))
        assert status == "StatusCode.NOT_FOUND"


async def test_repository_index_lists_versions_with_state(model_repo: Path) -> None:
    async with serving(model_repo, metrics_port=0) as running, triton_client(running) as client:
        (model_repo / "digits" / ".tmp-9-partial").mkdir()  # a version being written: not listed
        index = (await client.get_model_repository_index()).models
        assert [(m.name, m.version, m.state) for m in index] == \
            [("digits", "1", "READY"), ("tiny", "1", "READY")]
        assert len((await client.get_model_repository_index(as_json=True))["models"]) == 2


async def test_repository_control_is_disabled_by_default(client: Client) -> None:
    for call in (client.load_model("digits"), client.unload_model("digits")):
        status, message = await status_of(call)
        assert status == "StatusCode.PERMISSION_DENIED"
        assert "--allow-repository-control" in message
    assert await client.is_model_ready("digits")


async def test_unimplemented_rpcs_say_so(client: Client) -> None:
    status, _ = await status_of(client.get_system_shared_memory_status())
    assert status == "StatusCode.UNIMPLEMENTED"
