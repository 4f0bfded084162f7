"""Faults in the model repository: a broken version is refused at load, with a log line, a metric
(snapserve_model_load_failures_total{model,reason}) and a reason clients can read (NOT_FOUND
messages, KServe RepositoryIndex); the server keeps serving the previous version and the other
models. tests/server/test_repository.py covers the manifest rules one by one; this file injects
each kind of fault into a running server's repository and checks what clients and operators see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.proto.tensors import from_tensor
from snapserve.server import RunningServer
from tests.support.calls import digits_input, predict_request
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, IR_VERSION, OPSET, random_members,
                                  reference_member_probs, write_model_version)
from tests.support.servers import serving

MEMBER = "members/member-001.onnx"


def _rewrite_manifest(version: Path, change: Callable[[dict], None]) -> None:
    path = version / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _replace_member(version: Path, data: bytes, update_checksum: bool) -> None:
    (version / MEMBER).write_bytes(data)
    if update_checksum:  # a consistent manifest over a broken file: only loading can tell
        def fix(manifest: dict) -> None:
            manifest["members"][1]["sha256"] = hashlib.sha256(data).hexdigest()
        _rewrite_manifest(version, fix)


def corrupted(version: Path) -> None:
    _replace_member(version, os.urandom(4000), update_checksum=True)


def truncated(version: Path) -> None:
    data = (version / MEMBER).read_bytes()
    _replace_member(version, data[: len(data) // 2], update_checksum=True)


def truncated_in_place(version: Path) -> None:
    data = (version / MEMBER).read_bytes()
    _replace_member(version, data[: len(data) // 2], update_checksum=False)


def missing(version: Path) -> None:
    (version / MEMBER).unlink()


def bit_flip(version: Path) -> None:
    data = bytearray((version / MEMBER).read_bytes())
    data[len(data) // 2] ^= 0x01
    _replace_member(version, bytes(data), update_checksum=False)


def not_json(version: Path) -> None:
    (version / "manifest.json").write_text('{"schema_version": 1, "members": [')


def file_outside(version: Path) -> None:
    # a real, valid member file, but of another version: outside this version's folder
    def point_out(manifest: dict) -> None:
        manifest["members"][1]["file"] = "../1/members/member-000.onnx"
    _rewrite_manifest(version, point_out)


def symlink_outside(version: Path) -> None:
    (version / MEMBER).unlink()
    (version / MEMBER).symlink_to(version.parent / "1" / "members" / "member-000.onnx")


def graph(input_type: int = TensorProto.FLOAT, input_shape: tuple = ("batch", 1, 4, 4),
          classes: int = 5) -> onnx.ModelProto:
    """logits = flatten(x) @ W, with the input declared as given."""
    w = np.ones((int(np.prod(input_shape[1:])), classes), np.float32)
    nodes = [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["logits"])]
    model = helper.make_model(helper.make_graph(
        nodes, "member", [helper.make_tensor_value_info("input", input_type, list(input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W")]),
        opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def graph_of(model: onnx.ModelProto) -> Callable[[Path], None]:
    def swap(version: Path) -> None:
        _replace_member(version, model.SerializeToString(), update_checksum=True)
    return swap


# fault -> (reason label, what the refusal says)
FAULTS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "corrupted member": (corrupted, "invalid_onnx", "member-001.onnx: ONNX Runtime cannot load it"),
    "truncated member": (truncated, "invalid_onnx", "member-001.onnx: ONNX Runtime cannot load it"),
    "truncated in place": (truncated_in_place, "checksum", "has sha256"),
    "flipped bit": (bit_flip, "checksum", "the manifest says"),
    "missing member": (missing, "missing_file", f"member file '{MEMBER}' is missing"),
    "manifest not JSON": (not_json, "manifest", "manifest.json is not valid JSON"),
    "file outside the folder": (file_outside, "manifest", "leaves the version folder"),
    "symlink outside the folder": (symlink_outside, "manifest", "leaves the version folder"),
    "input dtype differs": (graph_of(graph(TensorProto.DOUBLE)), "graph_mismatch",
                            "its input 'input' is tensor(double); the manifest declares float32"),
    "input rank differs": (graph_of(graph(input_shape=("batch", 16))), "graph_mismatch",
                           "has shape ['batch', 16]; the manifest declares float32 [-1, 1, 4, 4]"),
    "input size differs": (graph_of(graph(input_shape=("batch", 1, 4, 8))), "graph_mismatch",
                           "(size 8 on axis 3)"),
    "batch size fixed": (graph_of(graph(input_shape=(1, 1, 4, 4))), "graph_mismatch",
                         "(a fixed batch size)"),
    "class count differs": (graph_of(graph(classes=3)), "graph_mismatch",
                            "warm-up inference failed: members returned logits of shapes "
                            "[(1, 3), (1, 5)]"),
}


def load_failures(running: RunningServer, model: str, reason: str) -> float:
    value = running.metrics.registry.get_sample_value(
        "snapserve_model_load_failures_total", {"model": model, "reason": reason})
    return value or 0.0


async def health(channel: grpc.aio.Channel, service: str) -> str:
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service))
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_broken_new_version_is_refused_and_the_previous_one_served(
        model_repo: Path, caplog: pytest.LogCaptureFixture, fault: str) -> None:
    inject, reason, says = FAULTS[fault]
    v2 = write_model_version(model_repo, "digits", random_members(3, 16, 5, seed=9), DIGITS_SHAPE,
                             DIGITS_CLASSES)
    inject(v2)
    caplog.set_level(logging.INFO)
    async with serving(model_repo) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            x = digits_input(2, seed=3)
            response = await stub.Predict(predict_request(x))
            assert response.version == 1  # the previous version answers, correctly
            expected = reference_member_probs(model_repo / "digits" / "1", x).mean(axis=1)
            np.testing.assert_allclose(from_tensor(response.probabilities), expected, rtol=1e-5,
                                       atol=1e-6)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModel(pb.GetModelRequest(model="digits", version=2))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "has no version 2 (refused at load:" in info.value.details()
            assert says in info.value.details()
            assert await health(channel, "digits") == "SERVING"  # version 1 serves
            index = await kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                kpb.RepositoryIndexRequest())
            states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
            assert states[("digits", "1")] == ("READY", "")
            assert states[("digits", "2")][0] == "UNAVAILABLE" and says in states[("digits", "2")][1]
            assert states[("tiny", "1")] == ("READY", "")
        assert load_failures(running, "digits", reason) == 1
    refusals = [r for r in caplog.records if "refusing model digits version 2" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
    assert says in refusals[0].getMessage()


async def test_a_model_with_no_loadable_version_is_not_serving_and_says_why(
        model_repo: Path) -> None:
    corrupted(model_repo / "digits" / "1")
    async with serving(model_repo) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            assert await health(channel, "digits") == "NOT_SERVING"
            assert await health(channel, "tiny") == "SERVING"
            assert await health(channel, "") == "SERVING"  # the server serves its other models
            stub = pb_grpc.EnsembleServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(predict_request(digits_input(1)))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert ("model 'digits' is not served; version 1 was refused at load: "
                    "member-001.onnx: ONNX Runtime cannot load it") in info.value.details()
            assert info.value.details().endswith("models: tiny")
            tiny = await stub.Predict(pb.PredictRequest(
                model="tiny", input=predict_request(np.zeros((1, 3), np.float32)).input))
            assert from_tensor(tiny.probabilities).shape == (1, 2)
        assert load_failures(running, "digits", "invalid_onnx") == 1


async def test_a_version_broken_while_serving_is_refused_and_the_old_one_stays(
        model_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(model_repo) as running:
        v2 = write_model_version(model_repo, "digits", random_members(3, 16, 5, seed=4),
                                 DIGITS_SHAPE, DIGITS_CLASSES)
        truncated(v2)
        await running.manager.poll_once()  # what the poller does every poll_interval_s
        await running.manager.poll_once()  # unchanged since: not tried (or logged) again
        assert running.registry.versions("digits") == [1]
        assert load_failures(running, "digits", "invalid_onnx") == 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            response = await pb_grpc.EnsembleServiceStub(channel).Predict(
                predict_request(digits_input(1)))
            assert response.version == 1
        # a fixed upload (a new folder, as the trainer writes) is picked up
        write_model_version(model_repo, "digits", random_members(3, 16, 5, seed=5), DIGITS_SHAPE,
                            DIGITS_CLASSES)
        await running.manager.poll_once()
        assert running.registry.versions("digits") == [3]
    assert sum("refusing model digits version 2" in r.getMessage() for r in caplog.records) == 1
