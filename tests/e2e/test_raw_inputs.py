"""Clients send raw inputs: a version trained now normalises inside its graphs, so native gRPC,
KServe gRPC and REST answer with the trainer's own accuracy without any normalize option; a
version exported before (the client normalises) still works with normalize=True."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton
import tritonclient.http.aio as triton_http

from snapserve.client import AsyncEnsembleClient
from snapserve.trainer.datasets import load_dataset
from tests.support.calls import triton_client
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, random_members,
                                  reference_member_probs, write_model_version)
from tests.support.servers import serving
from tests.support.training import train_cli

BATCH = 8  # the test servers' max_batch_size
LEGACY_NORMALIZATION = {"mean": [0.5], "std": [2.0], "axis": 1}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`digits` trained now (raw inputs), and `legacy`, a version as exported before (no kind)."""
    repo = tmp_path_factory.mktemp("models")
    train_cli(repo, "--method", "snapshot", "--dataset", "digits", "--arch", "mlp", "--epochs", "4",
              "--members", "2", "--lr", "0.1", "--seed", "0", "--name", "digits", "--no-plots")
    write_model_version(repo, "legacy", random_members(2, 16, 5, seed=1), DIGITS_SHAPE,
                        DIGITS_CLASSES, normalization=LEGACY_NORMALIZATION)
    return repo


async def _kserve_probabilities(client: object, x: np.ndarray, rest: bool) -> np.ndarray:
    module = triton_http if rest else triton
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = await client.infer("digits", [tensor],  # type: ignore[attr-defined]
                                outputs=[module.InferRequestedOutput("probabilities")])
    return result.as_numpy("probabilities")


async def test_raw_inputs_get_the_trainers_accuracy_on_every_transport(repo: Path) -> None:
    manifest = json.loads((repo / "digits" / "1" / "manifest.json").read_text())
    assert manifest["input"]["kind"] == "raw" and manifest["input"]["normalization"] is not None
    test = load_dataset("digits").test
    x, y = test.x.astype(np.float32), test.y
    async with serving(repo, http_port=0) as running:
        async with AsyncEnsembleClient(f"127.0.0.1:{running.port}") as client:
            assert (await client.get_model("digits")).input.kind == "raw"
            native = np.concatenate([(await client.predict("digits", x[i:i + BATCH])).probabilities
                                     for i in range(0, len(x), BATCH)])
        answers = {"native": native}
        for rest in (False, True):
            async with triton_client(running, rest=rest) as client:
                answers["rest" if rest else "kserve"] = np.concatenate(
                    [await _kserve_probabilities(client, x[i:i + BATCH], rest)
                     for i in range(0, len(x), BATCH)])
                config = await client.get_model_config("digits")
                kind = (config["parameters"]["input_kind"]["string_value"] if rest
                        else config.config.parameters["input_kind"].string_value)
                assert kind == "raw"
    for transport, probs in answers.items():
        accuracy = float((probs.argmax(1) == y).mean())
        assert accuracy == pytest.approx(manifest["metrics"]["accuracy"], abs=1e-9), transport
    assert manifest["metrics"]["accuracy"] > 0.8


async def test_normalize_is_kept_for_old_versions_and_harmless_for_new(repo: Path) -> None:
    x = np.random.default_rng(0).uniform(0, 16, (6, *DIGITS_SHAPE)).astype(np.float32)
    normalized = (x - 0.5) / 2.0
    digits = load_dataset("digits").test.x[:6].astype(np.float32)
    async with serving(repo) as running, AsyncEnsembleClient(f"127.0.0.1:{running.port}") as client:
        assert (await client.get_model("legacy")).input.kind == "normalized"
        legacy = await client.predict("legacy", x, normalize=True, member_probabilities=True)
        raw = await client.predict("digits", digits)
        asked = await client.predict("digits", digits, normalize=True)  # a no-op, with a warning
    expected = reference_member_probs(repo / "legacy" / "1", normalized)
    np.testing.assert_allclose(legacy.member_probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(asked.probabilities, raw.probabilities)
