"""Loading the model repository: the contract's checks, and refusing broken versions alone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest

from snapserve.proto.scores import SCORE_NAMES
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server import BatcherConfig, RuntimeConfig, ServerConfig, start_server
from snapserve.server.errors import ConfigError, FusedOutputsMismatch, ModelNotFound, VersionNotFound
from snapserve.server.models.loading import load_version
from snapserve.server.models.lifecycle import ModelManager
from snapserve.server.models.policy import RepositoryConfig
from snapserve.server.models.registry import ModelRegistry, scan_repository
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, IR_VERSION, OPSET, random_members,
                                  write_model_version)
from tests.support.servers import pinned_runtime


@contextlib.asynccontextmanager
async def loaded(repo: Path) -> AsyncIterator[ModelRegistry]:
    """The registry as the server's start-up load leaves it (no gRPC), closed on the way out."""
    registry = ModelRegistry()
    await ModelManager(repo, RepositoryConfig(), pinned_runtime(), BatcherConfig(),
                       registry).load_all()
    try:
        yield registry
    finally:
        await registry.close()


def write_digits(repo: Path, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    return write_model_version(repo, "digits", random_members(2, 16, 5), DIGITS_SHAPE,
                               DIGITS_CLASSES, **kwargs)


def corrupt_member(version_dir: Path) -> None:
    member = version_dir / "members" / "member-001.onnx"
    member.write_bytes(member.read_bytes() + b"\0")


async def test_checksum_mismatch_refuses_that_model_and_serves_the_others(
        model_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    corrupt_member(model_repo / "digits" / "1")
    caplog.set_level(logging.ERROR, logger="snapserve.server")
    running = await start_server(ServerConfig(model_repository=model_repo, port=0, http_port=None,
                                              runtime=pinned_runtime()))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            listed = await stub.ListModels(pb.ListModelsRequest())
            assert [m.name for m in listed.models] == ["tiny"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModel(pb.GetModelRequest(model="digits"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "models: tiny" in info.value.details()
    finally:
        await running.stop(None)
    refusal = [r.getMessage() for r in caplog.records if "refusing model digits version 1" in r.getMessage()]
    assert refusal and "members/member-001.onnx" in refusal[0] and "sha256" in refusal[0]


async def test_broken_newest_version_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    write_digits(tmp_path)
    corrupt_member(write_digits(tmp_path))  # version 2
    async with loaded(tmp_path) as registry:
        assert registry.versions("digits") == [1]
        assert registry.get("digits").version == 1


async def test_newest_good_version_is_served(tmp_path: Path) -> None:
    write_digits(tmp_path)
    write_digits(tmp_path)
    async with loaded(tmp_path) as registry:
        assert registry.get("digits").version == 2
        assert registry.get("digits", 2).version == 2
        with pytest.raises(VersionNotFound, match=r"no version 1; loaded versions: \[2\]"):
            registry.get("digits", 1)
        with pytest.raises(ModelNotFound, match="'nope' is not served; models: digits"):
            registry.get("nope")


def test_hidden_temporary_and_non_integer_folders_are_ignored(tmp_path: Path) -> None:
    good = write_digits(tmp_path)
    for name in (".tmp-2-abcd", ".partial-3", "latest", "0", "007", "-1"):
        shutil.copytree(good, tmp_path / "digits" / name)
    (tmp_path / ".cache").mkdir()
    (tmp_path / "digits" / "notes.txt").write_text("not a version")
    assert scan_repository(tmp_path) == {"digits": [good]}


@pytest.mark.parametrize("overrides, message", [
    ({"members": [{"file": "../../escape.onnx", "sha256": "0" * 64}]}, "leaves the version folder"),
    ({"members": [{"file": "/etc/passwd", "sha256": "0" * 64}]}, "leaves the version folder"),
    ({"members": [{"file": "members/missing.onnx", "sha256": "0" * 64}]}, "is missing"),
    ({"members": [{"file": "members/member-000.onnx", "sha256": "xyz"}]}, "64 hex digits"),
    ({"schema_version": 2}, "'schema_version' is 2"),
    ({"classes": ["a", "b"]}, "the manifest lists 2 classes"),
    ({"temperature": 0}, "'temperature' must be a number > 0"),
    ({"input": {"name": "input", "dtype": "float32", "shape": [1, 16]}}, "'input.shape'"),
    ({"input": {"name": "wrong", "dtype": "float32", "shape": [-1, 1, 4, 4]}}, "expects exactly ['wrong']"),
    ({"output": {"name": "probs", "kind": "logits"}}, "expects 'probs'"),
    ({"members": []}, "'members' is empty"),
])
async def test_broken_manifests_are_refused_with_a_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, overrides: dict, message: str) -> None:
    write_digits(tmp_path, manifest_overrides=overrides)
    write_model_version(tmp_path, "tiny", random_members(2, 3, 2), (3,), ["no", "yes"])
    async with loaded(tmp_path) as registry:
        assert registry.names() == ["tiny"]
    assert any("refusing model digits version 1" in r.getMessage() and message in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_invalid_json_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    version = write_digits(tmp_path)
    (version / "manifest.json").write_text("{not json")
    async with loaded(tmp_path) as registry:
        assert registry.names() == []
    assert any("not valid JSON" in r.getMessage() for r in caplog.records)


async def test_a_copied_folder_is_served_under_its_folder_name(tmp_path: Path) -> None:
    version = write_digits(tmp_path)
    shutil.copytree(version.parent, tmp_path / "digits-copy")
    async with loaded(tmp_path) as registry:
        assert registry.names() == ["digits", "digits-copy"]
        assert json.loads(registry.get("digits-copy").manifest.text)["name"] == "digits"


def test_config_checks_the_repository_and_names_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_repository"):
        ServerConfig(model_repository=tmp_path / "absent")
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(model_repository=tmp_path, port=70000)
    with pytest.raises(ConfigError, match="device"):
        RuntimeConfig(device="tpu")
    with pytest.raises(ConfigError, match="intra_op_threads"):
        RuntimeConfig(intra_op_threads=-1)


def stale_fused_graph(outputs: list[str]) -> bytes:
    """A fused graph by its interface only: the members' input, the temperature as an
    overridable default, and these outputs (each a copy of the temperature)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["temperature"], [name]) for name in outputs], "fused",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *DIGITS_SHAPE]),
         helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, []) for name in outputs],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "temperature")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


async def test_a_fused_graph_with_other_score_names_refuses_the_version(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fused graph written for other scores (here `member_kl` renamed) is not quietly
    replaced by the members: the version is refused, and the log names the outputs that differ."""
    outputs = [("kl_to_mean" if name == "member_kl" else name) for name in SCORE_NAMES]
    data = stale_fused_graph(outputs)
    version = write_digits(tmp_path, manifest_overrides={"ensemble": {
        "file": "ensemble.onnx", "sha256": hashlib.sha256(data).hexdigest()}})
    (version / "ensemble.onnx").write_bytes(data)
    with pytest.raises(FusedOutputsMismatch, match=r"missing \['member_kl'\], unexpected "
                                                   r"\['kl_to_mean'\]"):
        load_version(version, RuntimeConfig(), BatcherConfig())
    async with loaded(tmp_path) as registry:
        assert registry.names() == []
    refusals = [r.getMessage() for r in caplog.records
                if "refusing model digits version 1" in r.getMessage()]
    assert refusals and "do not match the score names" in refusals[0]
    assert "missing ['member_kl']" in refusals[0] and "unexpected ['kl_to_mean']" in refusals[0]


def test_a_fused_graph_without_member_probabilities_refuses_the_version(tmp_path: Path) -> None:
    """The scores a fused graph lacks are computed from its member probabilities: a graph
    without them cannot be completed, so the version is refused, saying why."""
    data = stale_fused_graph([n for n in SCORE_NAMES if n != "member_probabilities"])
    version = write_digits(tmp_path, manifest_overrides={"ensemble": {
        "file": "ensemble.onnx", "sha256": hashlib.sha256(data).hexdigest()}})
    (version / "ensemble.onnx").write_bytes(data)
    with pytest.raises(FusedOutputsMismatch, match=r"lack \['member_probabilities'\]"):
        load_version(version, RuntimeConfig(), BatcherConfig())


def test_a_fused_graph_that_predates_a_score_still_serves_it(tmp_path: Path) -> None:
    """A fused graph exported before `expected_entropy` existed (the output removed with onnx)
    loads, serves with the fused graph, and answers the score from its member probabilities."""
    import onnx

    from snapserve.proto.scores import expected_entropy
    from snapserve.trainer.fuse import fuse_members
    from tests.support.models import reference_member_probs

    version = write_digits(tmp_path)
    manifest = json.loads((version / "manifest.json").read_text())
    fused = fuse_members([onnx.load(str(version / m["file"])) for m in manifest["members"]])
    kept = [o for o in fused.graph.output if o.name != "expected_entropy"]
    del fused.graph.output[:]
    fused.graph.output.extend(kept)
    data = fused.SerializeToString()
    (version / "ensemble.onnx").write_bytes(data)
    manifest["ensemble"] = {"file": "ensemble.onnx", "sha256": hashlib.sha256(data).hexdigest()}
    (version / "manifest.json").write_text(json.dumps(manifest))
    served = load_version(version, RuntimeConfig(device="cpu", graph="fused", intra_op_threads=1,
                                                 instances=1), BatcherConfig(max_batch_size=4))
    assert served.runtime.graph == "fused"
    x = np.random.default_rng(0).uniform(0, 16, (5, *DIGITS_SHAPE)).astype(np.float32)
    np.testing.assert_allclose(served.runtime.scores(x).expected_entropy,
                               expected_entropy(reference_member_probs(version, x)),
                               rtol=1e-5, atol=2e-6)
