"""Model lifecycle: version policies, hot reload under load, removals, explicit load/unload."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from snapserve.server import RunningServer
from snapserve.server.process.cli import load_config
from snapserve.server.api.pipeline import submit
from snapserve.server.errors import ConfigError, VersionNotFound
from snapserve.server.models.policy import RepositoryConfig
from snapserve.server.models.registry import ModelRegistry
from tests.support.calls import digits_input, native_predict, native_stub, triton_client
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, random_members,
                                  reference_member_probs, write_model_version)
from tests.support.servers import serving


def add_digits_version(repo: Path, seed: int) -> Path:
    """A new digits version whose members have other weights, so its answers differ."""
    return write_model_version(repo, "digits", random_members(3, 16, 5, seed=seed), DIGITS_SHAPE,
                               DIGITS_CLASSES)


def expected_probabilities(version_dir: Path, x: np.ndarray) -> np.ndarray:
    return reference_member_probs(version_dir, x).mean(axis=1)


def infer_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


async def kserve_probabilities(client: triton.InferenceServerClient, x: np.ndarray,
                               version: str = "") -> tuple[str, np.ndarray]:
    result = await client.infer("digits", [infer_input(x)], model_version=version,
                                outputs=[triton.InferRequestedOutput("probabilities")])
    return result.get_response().model_version, result.as_numpy("probabilities")


async def test_latest_serves_the_newest_version_only(model_repo: Path) -> None:
    v2 = add_digits_version(model_repo, seed=7)
    x = digits_input(2)
    async with serving(model_repo) as running, triton_client(running) as client:
        assert running.registry.versions("digits") == [2]
        version, probs = await kserve_probabilities(client, x, "2")
        assert version == "2"
        np.testing.assert_allclose(probs, expected_probabilities(v2, x), rtol=1e-5)
        with pytest.raises(InferenceServerException, match="no version 1"):
            await kserve_probabilities(client, x, "1")


async def test_all_serves_every_version_and_requests_pick_one(model_repo: Path) -> None:
    v1, v2 = model_repo / "digits" / "1", add_digits_version(model_repo, seed=7)
    x = digits_input(2)
    async with serving(model_repo, repository=RepositoryConfig(version_policy="all")) as running, \
            triton_client(running) as client, native_stub(running) as stub:
        assert running.registry.versions("digits") == [1, 2]
        for version, version_dir in (("1", v1), ("2", v2)):
            _, kserve = await kserve_probabilities(client, x, version)
            native = await native_predict(stub, x, version=int(version))
            np.testing.assert_allclose(kserve, expected_probabilities(version_dir, x), rtol=1e-5)
            np.testing.assert_allclose(native["probabilities"], kserve, rtol=1e-6)
        assert (await kserve_probabilities(client, x))[0] == "2"  # the default: the newest
        assert int((await native_predict(stub, x))["version"]) == 2
        config = (await client.get_model_config("digits")).config
        assert config.version_policy.HasField("all")


async def test_specific_serves_pinned_versions_only(model_repo: Path) -> None:
    add_digits_version(model_repo, seed=7)
    policy = RepositoryConfig(version_policy="specific", pinned={"digits": (1,)})
    async with serving(model_repo, repository=policy) as running, \
            triton_client(running) as client:
        assert running.registry.names() == ["digits"] and running.registry.versions("digits") == [1]
        assert not await client.is_model_ready("tiny")
        index = {(m.name, m.version): (m.state, m.reason)
                 for m in (await client.get_model_repository_index()).models}
        assert index[("digits", "1")] == ("READY", "")
        assert index[("digits", "2")] == ("UNAVAILABLE", "not selected by version policy specific")
        assert index[("tiny", "1")][0] == "UNAVAILABLE"
        config = (await client.get_model_config("digits")).config
        assert list(config.version_policy.specific.versions) == [1]


async def test_a_new_version_is_picked_up_and_the_old_one_unloaded(model_repo: Path) -> None:
    x = digits_input(3)
    async with serving(model_repo) as running, triton_client(running) as client:
        old = running.registry.get("digits")
        v2 = add_digits_version(model_repo, seed=7)
        await running.manager.poll_once()
        assert running.registry.versions("digits") == [2]
        version, probs = await kserve_probabilities(client, x)
        assert version == "2"
        np.testing.assert_allclose(probs, expected_probabilities(v2, x), rtol=1e-5)
        with pytest.raises(Exception):  # closed: takes no more requests
            await old.predict(x)


async def test_a_broken_new_version_is_refused_once_and_the_old_one_stays(model_repo: Path) -> None:
    write_model_version(model_repo, "digits", random_members(3, 16, 5, seed=7), DIGITS_SHAPE,
                        DIGITS_CLASSES, manifest_overrides={"classes": ["only-one"]})
    async with serving(model_repo, metrics_port=0) as running, triton_client(running) as client:
        assert running.registry.versions("digits") == [1]
        await running.manager.poll_once()  # unchanged since refused: not tried again
        assert running.metrics.load_failures.labels("digits", "graph_mismatch")._value.get() == 1
        index = {(m.name, m.version): (m.state, m.reason)
                 for m in (await client.get_model_repository_index()).models}
        state, reason = index[("digits", "2")]
        assert state == "UNAVAILABLE" and "manifest lists 1 classes" in reason
        assert (await kserve_probabilities(client, digits_input(1)))[0] == "1"


async def test_removed_versions_roll_back_and_removed_models_go(model_repo: Path) -> None:
    v2 = add_digits_version(model_repo, seed=7)
    async with serving(model_repo) as running, triton_client(running) as client:
        assert running.registry.versions("digits") == [2]
        shutil.rmtree(v2)
        shutil.rmtree(model_repo / "tiny")
        await running.manager.poll_once()
        assert running.registry.versions("digits") == [1]  # the newest left on disk
        assert running.registry.names() == ["digits"]
        assert not await client.is_model_ready("tiny")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:  # forgotten, not just down
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="tiny"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_hot_reload_under_load_fails_no_request(model_repo: Path) -> None:
    """Clients of both APIs send requests back to back while the trainer writes version 2 and
    the poller switches to it: every request succeeds, each with the answer of the version that
    says it answered, and each client sees version 1 and then only version 2."""
    x = digits_input(2, seed=11)
    expected = {1: expected_probabilities(model_repo / "digits" / "1", x)}
    switched = asyncio.Event()
    answers: dict[str, list[tuple[int, np.ndarray]]] = {}

    def done(name: str) -> bool:  # five answers from version 2 once the switch happened
        return switched.is_set() and sum(v == 2 for v, _ in answers[name]) >= 5

    def record(name: str, version: int, probs: np.ndarray) -> None:
        answers[name].append((version, probs))
        if version == 2:
            switched.set()

    async def native_client(name: str, running: RunningServer) -> None:
        async with native_stub(running) as stub:
            while not done(name):
                scores = await native_predict(stub, x)
                record(name, int(scores["version"]), scores["probabilities"])

    async def kserve_client(name: str, running: RunningServer) -> None:
        async with triton_client(running) as client:
            while not done(name):
                version, probs = await kserve_probabilities(client, x)
                record(name, int(version), probs)

    async with serving(model_repo, repository=RepositoryConfig(poll_interval_s=0.02)) as running:
        clients = []
        for i, run in enumerate([native_client, native_client, kserve_client, kserve_client]):
            answers[f"c{i}"] = []
            clients.append(asyncio.ensure_future(run(f"c{i}", running)))
        while min(len(a) for a in answers.values()) < 3:  # everyone is busy with version 1
            await asyncio.sleep(0.01)
        v2 = await asyncio.to_thread(add_digits_version, model_repo, 7)
        expected[2] = expected_probabilities(v2, x)
        await asyncio.wait_for(asyncio.gather(*clients), timeout=60)  # raises if any request failed
        assert running.registry.versions("digits") == [2]
    assert not np.allclose(expected[1], expected[2], atol=1e-3)
    for name, seen in answers.items():
        versions = [v for v, _ in seen]
        assert versions[0] == 1 and versions[-1] == 2, name
        assert versions == sorted(versions), f"{name} went back to version 1: {versions}"
        for version, probs in seen:
            np.testing.assert_allclose(probs, expected[version], rtol=1e-5, atol=1e-6)


async def test_a_request_for_a_retired_version_is_sent_to_its_replacement(
        model_repo: Path) -> None:
    add_digits_version(model_repo, seed=7)
    x = digits_input(1)
    async with serving(model_repo, repository=RepositoryConfig(version_policy="all")) as running:
        registry: ModelRegistry = running.registry
        v1, v2 = registry.get("digits", 1), registry.get("digits", 2)
        # Version 2 is retired after a request looked it up as the default, before it was queued.
        registry.remove("digits", 2)
        await v2.close()
        served, scores = await submit(registry, v2, 0, x)
        assert served is v1 and scores.probabilities.shape == (1, 5)
        with pytest.raises(VersionNotFound):  # a retired version asked for by number: gone
            await submit(registry, v2, 2, x)


async def test_explicit_unload_and_load(model_repo: Path) -> None:
    control = RepositoryConfig(allow_repository_control=True)
    async with serving(model_repo, repository=control) as running, \
            triton_client(running) as client:
        await client.unload_model("digits")
        assert not await client.is_model_ready("digits")
        with pytest.raises(InferenceServerException, match="not served"):
            await kserve_probabilities(client, digits_input(1))
        await running.manager.poll_once()  # polls leave an unloaded model alone
        assert "digits" not in running.registry
        index = {(m.name, m.version): (m.state, m.reason)
                 for m in (await client.get_model_repository_index()).models}
        assert index[("digits", "1")] == ("UNAVAILABLE", "unloaded by request")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            ready = await tpb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                tpb.RepositoryIndexRequest(ready=True))
        assert [m.name for m in ready.models] == ["tiny"]
        await client.load_model("digits")
        assert await client.is_model_ready("digits")
        assert (await kserve_probabilities(client, digits_input(1)))[0] == "1"
        v2 = add_digits_version(model_repo, seed=7)
        await client.load_model("digits")  # a load of a loaded model picks up new versions
        assert running.registry.versions("digits") == [2] and v2.exists()


@pytest.mark.parametrize("name", ["", "..", "a/b", "../models", "-x", "a" * 300])
async def test_names_that_are_not_plain_are_invalid_argument(model_repo: Path, name: str) -> None:
    control = RepositoryConfig(allow_repository_control=True)
    async with serving(model_repo, repository=control) as running, \
            triton_client(running) as client:
        for call in (client.load_model(name), client.unload_model(name)):
            with pytest.raises(InferenceServerException) as info:
                await call
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "is not a model name" in info.value.message()


async def test_explicit_load_failures_say_why(model_repo: Path) -> None:
    write_model_version(model_repo, "broken", random_members(1, 3, 2), (3,), ["a", "b"],
                        manifest_overrides={"classes": ["a", "b", "c"]})
    control = RepositoryConfig(allow_repository_control=True)
    async with serving(model_repo, repository=control) as running, \
            triton_client(running) as client:
        cases = [(client.load_model("nope"), "StatusCode.NOT_FOUND", "no version folder"),
                 (client.load_model("broken"), "StatusCode.FAILED_PRECONDITION",
                  "version 1: members output 2 logits; the manifest lists 3 classes"),
                 (client.load_model("tiny", config='{"max_batch_size": 2}'),
                  "StatusCode.INVALID_ARGUMENT", "not supported"),
                 (client.unload_model("nope"), "StatusCode.NOT_FOUND", "neither loaded")]
        for call, status, message in cases:
            with pytest.raises(InferenceServerException) as info:
                await call
            assert (info.value.status(), message in info.value.message()) == (status, True), \
                info.value.message()
        assert running.registry.names() == ["digits", "tiny"]


def test_repository_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="version_policy must be one of"):
        RepositoryConfig(version_policy="newest")
    with pytest.raises(ConfigError, match="need version_policy 'specific'"):
        RepositoryConfig(pinned={"digits": (2,)})
    with pytest.raises(ConfigError, match="needs pinned versions"):
        RepositoryConfig(version_policy="specific")
    with pytest.raises(ConfigError, match=r"pinned\['digits'\] must list versions >= 1"):
        RepositoryConfig(version_policy="specific", pinned={"digits": (0,)})
    with pytest.raises(ConfigError, match="pinned '../x' is not a model name"):
        RepositoryConfig(version_policy="specific", pinned={"../x": (1,)})
    with pytest.raises(ConfigError, match="poll_interval_s must be a number >= 0"):
        RepositoryConfig(poll_interval_s=-1)


def test_flags_map_onto_the_config(model_repo: Path) -> None:
    _, config = load_config([
        "--model-repository", str(model_repo), "--version-policy", "specific",
        "--pin", "digits=1,2", "--pin", "tiny=1", "--poll-interval", "2.5",
        "--allow-repository-control", "--metrics-port", "9100"], {})
    assert config.repository == RepositoryConfig(
        version_policy="specific", pinned={"digits": (1, 2), "tiny": (1,)}, poll_interval_s=2.5,
        allow_repository_control=True)
    assert config.metrics_port == 9100
    _, from_env = load_config(["--model-repository", str(model_repo)],
                              {"SNAPSERVE_PIN": "digits=2 tiny=1", "SNAPSERVE_VERSION_POLICY": "specific"})
    assert from_env.repository.pinned == {"digits": (2,), "tiny": (1,)}
    with pytest.raises(ConfigError, match="pin 'digits' is not MODEL=VERSION"):
        load_config(["--model-repository", str(model_repo), "--pin", "digits"], {})
