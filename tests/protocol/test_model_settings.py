"""Per-model settings (`<model>/model-settings.yaml`): they override the server's defaults for that
model, are picked up on reload, are reported by GetModel and KServe ModelConfig, and a bad file is
refused with the key named while the model keeps what it had."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.server.errors import ModelSettingsError
from snapserve.server.models.settings import SETTINGS_FILE, parse_model_settings
from tests.support.calls import digits_input, native_predict, native_stub, triton_client
from tests.support.models import DIGITS_CLASSES, DIGITS_SHAPE, random_members, write_model_version
from tests.support.servers import serving


def write_settings(repo: Path, model: str, text: str) -> None:
    path = repo / model / SETTINGS_FILE
    path.write_text(text)
    stat = path.stat()  # a distinct mtime even within one clock tick
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


async def runtime_of(running, model: str) -> dict[str, str]:
    async with native_stub(running) as stub:
        return dict((await stub.GetModel(pb.GetModelRequest(model=model))).runtime)


async def test_settings_override_the_server_defaults_for_that_model_only(model_repo: Path) -> None:
    write_settings(model_repo, "digits", "max_batch_size: 2\nmax_queue_delay_ms: 0.5\n"
                                         "instances: 2\ngraph: members\n")
    async with serving(model_repo) as running:
        digits, tiny = running.registry.get("digits"), running.registry.get("tiny")
        assert digits.max_batch_size == 2 and len(digits.instances) == 2
        assert digits.batcher.config.max_queue_delay_s == pytest.approx(0.0005)
        assert tiny.max_batch_size == 8 and len(tiny.instances) == 1  # the server's (fast_batching)
        runtime = await runtime_of(running, "digits")
        assert runtime["max_batch_size"] == "2" and runtime["instances"] == "2"
        assert runtime["settings_file"] == "graph,instances,max_batch_size,max_queue_delay_ms"
        assert (await runtime_of(running, "tiny"))["settings_file"] == "none"
        async with triton_client(running) as client:
            config = (await client.get_model_config("digits", as_json=True))["config"]
            assert config["max_batch_size"] == 2
            assert config["parameters"]["max_queue_delay_ms"]["string_value"] == "0.5"
        async with native_stub(running) as stub:  # a request larger than the model's own bound
            x = digits_input(3)
            with pytest.raises(Exception, match="2"):
                await native_predict(stub, x)


async def test_a_changed_file_reloads_the_model_under_load_without_a_failed_request(
        model_repo: Path) -> None:
    async with serving(model_repo) as running:
        assert running.registry.get("digits").max_batch_size == 8
        stop = asyncio.Event()
        failures: list[BaseException] = []
        answered = 0

        async def load() -> None:
            nonlocal answered
            async with native_stub(running) as stub:
                while not stop.is_set():
                    try:
                        await native_predict(stub, digits_input(1))
                        answered += 1
                    except Exception as exc:  # noqa: BLE001 (counted, then asserted empty)
                        failures.append(exc)

        clients = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.2)
        write_settings(model_repo, "digits", "max_batch_size: 4\n")
        await running.manager.poll_once()
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)
        assert not failures, failures[:3]
        assert answered > 0
        assert running.registry.get("digits").max_batch_size == 4
        assert running.registry.versions("digits") == [1]


async def test_a_bad_file_names_the_key_and_the_previous_settings_stay(
        model_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_settings(model_repo, "digits", "max_batch_size: 4\n")
    async with serving(model_repo, metrics_port=0) as running:
        before = running.registry.get("digits")
        write_settings(model_repo, "digits", "max_batch_size: 4\nmax_batch_sise: 8\n")
        await running.manager.poll_once()
        await running.manager.poll_once()  # the same bad file: logged once
        assert running.registry.get("digits") is before and before.max_batch_size == 4
        refusals = [r.getMessage() for r in caplog.records if "keeping its previous settings" in r.getMessage()]
        assert len(refusals) == 1 and "max_batch_sise" in refusals[0]
        assert running.metrics.load_failures.labels("digits", "settings")._value.get() == 1
        write_settings(model_repo, "digits", "max_batch_size: -1\n")
        await running.manager.poll_once()
        assert running.registry.get("digits") is before
        assert "max_batch_size must be an integer >= 1" in caplog.text
        # The file fixed: taken up on the next poll.
        write_settings(model_repo, "digits", "max_batch_size: 3\n")
        await running.manager.poll_once()
        assert running.registry.get("digits").max_batch_size == 3


async def test_a_model_whose_first_settings_are_bad_is_not_loaded_until_fixed(model_repo: Path) -> None:
    write_settings(model_repo, "digits", "graph: fastest\n")
    async with serving(model_repo) as running:
        assert "digits" not in running.registry and "tiny" in running.registry
        async with triton_client(running) as client:
            index = {(m.name, m.version): (m.state, m.reason)
                     for m in (await client.get_model_repository_index()).models}
        state, reason = index[("digits", "1")]
        assert state == "UNAVAILABLE" and "graph must be one of" in reason and SETTINGS_FILE in reason
        write_settings(model_repo, "digits", "graph: members\n")
        await running.manager.poll_once()
        assert running.registry.get("digits").runtime.graph == "members"


async def test_a_model_may_pin_its_own_versions(model_repo: Path) -> None:
    for seed in (7, 8):
        write_model_version(model_repo, "digits", random_members(3, 16, 5, seed=seed), DIGITS_SHAPE,
                            DIGITS_CLASSES)
    write_settings(model_repo, "digits", "version_policy: specific\nversions: [1, 2]\n")
    async with serving(model_repo) as running:
        assert running.registry.versions("digits") == [1, 2]
        assert running.registry.versions("tiny") == [1]  # the server's policy: latest
        write_settings(model_repo, "digits", "version_policy: latest\n")
        await running.manager.poll_once()
        assert running.registry.versions("digits") == [3]
        async with native_stub(running) as stub:
            scores = await native_predict(stub, digits_input(2))
        assert int(scores["version"]) == 3 and scores["probabilities"].shape == (2, 5)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a mapping"),
    ("max_batch_size: 'x'", "max_batch_size must be an integer, got 'x'"),
    ("instances: true", "instances must be an integer, got True"),
    ("max_queue_delay_ms: .inf", "max_queue_delay_ms must be a finite number, got inf"),
    ("max_queue_delay_ms: .nan", "max_queue_delay_ms must be a finite number"),
    ("max_queue_delay_ms: 100000.0", "max_queue_delay_ms must be a number <= 60000, got 100000.0"),
    ("intra_op_threads: 100000", "intra_op_threads must be an integer <= 1024, got 100000"),
    ("graph: fastest", "graph must be one of 'auto', 'fused' or 'members', got 'fastest'"),
    ("versions: [0]", "versions must be a list of integers >= 1"),
    ("colour: blue", "unknown key(s) 'colour'; expected some of"),
    ("max_batch_size: [", "not valid YAML"),
])
def test_bad_settings_name_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ModelSettingsError) as caught:
        parse_model_settings(text, SETTINGS_FILE)
    assert message in str(caught.value) and SETTINGS_FILE in str(caught.value)
