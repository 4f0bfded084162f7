"""Random requests against a real server, through both APIs: never UNKNOWN or INTERNAL, never a
hang (each call has a deadline), and the server still answers a valid request afterwards.

Short here (the default suite); `pytest -m soak` runs the long profile (.ci/run does).
"""

from __future__ import annotations

from typing import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.tensors import KSERVE_TO_NUMPY
from tests.support.calls import digits_input, predict_request
from tests.support.models import write_repository
from tests.support.servers import ThreadedServer, local_config

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SHORT = settings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONG = settings(SHORT, max_examples=1500, derandomize=False)

dims = st.one_of(st.integers(-3, 9), st.sampled_from([0, 16, 2**31, 2**62, 2**63 - 1]))
shapes = st.lists(dims, max_size=6)
names = st.one_of(st.sampled_from(["digits", "tiny", "", "nope", "../digits"]), st.text(max_size=8))
datatypes = st.one_of(st.sampled_from(sorted(KSERVE_TO_NUMPY) + ["BYTES", "fp32", ""]),
                      st.text(max_size=5))
CONTENTS = ["fp32_contents", "fp64_contents", "int_contents", "int64_contents", "uint_contents",
            "uint64_contents", "bool_contents"]


@st.composite
def kserve_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=draw(names),
                                    model_version=draw(st.sampled_from(["", "1", "2", "x", "01"])),
                                    id=draw(st.text(max_size=4)))
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(name=draw(st.sampled_from(["input", "x", ""])),
                                    datatype=draw(datatypes), shape=draw(shapes))
        if draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=300)))
        else:
            field = draw(st.sampled_from(CONTENTS))
            values = draw(st.lists(st.integers(0, 1) if field == "bool_contents" else
                                   st.integers(0, 2**31 - 1) if field.startswith("uint")
                                   else st.integers(-2**31, 2**31 - 1) if field == "int_contents"
                                   else st.floats(allow_nan=True) if field.startswith("fp")
                                   else st.integers(-2**63, 2**63 - 1), max_size=40))
            getattr(tensor.contents, field).extend(bool(v) if field == "bool_contents" else v
                                                   for v in values)
        if draw(st.booleans()):
            tensor.parameters["p"].string_param = draw(st.text(max_size=4))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(
            ["probabilities", "member_kl", "logits", "member_probabilities", ""])))
        if draw(st.booleans()):
            output.parameters["classification"].int64_param = 2
    if draw(st.booleans()):
        request.parameters["priority"].int64_param = draw(st.integers(-5, 5))
    return request


@st.composite
def native_requests(draw: st.DrawFn) -> pb.PredictRequest:
    request = pb.PredictRequest(model=draw(names), version=draw(st.integers(-1, 3)),
                                request_id=draw(st.text(max_size=4)),
                                include_member_probabilities=draw(st.booleans()))
    if draw(st.booleans()):
        request.input.CopyFrom(pb.Tensor(dtype=draw(st.integers(0, 12)), shape=draw(shapes),
                                         data=draw(st.binary(max_size=300))))
    return request


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    threaded = ThreadedServer(local_config(write_repository(tmp_path_factory.mktemp("fuzz"))))
    yield threaded
    threaded.stop()


@pytest.fixture(scope="module")
def channel(server: ThreadedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def _call(channel: grpc.Channel, method: str, payload: bytes) -> None:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=20)
    except grpc.RpcError as exc:
        assert exc.code() not in FORBIDDEN, (exc.code(), exc.details())
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the server hung"


def _still_answers(channel: grpc.Channel) -> None:
    predict = channel.unary_unary("/snapserve.v1.EnsembleService/Predict",
                                  request_serializer=pb.PredictRequest.SerializeToString,
                                  response_deserializer=pb.PredictResponse.FromString)
    answer = predict(predict_request(digits_input(2)), timeout=20)
    assert np.frombuffer(answer.probabilities.data, np.float32).shape == (10,)


def _fuzz(channel: grpc.Channel, kserve: kpb.ModelInferRequest, native: pb.PredictRequest,
          garbage: bytes) -> None:
    _call(channel, "/inference.GRPCInferenceService/ModelInfer", kserve.SerializeToString())
    _call(channel, "/snapserve.v1.EnsembleService/Predict", native.SerializeToString())
    _call(channel, "/inference.GRPCInferenceService/ModelInfer", garbage)


@SHORT
@given(kserve=kserve_requests(), native=native_requests(), garbage=st.binary(max_size=64))
def test_random_requests_get_precise_codes(channel: grpc.Channel, kserve: kpb.ModelInferRequest,
                                           native: pb.PredictRequest, garbage: bytes) -> None:
    _fuzz(channel, kserve, native, garbage)


def test_the_server_still_answers_after_the_fuzz(channel: grpc.Channel) -> None:
    _still_answers(channel)


@pytest.mark.soak
@LONG
@given(kserve=kserve_requests(), native=native_requests(), garbage=st.binary(max_size=64))
def test_random_requests_long_profile(channel: grpc.Channel, kserve: kpb.ModelInferRequest,
                                      native: pb.PredictRequest, garbage: bytes) -> None:
    _fuzz(channel, kserve, native, garbage)
    _still_answers(channel)
