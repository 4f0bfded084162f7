"""The C++ gRPC front end (`cpp_grpc_port`, server/api/cpp.py): the same answers and the same
refusals as the grpc.aio port, through gRPC's C++ library, on real channels.

It needs g++ and libgrpc++ (pkg-config grpc++): without them these tests are skipped, but not
when CI=true (.ci/run installs them, so there they run or fail).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor
from snapserve.server import RunningServer, ServerConfig, start_server
from snapserve.server.app import grpc_frontend_for
from snapserve.server.api.security import SecurityConfig
from snapserve.server.config import BatcherConfig, ConnectionConfig, IntakeConfig
from snapserve.server.cpp import binding
from snapserve.server.errors import ConfigError
from tests.support.calls import digits_input, predict_request
from tests.support.models import write_repository, write_slow_model
from tests.support.pki import Pki, tls_channel
from tests.support.servers import ThreadedServer, local_config, serving
from tests.support.waiting import eventually


# The async tests share the module's event loop, where `running` lives.
in_module_loop = pytest.mark.asyncio(loop_scope="module")

TOKEN = "cpp-front-end-token-0001"


@pytest.fixture(scope="module", autouse=True)
def built_library(cpp_library: Path) -> None:
    """Every test here needs the library (tests/conftest.py builds it once per process)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    async with serving(write_repository(tmp_path_factory.mktemp("models")),
                       cpp_grpc_port=0) as server:
        yield server


def _channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def _infer_request(x: np.ndarray, request_id: str = "") -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="digits", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


async def _both(running: RunningServer, call: object) -> list[object]:
    """`call(channel)` on the grpc.aio port and on the C++ port."""
    answers = []
    for port in (running.port, running.cpp_port):
        async with _channel(port) as channel:
            answers.append(await call(channel))  # type: ignore[operator]
    return answers


@in_module_loop
async def test_kserve_infer_answers_as_the_grpc_aio_port(running: RunningServer) -> None:
    x = digits_input(3, seed=4)

    async def infer(channel: grpc.aio.Channel) -> kpb.ModelInferResponse:
        return await kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _infer_request(x, "req-7"), timeout=10)

    aio, cpp = await _both(running, infer)
    assert cpp.id == "req-7" and cpp.model_name == "digits"
    assert [o.name for o in cpp.outputs] == [o.name for o in aio.outputs]
    assert list(cpp.raw_output_contents) == list(aio.raw_output_contents)


@in_module_loop
async def test_predict_answers_as_the_grpc_aio_port_with_the_request_id_trailer(
        running: RunningServer) -> None:
    x = digits_input(2, seed=1)
    async with _channel(running.cpp_port) as channel:
        call = pb_grpc.EnsembleServiceStub(channel).Predict(predict_request(x), timeout=10)
        cpp = await call
        trailer = dict(await call.trailing_metadata())
    async with _channel(running.port) as channel:
        aio = await pb_grpc.EnsembleServiceStub(channel).Predict(predict_request(x), timeout=10)
    assert trailer["x-request-id"] == cpp.request_id != ""
    np.testing.assert_array_equal(from_tensor(cpp.probabilities), from_tensor(aio.probabilities))
    np.testing.assert_array_equal(from_tensor(cpp.mutual_information),
                                  from_tensor(aio.mutual_information))


@in_module_loop
async def test_metadata_and_health_check(running: RunningServer) -> None:
    async def metadata(channel: grpc.aio.Channel) -> kpb.ModelMetadataResponse:
        return await kpb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            kpb.ModelMetadataRequest(name="digits"), timeout=10)

    aio, cpp = await _both(running, metadata)
    assert cpp == aio
    async with _channel(running.cpp_port) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@in_module_loop
async def test_errors_carry_the_same_status_and_message(running: RunningServer) -> None:
    async def unknown(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.EnsembleServiceStub(channel).Predict(
                predict_request(digits_input(1), model="nope"), timeout=10)
        return info.value.code(), info.value.details()

    aio, cpp = await _both(running, unknown)
    assert cpp == aio and cpp[0] == grpc.StatusCode.NOT_FOUND

    async def garbage(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                b"\xff\xff\xff not a protobuf", timeout=10)
        return info.value.code(), info.value.details()

    aio, cpp = await _both(running, garbage)
    assert cpp == aio and cpp[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in cpp[1]
    async with _channel(running.cpp_port) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _still_answers(channel: grpc.aio.Channel) -> None:
    """The server goes on answering on `channel`."""
    answer = await pb_grpc.EnsembleServiceStub(channel).Predict(
        predict_request(digits_input(1)), timeout=10)
    assert answer.model == "digits"


def _stream_requests() -> list[pb.PredictRequest]:
    requests = [predict_request(digits_input(n, seed=n), request_id=f"r{n}") for n in (1, 3, 2)]
    requests.insert(1, predict_request(digits_input(1), model="nope", request_id="unknown"))
    requests.insert(3, predict_request(np.zeros((1, 7), np.float32), request_id="bad"))
    return requests


@in_module_loop
async def test_predict_stream_answers_as_the_grpc_aio_port(running: RunningServer) -> None:
    async def stream(channel: grpc.aio.Channel) -> list[pb.PredictResponse]:
        return [a async for a in pb_grpc.EnsembleServiceStub(channel).PredictStream(
            iter(_stream_requests()), timeout=30)]

    aio, cpp = await _both(running, stream)
    assert [a.request_id for a in cpp] == ["r1", "unknown", "r3", "bad", "r2"]
    assert [a.error.code for a in cpp] == [0, grpc.StatusCode.NOT_FOUND.value[0], 0,
                                           grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert cpp == aio  # errors inline, the same words, the same probabilities
    front = running.cpp
    assert front is not None
    await eventually(lambda: not front._calls and not front._streams,
                     "every stream answered and forgotten")


@in_module_loop
async def test_model_stream_infer_answers_as_the_grpc_aio_port(running: RunningServer) -> None:
    inputs = [digits_input(n, seed=10 + n) for n in (2, 1, 4)]

    async def stream(channel: grpc.aio.Channel) -> list[kpb.ModelStreamInferResponse]:
        requests = [_infer_request(x, f"k{i}") for i, x in enumerate(inputs)]
        return [a async for a in kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter(requests), timeout=30)]

    aio, cpp = await _both(running, stream)
    assert [a.infer_response.id for a in cpp] == ["k0", "k1", "k2"]
    assert all(a.error_message == "" for a in cpp)
    assert cpp == aio


@in_module_loop
async def test_a_stream_without_requests_ends_with_ok(running: RunningServer) -> None:
    async with _channel(running.cpp_port) as channel:
        call = pb_grpc.EnsembleServiceStub(channel).PredictStream(iter(()), timeout=10)
        assert [a async for a in call] == []
        assert await call.code() == grpc.StatusCode.OK


@in_module_loop
async def test_a_stream_answers_as_its_client_writes_and_ends_when_it_does(
        running: RunningServer) -> None:
    assert running.cpp is not None
    async with _channel(running.cpp_port) as channel:
        call = pb_grpc.EnsembleServiceStub(channel).PredictStream(timeout=30)
        for i in range(2):  # each answered before the next is written
            await call.write(predict_request(digits_input(1, seed=i), request_id=f"s{i}"))
            assert (await asyncio.wait_for(call.read(), 10)).request_id == f"s{i}"
        (call_id, requests), = running.cpp._streams.items()
        assert call_id in running.cpp._calls
        await call.write(predict_request(digits_input(1), request_id="s2"))
        await call.done_writing()
        assert (await asyncio.wait_for(call.read(), 10)).request_id == "s2"
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    with pytest.raises(StopAsyncIteration):  # ended: no read is started again
        await requests.__anext__()


def test_a_stream_is_read_one_message_at_a_time_as_python_asks() -> None:
    """The C++ side reads a stream's next message only when asked (snapfront_read): whatever
    the client has written waits in HTTP/2's flow control, never in the server's memory."""
    server = binding.CppServer("127.0.0.1:0", [], 8, streaming=["/t.T/Stream"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.stream_stream("/t.T/Stream")(iter([b"one", b"", b"three"]),
                                                         timeout=30)
            call_id = _taken_stream(server)
            time.sleep(0.2)  # the client's three messages have had time to arrive
            assert server.messages() == []

            def next_message() -> tuple[int, bytes]:
                assert server.read(call_id)
                (got_id, event, message), = _events(server)
                assert got_id == call_id
                return event, message

            assert [next_message() for _ in range(4)] == [
                (binding.MESSAGE, b"one"), (binding.MESSAGE, b""), (binding.MESSAGE, b"three"),
                (binding.END, b"")]
            assert not server.read(call_id)  # the stream has ended
            assert server.write(call_id, b"answer") == binding.WRITTEN
            server.end(call_id)
            assert list(call) == [b"answer"]
            assert call.code() == grpc.StatusCode.OK
            assert not server.read(call_id)  # answered: no longer the server's
    finally:
        server.stop(1.0)


def test_a_client_that_does_not_read_pauses_its_stream_until_it_does() -> None:
    """Answers the client has not taken pile up only to the pause (16 beyond what its HTTP/2
    window holds): the writer is told to wait, and WRITABLE comes once the client reads."""
    server = binding.CppServer("127.0.0.1:0", [], 8, streaming=["/t.T/Stream"])
    message = b"x" * (64 * 1024)
    try:
        # No BDP probing: the client's window stays at its initial size, filled in a few writes.
        with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                   options=[("grpc.http2.bdp_probe", 0)]) as channel:
            call = channel.stream_stream("/t.T/Stream")(iter(()), timeout=30)
            call_id = _taken_stream(server)
            written = 0
            while written < 1000:  # write while there is room; stop when none comes back
                outcome = server.write(call_id, message)
                written += 1
                if outcome == binding.WRITTEN:
                    continue
                assert outcome == binding.PAUSE
                time.sleep(0.3)
                if not (events := server.messages()):
                    break
                assert events == [(call_id, binding.WRITABLE, b"")]
            assert written < 1000, "the writes never paused"
            read = iter(call)
            for _ in range(written - 2):  # the client takes most of them
                assert next(read) == message
            assert _events(server) == [(call_id, binding.WRITABLE, b"")]
            server.end(call_id)
            assert sum(1 for _ in read) == 2
            assert call.code() == grpc.StatusCode.OK
    finally:
        server.stop(1.0)


def _taken_stream(server: binding.CppServer) -> int:
    """The id of the one call the server has queued (polled for up to 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if taken := server.take():
            (call_id, _, data, _, _), = taken
            assert data == b""  # a stream is queued as it opens, nothing read
            return call_id
        time.sleep(0.01)
    raise AssertionError("no call within 10 s")


def _events(server: binding.CppServer) -> list[tuple[int, int, bytes]]:
    """The streams' next events (polled for up to 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if events := server.messages():
            return events
        time.sleep(0.005)
    raise AssertionError("no stream event within 10 s")


@in_module_loop
async def test_a_stream_its_client_cancels_frees_its_call(running: RunningServer) -> None:
    assert running.cpp is not None
    async with _channel(running.cpp_port) as channel:
        call = pb_grpc.EnsembleServiceStub(channel).PredictStream(timeout=30)
        await call.write(predict_request(digits_input(1), request_id="only"))
        assert (await asyncio.wait_for(call.read(), 10)).request_id == "only"
        call.cancel()  # the handler waits for the next message when its client goes
        front = running.cpp
        await eventually(lambda: not front._calls and not front._streams,
                         "the cancelled stream forgotten")
        await _still_answers(channel)


@in_module_loop
async def test_a_stream_message_that_is_not_a_protobuf_ends_it_as_on_grpc_aio(
        running: RunningServer) -> None:
    async def garbage(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
        call = channel.stream_stream("/snapserve.v1.EnsembleService/PredictStream")(
            iter([b"\xff\xff\xff not a protobuf"]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        return info.value.code(), info.value.details()

    aio, cpp = await _both(running, garbage)
    assert cpp == aio and cpp[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "snapserve.v1.PredictRequest" in cpp[1]


@in_module_loop
async def test_reflection_describes_the_same_services(running: RunningServer) -> None:
    def services(port: int) -> tuple[list[str], list[str]]:  # a blocking client: off the loop
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            kserve = pool.FindServiceByName("inference.GRPCInferenceService")
            return sorted(database.get_services()), [m.name for m in kserve.methods]

    aio = await asyncio.to_thread(services, running.port)
    cpp = await asyncio.to_thread(services, running.cpp_port)
    assert cpp == aio
    assert "grpc.reflection.v1alpha.ServerReflection" in cpp[0]
    assert "ModelStreamInfer" in cpp[1]


@in_module_loop
async def test_unknown_methods_are_unimplemented_and_the_server_goes_on(
        running: RunningServer) -> None:
    async with _channel(running.cpp_port) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/no.Such/Method")(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "not a method of this server" in info.value.details()
        await _still_answers(channel)


@in_module_loop
async def test_a_message_over_the_limit_is_refused_before_python_sees_it(
        tmp_path: Path) -> None:
    async with serving(write_repository(tmp_path / "models"), cpp_grpc_port=0,
                       max_message_bytes=64 * 1024) as running:
        assert running.cpp is not None
        async with _channel(running.cpp_port) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/snapserve.v1.EnsembleService/Predict")(
                    b"\0" * (128 * 1024), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in info.value.details()


@in_module_loop
async def test_tokens_and_tls_guard_the_cpp_port_as_they_guard_grpc_aio(
        tmp_path: Path, pki: Pki) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key,
                              auth_token_file=tokens)
    async with serving(write_repository(tmp_path / "models"), cpp_grpc_port=0,
                       security=security) as running:
        async with tls_channel(running.cpp_port, pki) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(predict_request(digits_input(1)), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = await stub.Predict(predict_request(digits_input(1)), timeout=10,
                                        metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert answer.model == "digits"
            # Streams are guarded alike. Refused before the client writes: grpc.aio's client
            # reports a refusal that ends a stream while it still writes as INTERNAL (a send
            # failed), on either port.
            refused = stub.PredictStream(timeout=10)
            assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED
            answers = [a async for a in stub.PredictStream(
                iter([predict_request(digits_input(1))]), timeout=10,
                metadata=(("authorization", f"Bearer {TOKEN}"),))]
            assert [a.model for a in answers] == ["digits"]
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)  # open, as on grpc.aio
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with tls_channel(running.cpp_port, pki, ca=pki.other_ca) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with _channel(running.cpp_port) as channel:  # plain text on a TLS port
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5)


@in_module_loop
async def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path: Path, pki: Pki) -> None:
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key,
                              tls_client_ca=pki.ca)
    async with serving(write_repository(tmp_path / "models"), cpp_grpc_port=0,
                       security=security) as running:
        async with tls_channel(running.cpp_port, pki,
                               client=(pki.client_cert, pki.client_key)) as channel:
            answer = await pb_grpc.EnsembleServiceStub(channel).Predict(
                predict_request(digits_input(1)), timeout=10)
            assert answer.model == "digits"
        async with tls_channel(running.cpp_port, pki) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.EnsembleServiceStub(channel).Predict(
                    predict_request(digits_input(1)), timeout=5)


@in_module_loop
async def test_a_stop_answers_what_is_in_flight_and_refuses_what_comes_after(
        tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "models")
    # ~0.5 s a run on one thread: in flight for all of the stop's first steps, however loaded.
    write_slow_model(repo, size=256, steps=2000)
    async with serving(repo, cpp_grpc_port=0) as running:
        async with _channel(running.cpp_port) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            x = np.zeros((1, 256, 256), np.float32)
            slow = asyncio.ensure_future(
                stub.Predict(predict_request(x, model="slow"), timeout=30))
            await eventually(lambda: running.registry.get("slow", 0).batcher.in_flight,
                             "the slow call computing")
            stopping = asyncio.ensure_future(running.stop(grace=20))
            await eventually(lambda: running.drain.draining, "the drain begun")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(predict_request(digits_input(1)), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in info.value.details()
            assert (await slow).model == "slow"  # in flight before the stop: answered
            await stopping


def test_a_full_queue_refuses_at_once_and_the_rest_are_answered(tmp_path: Path) -> None:
    """Calls read while the event loop cannot take them queue in C++ up to max_pending_calls;
    beyond it they get RESOURCE_EXHAUSTED without waiting, and the queued ones are answered."""
    config = local_config(write_repository(tmp_path / "models"), cpp_grpc_port=0,
                          intake=IntakeConfig(max_pending_calls=2))
    server = ThreadedServer(config)
    try:
        server.loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop takes nothing for 1 s
        with grpc.insecure_channel(f"127.0.0.1:{server.running.cpp_port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            futures = [stub.Predict.future(predict_request(digits_input(1)), timeout=20)
                       for _ in range(6)]
            outcomes = []
            for future in futures:
                try:
                    future.result()
                    outcomes.append("ok")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                    assert "queue full" in exc.details()
                    outcomes.append("refused")
        assert outcomes.count("ok") == 2 and outcomes.count("refused") == 4, outcomes
        assert server.running.cpp is not None and server.running.cpp.refused == (4, 0, 0)
        assert server.running.metrics.registry.get_sample_value(
            "snapserve_cpp_calls_refused_total", {"reason": "queue_full"}) == 4
    finally:
        server.stop()


async def _health_over_a_connection_of_its_own(port: int) -> tuple[grpc.aio.Channel | None,
                                                                   grpc.StatusCode]:
    """A health check on a channel with a connection of its own (channels to one address
    otherwise share one); the channel, open, when it was answered."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                        options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=5)
        return channel, grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        await channel.close()
        return None, exc.code()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (what it sent meanwhile is read)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(1 << 16):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@in_module_loop
async def test_connections_over_the_cap_are_closed_and_a_closed_one_frees_its_place(
        tmp_path: Path) -> None:
    """--grpc-max-connections holds on the C++ port (libgrpc 1.51 ignores gRPC's own option:
    the front end accepts, counts, and hands each connection to gRPC)."""
    async with serving(write_repository(tmp_path / "models"), cpp_grpc_port=0,
                       connections=ConnectionConfig(max_connections=2)) as running:
        assert running.cpp is not None
        port = running.cpp_port
        first, ok1 = await _health_over_a_connection_of_its_own(port)
        second, ok2 = await _health_over_a_connection_of_its_own(port)
        third, refused = await _health_over_a_connection_of_its_own(port)
        assert (ok1, ok2, refused, third) == (grpc.StatusCode.OK, grpc.StatusCode.OK,
                                              grpc.StatusCode.UNAVAILABLE, None)
        assert running.cpp.refused[2] >= 1
        refusals = running.metrics.registry.get_sample_value(
            "snapserve_cpp_connections_refused_total")
        assert refusals == running.cpp.refused[2]
        assert first is not None and second is not None
        await first.close()  # its place is free once gRPC has closed it
        again: grpc.aio.Channel | None = None

        async def admitted() -> bool:
            nonlocal again
            again, _ = await _health_over_a_connection_of_its_own(port)
            return again is not None

        for _ in range(50):
            if await admitted():
                break
            await asyncio.sleep(0.1)
        assert again is not None, "a closed connection's place was not given back"
        assert (await pb_grpc.EnsembleServiceStub(second).Predict(
            predict_request(digits_input(1)), timeout=10)).model == "digits"
        await again.close()
        await second.close()


@in_module_loop
async def test_a_connection_without_its_preface_in_time_is_closed(tmp_path: Path) -> None:
    """As gRPC's own listener does with its handshake timeout: a connection that sends no
    HTTP/2 preface, or part of one, by then is closed, and one that sends something else at
    once; none keeps a place under the cap."""
    connections = ConnectionConfig(max_connections=2, handshake_timeout_s=0.5)
    async with serving(write_repository(tmp_path / "models"), cpp_grpc_port=0,
                       connections=connections) as running:
        address = ("127.0.0.1", running.cpp_port)
        with socket.create_connection(address) as silent, \
                socket.create_connection(address) as partial, \
                socket.create_connection(address) as http1:
            partial.sendall(b"PRI * HTTP/2")
            http1.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            started = time.monotonic()
            closed = await asyncio.gather(*(asyncio.to_thread(_closed_within, sock, 5)
                                            for sock in (silent, partial, http1)))
            assert closed == [True, True, True]
            assert time.monotonic() - started >= 0.4  # the silent ones had their time
        channel, answered = await _health_over_a_connection_of_its_own(running.cpp_port)
        assert answered == grpc.StatusCode.OK and channel is not None
        await channel.close()


@in_module_loop
async def test_the_grpc_port_itself_through_the_cpp_front_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """grpc_frontend cpp: no grpc.aio port; every method on `port`, through C++."""
    caplog.set_level("INFO", logger="snapserve.server.app")
    async with serving(write_repository(tmp_path / "models"), grpc_frontend="cpp") as running:
        assert running.cpp is not None and running.port == running.cpp_port != 0
        assert f"gRPC port {running.address}: the C++ front end (grpc_frontend cpp)" in caplog.text
        async with _channel(running.port) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            call = stub.Predict(predict_request(digits_input(2)), timeout=10)
            assert (await call).model == "digits"
            assert "x-request-id" in dict(await call.trailing_metadata())
            answers = [a async for a in stub.PredictStream(iter(_stream_requests()), timeout=30)]
            assert [a.request_id for a in answers] == ["r1", "unknown", "r3", "bad", "r2"]
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="digits"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        front = running.cpp
        await eventually(lambda: not front._calls, "every call answered")


@in_module_loop
async def test_a_taken_port_stops_the_start_as_on_grpc_aio(tmp_path: Path) -> None:
    """The C++ front end's own listener shares a port only under --workers (SO_REUSEPORT)."""
    repo = write_repository(tmp_path / "models")
    async with serving(repo, grpc_frontend="cpp") as first:
        with pytest.raises(ConfigError, match=f"cannot bind 127.0.0.1:{first.port}"):
            await start_server(local_config(repo, grpc_frontend="cpp").replace(port=first.port))


def test_auto_takes_the_cpp_front_end_where_it_is_built_and_grpc_aio_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = write_repository(tmp_path / "models")
    auto = local_config(repo, grpc_frontend="auto")
    assert grpc_frontend_for(auto, tls=False) == ("cpp", "auto: the C++ front end is built here")
    assert grpc_frontend_for(auto, tls=True)[0] == "aio"
    assert grpc_frontend_for(auto.replace(cpp_grpc_port=0), tls=False)[0] == "aio"
    assert grpc_frontend_for(ServerConfig(model_repository=repo), tls=False) == (
        "aio", "grpc_frontend aio")  # a ServerConfig made in Python
    monkeypatch.setenv(binding.CPP_DIR_ENV, str(tmp_path / "empty"))  # nothing built there
    frontend, why = grpc_frontend_for(auto, tls=False)
    assert frontend == "aio" and "python -m snapserve.server.cpp.binding" in why
    assert not (tmp_path / "empty").exists()  # auto never compiles


def test_grpc_frontend_cpp_and_a_cpp_port_beside_it_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop one of the two"):
        ServerConfig(model_repository=tmp_path, grpc_frontend="cpp", cpp_grpc_port=0)


def test_cpp_port_must_differ_from_the_others(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cpp_grpc_port 50051 is taken"):
        ServerConfig(model_repository=tmp_path, port=50051, cpp_grpc_port=50051)


def test_a_missing_toolchain_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, no pkg-config
    with pytest.raises(ConfigError, match="apt-get install g\\+\\+ libgrpc\\+\\+-dev"):
        binding._compile(tmp_path / "lib.so")


def test_an_unwritable_build_folder_is_named(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(binding.CPP_DIR_ENV, str(blocker / "cpp"))
    monkeypatch.setattr(binding, "_library", None)
    with pytest.raises(ConfigError, match=f"point {binding.CPP_DIR_ENV} at a writable folder"):
        binding.library()


def test_metadata_pairs_reads_the_c_side_form() -> None:
    assert binding.metadata_pairs(b"") == ()
    assert binding.metadata_pairs(b"a\0b\0authorization\0Bearer x\0") == (
        ("a", "b"), ("authorization", "Bearer x"))


@in_module_loop
async def test_a_call_its_client_cancels_is_dropped_before_compute(tmp_path: Path) -> None:
    # The call waits for company far longer than the test waits: it is in the batcher's queue,
    # not computing, when its cancel arrives, however loaded the machine.
    held = BatcherConfig(max_batch_size=8, max_queue_delay_s=30.0, adaptive_wait=False)
    async with serving(write_repository(tmp_path / "models"), cpp_grpc_port=0,
                       batcher=held) as running:
        assert running.cpp is not None
        batcher = running.registry.get("digits", 0).batcher
        async with _channel(running.cpp_port) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            queued = stub.Predict(predict_request(digits_input(1)), timeout=60)
            # In the batcher's queue, not only taken in: a call cancelled before its handler
            # queues it never reaches the batcher, and nothing counts it as dropped there.
            await eventually(lambda: batcher.queued == 1, "the call in the batcher's queue")
            queued.cancel()
            await eventually(lambda: batcher.stats.dropped_cancelled == 1, "counted as cancelled")
            assert batcher.queued == 0  # its place is free at once
        await eventually(lambda: not running.cpp._calls, "every call answered")
        assert (batcher.stats.items, batcher.stats.batches) == (0, 0)  # never computed


@in_module_loop
async def test_health_watch_streams_the_status_and_frees_its_place_when_cancelled(
        running: RunningServer) -> None:
    watchers = running.health.watchers
    async with _channel(running.cpp_port) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="digits"), timeout=30)
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        assert running.health.watchers == watchers + 1
        watch.cancel()
    await eventually(lambda: running.health.watchers == watchers, "the watch's place freed")
    await eventually(lambda: not running.cpp._calls,  # type: ignore[union-attr]
                     "every call answered")


@in_module_loop
async def test_health_watch_hears_the_drain_and_ends_with_ok(tmp_path: Path) -> None:
    """A client balancing over addresses watches each one: on the C++ port it hears the drain
    (NOT_SERVING) as on the grpc.aio port, and the stream ends with OK, not with the port."""
    async with serving(write_repository(tmp_path / "models"), cpp_grpc_port=0) as running:
        async with _channel(running.cpp_port) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
            statuses = [(await asyncio.wait_for(watch.read(), 10)).status]
            stopping = asyncio.ensure_future(running.stop(grace=5))
            while (answer := await asyncio.wait_for(watch.read(), 10)) is not grpc.aio.EOF:
                statuses.append(answer.status)
            assert await watch.code() == grpc.StatusCode.OK
            await stopping
    assert statuses == [health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING]
