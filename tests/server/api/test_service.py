"""snapserve.v1.EnsembleService through a real channel to a real server (ONNX Runtime, no mocks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor, to_tensor
from snapserve.proto import scores
from snapserve.server import BatcherConfig, RunningServer, ServerConfig, start_server
from tests.support.calls import digits_input
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, IR_VERSION, OPSET, random_members,
                                  reference_member_probs, write_model_version)
from tests.support.servers import pinned_runtime
from tests.support.waiting import eventually

Stub = pb_grpc.EnsembleServiceStub


def request(x: np.ndarray, model: str = "digits", **kwargs: object) -> pb.PredictRequest:
    return pb.PredictRequest(model=model, input=to_tensor(x), **kwargs)


def assert_matches_reference(response: pb.PredictResponse, version_dir: Path, x: np.ndarray,
                             temperature: float = 1.0) -> None:
    """Every score equals a direct numpy computation from the member ONNX outputs."""
    p = reference_member_probs(version_dir, x)  # [B, M, C] float64
    mean = p.mean(axis=1)
    served = mean if temperature == 1 else scores.softmax(np.log(mean) / temperature)
    h = lambda q: -(q * np.log(q)).sum(axis=-1)  # noqa: E731 (softmax outputs are > 0 here)
    np.testing.assert_allclose(from_tensor(response.probabilities), served, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(from_tensor(response.top_class), served.argmax(axis=1))
    assert list(response.top_label) == [DIGITS_CLASSES[i] for i in served.argmax(axis=1)]
    np.testing.assert_allclose(from_tensor(response.predictive_entropy), h(mean), rtol=1e-5)
    np.testing.assert_allclose(from_tensor(response.expected_entropy), h(p).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(from_tensor(response.mutual_information),
                               h(mean) - h(p).mean(axis=1), rtol=1e-4, atol=1e-6)
    kl = (p * (np.log(p) - np.log(mean[:, None]))).sum(axis=-1)
    np.testing.assert_allclose(from_tensor(response.member_kl), kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(from_tensor(response.member_top_class), p.argmax(axis=-1))
    votes = (p.argmax(axis=-1) != mean.argmax(axis=1)[:, None]).mean(axis=1)
    np.testing.assert_allclose(from_tensor(response.vote_disagreement), votes)


async def test_predict_equals_direct_computation(stub: Stub, model_repo: Path) -> None:
    x = digits_input(6)
    response = await stub.Predict(request(x, request_id="r1"))
    assert (response.model, response.version, response.request_id) == ("digits", 1, "r1")
    assert_matches_reference(response, model_repo / "digits" / "1", x)
    assert not response.HasField("member_probabilities")  # only when asked
    assert not response.HasField("error")
    assert from_tensor(response.probabilities).dtype == np.float32
    assert from_tensor(response.top_class).dtype == np.int64
    # the members disagree somewhere, or the test would prove little
    assert from_tensor(response.mutual_information).max() > 1e-3


async def test_member_probabilities_when_asked(stub: Stub, model_repo: Path) -> None:
    x = digits_input(3)
    response = await stub.Predict(request(x, include_member_probabilities=True))
    member = from_tensor(response.member_probabilities)
    assert member.shape == (3, 3, 5) and member.dtype == np.float32
    np.testing.assert_allclose(member, reference_member_probs(model_repo / "digits" / "1", x),
                               rtol=1e-5, atol=1e-7)


async def test_temperature_applies_to_probabilities_only(tmp_path: Path) -> None:
    version = write_model_version(tmp_path, "digits", random_members(3, 16, 5, seed=4),
                                  DIGITS_SHAPE, DIGITS_CLASSES, temperature=2.5)
    running = await start_server(ServerConfig(model_repository=tmp_path, port=0, http_port=None,
                                              runtime=pinned_runtime()))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            x = digits_input(4, seed=3)
            response = await Stub(channel).Predict(request(x))
            assert_matches_reference(response, version, x, temperature=2.5)
    finally:
        await running.stop(None)


async def test_float64_and_float16_inputs_are_converted(stub: Stub, model_repo: Path) -> None:
    x = digits_input(2)
    for dtype in (np.float64, np.float16):
        response = await stub.Predict(request(x.astype(dtype)))
        assert_matches_reference(response, model_repo / "digits" / "1",
                                 x.astype(dtype).astype(np.float32))


def raw_input(dtype: int, shape: list[int], data: bytes) -> pb.PredictRequest:
    return pb.PredictRequest(model="digits", input=pb.Tensor(dtype=dtype, shape=shape, data=data))


BAD_REQUESTS = {
    "wrong shape": (request(np.zeros((2, 16), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                    "input shape [2, 16] does not match the model's [-1, 1, 4, 4]"),
    "wrong rank": (request(np.zeros((2, 1, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                   "input shape [2, 1, 4] does not match the model's [-1, 1, 4, 4]"),
    "int dtype": (request(np.zeros((2, 1, 4, 4), np.int64)), grpc.StatusCode.INVALID_ARGUMENT,
                  "input dtype int64 is not accepted; the model takes float32"),
    "bool dtype": (request(np.zeros((2, 1, 4, 4), bool)), grpc.StatusCode.INVALID_ARGUMENT,
                   "input dtype bool is not accepted"),
    "byte length": (raw_input(pb.FLOAT32, [2, 1, 4, 4], b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT,
                    "input data has 100 bytes; expected 128"),
    "unspecified dtype": (raw_input(pb.DATA_TYPE_UNSPECIFIED, [1, 1, 4, 4], b"\0" * 64),
                          grpc.StatusCode.INVALID_ARGUMENT,
                          "input dtype DATA_TYPE_UNSPECIFIED is not supported"),
    "negative dim": (raw_input(pb.FLOAT32, [-1, 1, 4, 4], b""), grpc.StatusCode.INVALID_ARGUMENT,
                     "negative dimension"),
    "empty batch": (request(np.zeros((0, 1, 4, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                    "input batch is empty (0 examples)"),
    "batch too large": (request(np.zeros((9, 1, 4, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                        "input batch of 9 examples exceeds the server's max batch size 8"),
    "missing input": (pb.PredictRequest(model="digits"), grpc.StatusCode.INVALID_ARGUMENT,
                      "request has no input; expected a tensor of shape [-1, 1, 4, 4] and dtype float32"),
    "unknown model": (request(np.zeros((1, 1, 4, 4), np.float32), model="nope"),
                      grpc.StatusCode.NOT_FOUND, "model 'nope' is not served; models: digits, tiny"),
    "unknown version": (request(np.zeros((1, 1, 4, 4), np.float32), version=7),
                        grpc.StatusCode.NOT_FOUND, "model 'digits' has no version 7; loaded versions: [1]"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_get_a_status_and_a_useful_message(stub: Stub, case: str) -> None:
    bad, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Predict(bad)
    assert info.value.code() == code
    assert message in info.value.details()
    # the server keeps serving
    response = await stub.Predict(request(digits_input(1)))
    assert from_tensor(response.probabilities).shape == (1, 5)


async def test_stream_answers_in_order_with_errors_inline(stub: Stub, model_repo: Path) -> None:
    inputs = [digits_input(n, seed=n) for n in (1, 3, 2)]
    requests = [request(inputs[0], request_id="a"),
                request(inputs[1], request_id="b", include_member_probabilities=True),
                request(np.zeros((1, 7), np.float32), request_id="bad"),
                request(inputs[2], request_id="c"),
                request(inputs[0], model="nope", request_id="unknown")]
    responses = [r async for r in stub.PredictStream(iter(requests))]
    assert [r.request_id for r in responses] == ["a", "b", "bad", "c", "unknown"]
    for response, x in zip([responses[0], responses[1], responses[3]], inputs):
        assert not response.HasField("error")
        assert_matches_reference(response, model_repo / "digits" / "1", x)
    assert responses[1].HasField("member_probabilities")
    assert responses[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "input shape [1, 7] does not match" in responses[2].error.message
    assert not responses[2].HasField("probabilities")
    assert responses[4].error.code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_stream_requests_share_batches(running_server: RunningServer, stub: Stub) -> None:
    requests = [request(digits_input(1, seed=i), request_id=str(i)) for i in range(8)]
    responses = [r async for r in stub.PredictStream(iter(requests))]
    assert [r.request_id for r in responses] == [str(i) for i in range(8)]
    assert running_server.registry.get("digits").batcher.stats.batches < 8


async def test_list_and_get_model(stub: Stub, model_repo: Path) -> None:
    listed = await stub.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.version, list(m.versions), m.method, m.members) for m in listed.models] == [
        ("digits", 1, [1], "snapshot", 3), ("tiny", 1, [1], "fge", 2)]

    meta = await stub.GetModel(pb.GetModelRequest(model="digits"))
    manifest = json.loads((model_repo / "digits" / "1" / "manifest.json").read_text())
    assert (meta.name, meta.version, list(meta.versions), meta.method) == ("digits", 1, [1], "snapshot")
    assert (meta.input.name, meta.input.dtype, list(meta.input.shape)) == ("input", pb.FLOAT32, [-1, 1, 4, 4])
    assert (list(meta.input.normalization.mean), list(meta.input.normalization.std),
            meta.input.normalization.axis) == ([0.5], [2.0], 1)
    assert list(meta.classes) == DIGITS_CLASSES
    assert [m.sha256 for m in meta.members] == [m["sha256"] for m in manifest["members"]]
    assert meta.members[1].epoch == 2 and meta.members[1].metrics["accuracy"] == pytest.approx(0.51)
    assert dict(meta.metrics) == pytest.approx({"accuracy": 0.9, "nll": 0.3})
    assert meta.temperature == 1.0
    assert meta.execution_provider == "CPUExecutionProvider"
    assert meta.max_batch_size == 8
    assert json.loads(meta.manifest_json) == manifest

    tiny = await stub.GetModel(pb.GetModelRequest(model="tiny", version=1))
    assert not tiny.input.HasField("normalization")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModel(pb.GetModelRequest(model="digits", version=3))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(model_repo: Path) -> None:
    config = ServerConfig(model_repository=model_repo, port=0, http_port=None, runtime=pinned_runtime(),
                          batcher=BatcherConfig(max_batch_size=16, max_queue_delay_s=0.05))
    running = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = Stub(channel)
            inputs = [digits_input(1, seed=100 + i) for i in range(16)]
            responses = await asyncio.gather(*(stub.Predict(request(x)) for x in inputs))
        stats = running.registry.get("digits").batcher.stats
        assert stats.items == 16 and stats.batches < 16
        for x, response in zip(inputs, responses):
            assert_matches_reference(response, model_repo / "digits" / "1", x)
        assert len({r.probabilities.data for r in responses}) == 16
    finally:
        await running.stop(None)


async def test_full_queue_is_resource_exhausted(model_repo: Path) -> None:
    config = ServerConfig(model_repository=model_repo, port=0, http_port=None, runtime=pinned_runtime(),
                          batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=1.0, max_queue_size=1,
                                                  adaptive_wait=False))
    running = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = Stub(channel)
            waiting = asyncio.ensure_future(stub.Predict(request(digits_input(1))))
            batcher = running.registry.get("digits").batcher
            await eventually(lambda: batcher.queued == 1, "the first call queued, waiting for company")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(request(digits_input(1)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in info.value.details()
            assert from_tensor((await waiting).probabilities).shape == (1, 5)
    finally:
        await running.stop(None)


async def test_cancelled_call_is_dropped_before_compute(model_repo: Path) -> None:
    config = ServerConfig(model_repository=model_repo, port=0, http_port=None, runtime=pinned_runtime(),
                          batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=30.0,
                                                adaptive_wait=False))
    running = await start_server(config)
    try:
        batcher = running.registry.get("digits").batcher
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = Stub(channel).Predict(request(digits_input(1)))
            await eventually(lambda: batcher.queued == 1, "the call queued, waiting for company")
            call.cancel()
            await eventually(lambda: batcher.stats.dropped_cancelled == 1, "counted as cancelled")
        assert batcher.queued == 0 and batcher.stats.batches == 0
    finally:
        await running.stop(None)


async def test_stop_with_grace_finishes_in_flight_requests(model_repo: Path) -> None:
    # The call waits in the queue for company (0.5 s) when the stop begins: the grace answers it.
    config = ServerConfig(model_repository=model_repo, port=0, http_port=None, runtime=pinned_runtime(),
                          batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=0.5,
                                                adaptive_wait=False))
    running = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = asyncio.ensure_future(Stub(channel).Predict(request(digits_input(2))))
            batcher = running.registry.get("digits").batcher
            await eventually(lambda: batcher.queued == 1, "the call queued, waiting for company")
            await running.stop(grace=2.0)
            assert from_tensor((await call).probabilities).shape == (2, 5)
    finally:
        await running.stop(None)  # a no-op after the stop above; frees the port if it failed


def test_status_table_maps_named_exceptions_and_subclasses() -> None:
    from snapserve.proto.tensors import TensorError
    from snapserve.server.errors import ChecksumMismatch, InvalidInput, ItemExpired, QueueFull, VersionNotFound
    from snapserve.server.api.status import status_code

    assert status_code(InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(TensorError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(VersionNotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code(QueueFull("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(ItemExpired("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_code(ChecksumMismatch("x")) == grpc.StatusCode.INTERNAL  # never reaches a caller
    assert status_code(ZeroDivisionError()) == grpc.StatusCode.INTERNAL


def batch_of_one_only_model():  # -> onnx.ModelProto
    """Reshapes to a fixed [1, 16]: passes the load-time warm-up, fails on batches of 2."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((16, 5), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])], "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        initializer=[numpy_helper.from_array(np.array([1, 16], np.int64), "shape"),
                     numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


async def test_a_request_the_model_fails_on_is_refused_and_the_server_goes_on(
        tmp_path: Path) -> None:
    """The version passed its warm-up, so a run that fails on one request is that request's:
    INVALID_ARGUMENT without ONNX Runtime's internals (issue 14: they go to the log)."""
    write_model_version(tmp_path, "digits", [batch_of_one_only_model()], DIGITS_SHAPE, DIGITS_CLASSES)
    running = await start_server(ServerConfig(model_repository=tmp_path, port=0, http_port=None,
                                              runtime=pinned_runtime()))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = Stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(request(digits_input(2)))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not compute" in info.value.details()
            assert "onnxruntime" not in info.value.details().lower()
            response = await stub.Predict(request(digits_input(1)))
            assert from_tensor(response.probabilities).shape == (1, 5)
    finally:
        await running.stop(None)
