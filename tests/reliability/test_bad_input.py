"""Bad requests through both APIs: each gets a precise status and a message that names the problem
and what was expected; the server stays up and still answers valid requests correctly.

Every case is sent as a snapserve.v1 PredictRequest and as a KServe v2 ModelInferRequest (where
the API can express it), to a real server over a real channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import (DTYPE_TO_NUMPY, KSERVE_TO_NUMPY, NUMPY_TO_KSERVE, TensorError,
                                     from_tensor, to_tensor)
from snapserve.server import BatcherConfig, RunningServer
from snapserve.server.api.kserve_messages import decode_infer_input
from snapserve.server.errors import InvalidInput
from snapserve.server.models.inputs import conform_input
from snapserve.server.models.manifest import InputSpec
from tests.support.calls import digits_input
from tests.support.models import reference_member_probs
from tests.support.servers import pinned_runtime, serving

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
F32 = np.float32
NAN_INPUT = digits_input(2, seed=5)
NAN_INPUT[1, 0, 2, 3] = np.nan
INF_INPUT = digits_input(1, seed=6)
INF_INPUT[0, 0, 0, 0] = -np.inf


def native(x: np.ndarray | None = None, *, dtype: int | None = None, shape: list[int] | None = None,
           data: bytes | None = None, model: str = "digits", version: int = 0) -> pb.PredictRequest:
    request = pb.PredictRequest(model=model, version=version)
    if x is not None:
        to_tensor(x, request.input)
    if dtype is not None:
        request.input.CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=data))
    return request


def kserve(x: np.ndarray | None = None, *, datatype: str | None = None,
           shape: list[int] | None = None, data: bytes | None = None, model: str = "digits",
           version: str = "", inputs: list[str] | None = None,
           outputs: list[str] = ()) -> kpb.ModelInferRequest:  # type: ignore[assignment]
    request = kpb.ModelInferRequest(model_name=model, model_version=version, id="bad")
    names = ["input"] if inputs is None else inputs
    for name in names:
        if x is not None:
            request.inputs.add(name=name, datatype=NUMPY_TO_KSERVE[x.dtype.newbyteorder("=")],
                               shape=x.shape)
            request.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
        else:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(data)
    for name in outputs:
        request.outputs.add(name=name)
    return request


@dataclass(frozen=True)
class Case:
    native: pb.PredictRequest | None
    kserve: kpb.ModelInferRequest | None
    code: grpc.StatusCode
    says: tuple[str, ...]  # the message names the problem and the expectation


def z(*shape: int, dtype: type = F32) -> np.ndarray:
    return np.zeros(shape, dtype)


CASES = {
    "wrong dtype": Case(native(z(2, 1, 4, 4, dtype=np.int64)), kserve(z(2, 1, 4, 4, dtype=np.int64)),
                        INVALID, ("input dtype int64 is not accepted", "the model takes float32")),
    "bool dtype": Case(native(z(1, 1, 4, 4, dtype=bool)), kserve(z(1, 1, 4, 4, dtype=bool)),
                       INVALID, ("input dtype bool is not accepted", "float32")),
    "wrong rank": Case(native(z(2, 1, 4)), kserve(z(2, 1, 4)), INVALID,
                       ("input shape [2, 1, 4] does not match", "the model's [-1, 1, 4, 4]")),
    "wrong feature shape": Case(native(z(2, 1, 4, 5)), kserve(z(2, 1, 4, 5)), INVALID,
                                ("input shape [2, 1, 4, 5] does not match",
                                 "the model's [-1, 1, 4, 4]")),
    "batch of 0": Case(native(z(0, 1, 4, 4)), kserve(z(0, 1, 4, 4)), INVALID,
                       ("input batch is empty (0 examples)", "expected 1 to 8 examples")),
    "batch too large": Case(native(z(9, 1, 4, 4)), kserve(z(9, 1, 4, 4)), INVALID,
                            ("batch of 9 examples exceeds the server's max batch size 8",
                             "requests of at most 8")),
    "byte length": Case(
        native(dtype=pb.FLOAT32, shape=[2, 1, 4, 4], data=b"\0" * 100),
        kserve(datatype="FP32", shape=[2, 1, 4, 4], data=b"\0" * 100), INVALID,
        ("100 bytes", "expected 128", "[2, 1, 4, 4] x 4 bytes")),
    "negative dimension": Case(
        native(dtype=pb.FLOAT32, shape=[-1, 1, 4, 4], data=b""),
        kserve(datatype="FP32", shape=[-1, 1, 4, 4], data=b""), INVALID,
        ("[-1, 1, 4, 4]", "sizes >= 0")),
    "overflowing dimensions": Case(
        native(dtype=pb.FLOAT32, shape=[2**62, 2**62, 4, 4], data=b"\0" * 64),
        kserve(datatype="FP32", shape=[2**62, 2**62, 4, 4], data=b"\0" * 64), INVALID,
        (f"shape [{2**62}, {2**62}, 4, 4]", "expected")),
    "overflowing empty tensor": Case(
        native(dtype=pb.FLOAT32, shape=[0, 2**62, 2**62, 4], data=b""),
        kserve(datatype="FP32", shape=[0, 2**62, 2**62, 4], data=b""), INVALID,
        (f"shape [0, {2**62}, {2**62}, 4] is too large", "product fits in")),
    "unsupported dtype": Case(native(dtype=42, shape=[1, 1, 4, 4], data=b"\0" * 64),
                              kserve(datatype="COMPLEX64", shape=[1, 1, 4, 4], data=b"\0" * 64),
                              INVALID, ("is not supported", "expected one of")),
    "NaN": Case(native(NAN_INPUT), kserve(NAN_INPUT), INVALID,
                ("1 non-finite values (NaN or Inf)", "index [1, 0, 2, 3]", "expects finite numbers",
                 "--allow-nonfinite")),
    "Inf": Case(native(INF_INPUT), kserve(INF_INPUT), INVALID,
                ("non-finite", "index [0, 0, 0, 0] (-inf)", "expects finite numbers")),
    "beyond float32": Case(native(np.full((1, 1, 4, 4), 1e300)), kserve(np.full((1, 1, 4, 4), 1e300)),
                           INVALID, ("16 values beyond the range of float32", "(1e+300)",
                                     "expects finite float32 numbers")),
    "unknown model": Case(native(z(1, 1, 4, 4), model="nope"), kserve(z(1, 1, 4, 4), model="nope"),
                          NOT_FOUND, ("model 'nope' is not served", "models: digits, tiny")),
    "unknown version": Case(native(z(1, 1, 4, 4), version=7), kserve(z(1, 1, 4, 4), version="7"),
                            NOT_FOUND, ("model 'digits' has no version 7", "loaded versions: [1]")),
    "malformed version": Case(None, kserve(z(1, 1, 4, 4), version="v2"), INVALID,
                              ("'v2' is not a version", "expected a positive integer")),
    "missing input": Case(native(), kserve(inputs=[]), INVALID, ("input", "[-1, 1, 4, 4]")),
    "two inputs": Case(None, kserve(z(1, 1, 4, 4), inputs=["input", "extra"]), INVALID,
                       ("the model takes one input named 'input'",
                        "the request has inputs ['input', 'extra']")),
    "wrong input name": Case(None, kserve(z(1, 1, 4, 4), inputs=["pixels"]), INVALID,
                             ("one input named 'input'", "inputs ['pixels']")),
    "unknown output": Case(None, kserve(z(1, 1, 4, 4), outputs=["logits"]), INVALID,
                           ("unknown output 'logits'", "outputs are probabilities")),
    "duplicated output": Case(None, kserve(z(1, 1, 4, 4), outputs=["probabilities", "member_kl",
                                                                   "probabilities"]),
                              INVALID, ("output 'probabilities' is asked for twice",
                                        "name each output once")),
}


async def assert_valid_request_still_answered(stub: pb_grpc.EnsembleServiceStub,
                                              repo: Path) -> None:
    x = digits_input(3, seed=11)
    response = await stub.Predict(native(x))
    expected = reference_member_probs(repo / "digits" / "1", x).mean(axis=1)
    np.testing.assert_allclose(from_tensor(response.probabilities), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
async def server(model_repo: Path):  # type: ignore[no-untyped-def]
    async with serving(model_repo, batcher=BatcherConfig(max_batch_size=8),
                       max_message_bytes=64 * 1024) as running:
        yield running


async def _call(running: RunningServer, api: str, request: object) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = (pb_grpc.EnsembleServiceStub(channel).Predict if api == "native"
                else kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request)
        return info.value


@pytest.mark.parametrize("api", ["native", "kserve"])
async def test_every_bad_request_gets_its_status_and_message(
        server: RunningServer, model_repo: Path, api: str) -> None:
    tried = 0
    for name, case in CASES.items():
        request = case.native if api == "native" else case.kserve
        if request is None:
            continue
        error = await _call(server, api, request)
        assert error.code() == case.code, (name, error.details())
        for fragment in case.says:
            assert fragment in error.details(), (name, fragment, error.details())
        tried += 1
    assert tried >= 15
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await assert_valid_request_still_answered(pb_grpc.EnsembleServiceStub(channel), model_repo)


@pytest.mark.parametrize("api", ["native", "kserve"])
async def test_a_message_over_the_limit_is_resource_exhausted(
        server: RunningServer, model_repo: Path, api: str) -> None:
    x = z(8, 1, 4, 4 * 80)  # 40 KiB of floats * 2 > the 64 KiB limit
    x = np.concatenate([x, x], axis=3)
    error = await _call(server, api, native(x) if api == "native" else kserve(x))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in error.details()
    assert f"vs. {64 * 1024}" in error.details()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await assert_valid_request_still_answered(pb_grpc.EnsembleServiceStub(channel), model_repo)


@pytest.mark.parametrize("method", ["/snapserve.v1.EnsembleService/Predict",
                                    "/inference.GRPCInferenceService/ModelInfer"])
async def test_bytes_that_are_not_protobuf(server: RunningServer, model_repo: Path,
                                           method: str) -> None:
    """Our raw-bytes handlers parse each request (api/intake.py): INVALID_ARGUMENT naming the
    message type expected (grpc.aio's own parsing answered UNKNOWN before any code of ours ran)."""
    expected = ("snapserve.v1.PredictRequest" if "EnsembleService" in method
                else "inference.ModelInferRequest")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary(method)  # no serializers: bytes go out as they are
        for garbage in (b"\xff\xff\xff\xff\x0f", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                        bytes(range(256))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(garbage)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"not a valid {expected} protobuf message" in info.value.details()
        await assert_valid_request_still_answered(pb_grpc.EnsembleServiceStub(channel), model_repo)


async def test_stream_answers_bad_requests_inline_and_goes_on(server: RunningServer) -> None:
    requests = [CASES[name].native for name in ("NaN", "wrong rank", "unknown model")]
    requests.insert(1, native(digits_input(2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answers = [a async for a in pb_grpc.EnsembleServiceStub(channel).PredictStream(
            iter(requests))]
    assert [a.error.code for a in answers] == [
        INVALID.value[0], 0, INVALID.value[0], NOT_FOUND.value[0]]
    assert "non-finite" in answers[0].error.message
    assert from_tensor(answers[1].probabilities).shape == (2, 5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
async def test_allow_nonfinite_passes_nan_to_the_model(model_repo: Path) -> None:
    async with serving(model_repo, runtime=pinned_runtime(allow_nonfinite=True)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            response = await pb_grpc.EnsembleServiceStub(channel).Predict(native(NAN_INPUT))
            probabilities = from_tensor(response.probabilities)
            assert np.isnan(probabilities[1]).all() and np.isfinite(probabilities[0]).all()
            infer = await kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(kserve(INF_INPUT))
            assert infer.outputs[0].name == "probabilities"


# -- property-based: the decoding layer only ever returns a result or a named error -------------

SPEC = InputSpec("input", np.dtype(np.float32), (-1, 1, 4, 4), None)
DIMS = st.one_of(st.integers(-3, 9), st.sampled_from([0, 16, 2**31, 2**62, 2**63 - 1, -(2**63)]))
# Near the model's [-1, 1, 4, 4] often, so decoding gets as far as the conformance checks.
NEAR_SHAPES = st.tuples(st.integers(0, 10), st.sampled_from([1, 1, 1, 2]),
                        st.sampled_from([4, 4, 4, 3]), st.just(4)).map(list)
SHAPES = st.integers(0, 9).flatmap(
    lambda kind: NEAR_SHAPES if kind < 6 else st.lists(DIMS, max_size=6) if kind < 9
    else st.lists(st.integers(0, 3), min_size=30, max_size=40))


def _data(draw: Callable, dtype_size: int, shape: list[int]) -> bytes:  # type: ignore[type-arg]
    """Mostly the right length (so decoding goes deep), sometimes any."""
    size = math.prod(shape) * dtype_size if all(d >= 0 for d in shape) else -1
    if 0 <= size <= 4096 and draw(st.integers(0, 3)):
        value = draw(st.sampled_from([0.0, 1.5, -2.0, float("nan"), float("inf"), 1e38]))
        floats = np.full(size // 4, 0.5, np.float32)
        floats[draw(st.integers(0, max(len(floats) - 1, 0))):][:1] = value
        return (floats.tobytes() + b"\x01" * (size % 4))[:size]
    return draw(st.binary(max_size=300))


@st.composite
def tensors(draw: Callable) -> pb.Tensor:  # type: ignore[type-arg]
    dtype = draw(st.sampled_from([pb.FLOAT32] * 6 + list(DTYPE_TO_NUMPY) + [0, -1, 10, 42]))
    shape = draw(SHAPES)
    size = DTYPE_TO_NUMPY[dtype].itemsize if dtype in DTYPE_TO_NUMPY else 4
    return pb.Tensor(dtype=dtype, shape=shape, data=_data(draw, size, shape))


@st.composite
def infer_requests(draw: Callable) -> kpb.ModelInferRequest:  # type: ignore[type-arg]
    request = kpb.ModelInferRequest(model_name="digits")
    for _ in range(draw(st.integers(0, 2))):
        datatype = draw(st.sampled_from(list(KSERVE_TO_NUMPY)) | st.text(max_size=6))
        shape = draw(SHAPES)
        tensor = request.inputs.add(name=draw(st.sampled_from(["input", "x", ""])),
                                    datatype=datatype, shape=shape)
        size = KSERVE_TO_NUMPY[datatype].itemsize if datatype in KSERVE_TO_NUMPY else 4
        if draw(st.booleans()):
            request.raw_input_contents.append(_data(draw, size, shape))
        else:
            values = draw(st.lists(st.floats(width=32) | st.integers(-2**31, 2**31 - 1),
                                   max_size=40))
            floats = [float(v) for v in values]
            tensor.contents.fp32_contents.extend(floats)
            tensor.contents.fp64_contents.extend(floats)
            tensor.contents.int_contents.extend(int(v) for v in values if isinstance(v, int))
    return request


def _conformed(array: np.ndarray) -> None:
    x = conform_input(array, SPEC, max_batch_size=8)
    assert x.dtype == np.float32 and x.shape[1:] == (1, 4, 4) and 1 <= len(x) <= 8
    assert np.isfinite(x).all()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors())
def test_native_decoding_returns_an_array_or_a_named_error(tensor: pb.Tensor) -> None:
    try:
        array = from_tensor(tensor, name="input")
    except TensorError as exc:
        assert str(exc).startswith("input "), exc
        return
    assert array.shape == tuple(tensor.shape) and array.nbytes == len(tensor.data)
    try:
        _conformed(array)
    except InvalidInput as exc:
        assert str(exc).startswith("input "), exc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(infer_requests())
def test_kserve_decoding_returns_an_array_or_a_named_error(request: kpb.ModelInferRequest) -> None:
    try:
        _conformed(decode_infer_input(request, SPEC))
    except InvalidInput as exc:
        assert str(exc), exc


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    """What the gRPC layer does with a request's bytes, then our decoding of whatever parsed."""
    from google.protobuf.message import DecodeError

    from snapserve.server.api.messages import decode_input

    try:
        request = pb.PredictRequest.FromString(data)
    except DecodeError:
        return
    try:
        _conformed(decode_input(request, SPEC))
    except InvalidInput as exc:
        assert str(exc)
