"""The sync client, the async client and the CLI against a real server."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from snapserve.client import AsyncEnsembleClient, ClientError, EnsembleClient, Prediction
from snapserve.client.cli import main
from snapserve.server import RunningServer
from tests.support.models import DIGITS_CLASSES, reference_member_probs
from tests.support.servers import ThreadedServer


def raw_digits(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(batch, 1, 4, 4)).astype(np.float32)


def expected_probabilities(repo: Path, x: np.ndarray) -> np.ndarray:
    return reference_member_probs(repo / "digits" / "1", x).mean(axis=1)


def test_sync_predict_and_normalize(threaded_server: ThreadedServer, model_repo: Path) -> None:
    x = raw_digits(3)
    with EnsembleClient(threaded_server.target, timeout=10) as client:
        p = client.predict("digits", x)
        assert isinstance(p, Prediction) and len(p) == 3
        assert (p.model, p.version) == ("digits", 1)
        np.testing.assert_allclose(p.probabilities, expected_probabilities(model_repo, x), rtol=1e-5)
        assert list(p.top_label) == [DIGITS_CLASSES[i] for i in p.top_class]
        assert p.member_kl.shape == (3, 3) and p.member_top_class.shape == (3, 3)
        assert p.member_probabilities is None
        for field in ("predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement"):
            assert getattr(p, field).shape == (3,)

        # the model's normalisation (mean 0.5, std 2.0) applied by the client
        n = client.predict("digits", x, normalize=True, member_probabilities=True)
        np.testing.assert_allclose(n.probabilities, expected_probabilities(model_repo, (x - 0.5) / 2.0),
                                   rtol=1e-5)
        assert n.member_probabilities is not None and n.member_probabilities.shape == (3, 3, 5)


def test_sync_models_and_metadata(threaded_server: ThreadedServer) -> None:
    with EnsembleClient(threaded_server.target) as client:
        assert [(m.name, m.version, m.members) for m in client.list_models()] == [
            ("digits", 1, 3), ("tiny", 1, 2)]
        info = client.get_model("digits")
        assert info.input.shape == (-1, 1, 4, 4) and info.input.dtype == np.float32
        assert info.input.normalization is not None and info.input.normalization.std == (2.0,)
        assert info.classes == tuple(DIGITS_CLASSES) and len(info.members) == 3
        assert info.manifest["schema_version"] == 1
        assert client.get_model("digits") is info  # cached


def test_sync_errors_carry_the_status_code(threaded_server: ThreadedServer) -> None:
    with EnsembleClient(threaded_server.target) as client:
        with pytest.raises(ClientError) as info:
            client.predict("digits", np.zeros((2, 16), np.float32))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not match the model's [-1, 1, 4, 4]" in info.value.message
        with pytest.raises(ClientError) as info:
            client.get_model("nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert len(client.predict("digits", raw_digits(1))) == 1


def test_unreachable_server_is_unavailable() -> None:
    with EnsembleClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(ClientError) as info:
            client.list_models()
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_async_client(running_server: RunningServer, model_repo: Path) -> None:
    x = raw_digits(2, seed=5)
    async with AsyncEnsembleClient(f"127.0.0.1:{running_server.port}", timeout=10) as client:
        p = await client.predict("digits", x)
        np.testing.assert_allclose(p.probabilities, expected_probabilities(model_repo, x), rtol=1e-5)
        assert [m.name for m in await client.list_models()] == ["digits", "tiny"]
        assert (await client.get_model("tiny")).classes == ("no", "yes")
        many = await asyncio.gather(*(client.predict("digits", raw_digits(1, seed=i)) for i in range(5)))
        assert [len(m) for m in many] == [1] * 5
        with pytest.raises(ClientError) as info:
            await client.predict("digits", x, version=9)
        assert info.value.code == grpc.StatusCode.NOT_FOUND


async def test_async_stream_yields_errors_inline(running_server: RunningServer, model_repo: Path) -> None:
    arrays = [raw_digits(2, seed=1), np.zeros((1, 3), np.float32), raw_digits(1, seed=2)]
    async with AsyncEnsembleClient(f"127.0.0.1:{running_server.port}") as client:
        results = [r async for r in client.predict_stream("digits", arrays)]
        assert isinstance(results[0], Prediction) and isinstance(results[2], Prediction)
        assert isinstance(results[1], ClientError)
        assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT and results[1].request_id == "1"
        np.testing.assert_allclose(results[2].probabilities,
                                   expected_probabilities(model_repo, arrays[2]), rtol=1e-5)

        async def normalized_source():  # type: ignore[no-untyped-def]
            for seed in range(3):
                yield raw_digits(1, seed=seed)

        results = [r async for r in client.predict_stream("digits", normalized_source(), normalize=True)]
        expected = expected_probabilities(model_repo, (raw_digits(1, seed=2) - 0.5) / 2.0)
        np.testing.assert_allclose(results[2].probabilities, expected, rtol=1e-5)


def test_cli_predict_table_and_json(threaded_server: ThreadedServer, tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, raw_digits(2))
    out = io.StringIO()
    assert main(["predict", "--target", threaded_server.target, "--model", "digits",
                 "--input", str(path), "--normalize"], out=out) == 0
    table = out.getvalue().splitlines()
    assert table[0] == "digits version 1: 2 examples"
    assert "label" in table[1] and "mutual_info" in table[1] and len(table) == 4

    out = io.StringIO()
    assert main(["predict", "--target", threaded_server.target, "--model", "digits",
                 "--input", str(path), "--json", "--members"], out=out) == 0
    result = json.loads(out.getvalue())
    assert result["model"] == "digits" and len(result["examples"]) == 2
    example = result["examples"][0]
    assert example["top_label"] in DIGITS_CLASSES
    assert sum(example["probabilities"]) == pytest.approx(1.0, rel=1e-5)
    assert 0.0 <= example["vote_disagreement"] <= 1.0
    assert len(example["member_probabilities"]) == 3

    np.save(path, raw_digits(1)[0])  # one example without the batch axis
    out = io.StringIO()
    assert main(["predict", "--target", threaded_server.target, "--model", "digits",
                 "--input", str(path)], out=out) == 0
    assert out.getvalue().startswith("digits version 1: 1 examples")


def test_cli_models_and_model(threaded_server: ThreadedServer) -> None:
    out = io.StringIO()
    assert main(["models", "--target", threaded_server.target], out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1].split()[:4] == ["digits", "1", "3", "snapshot"]
    out = io.StringIO()
    assert main(["models", "--target", threaded_server.target, "--json"], out=out) == 0
    assert [m["name"] for m in json.loads(out.getvalue())] == ["digits", "tiny"]
    out = io.StringIO()
    assert main(["model", "--target", threaded_server.target, "--model", "digits"], out=out) == 0
    meta = json.loads(out.getvalue())
    assert meta["input"]["dtype"] == "float32" and meta["execution_provider"] == "CPUExecutionProvider"


def test_cli_errors(threaded_server: ThreadedServer, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 5), np.float32))
    assert main(["predict", "--target", threaded_server.target, "--model", "digits",
                 "--input", str(path)]) == 2  # found by the CLI, not sent
    assert "has shape [2, 5]; the model takes [-1, 1, 4, 4]" in capsys.readouterr().err
    assert main(["predict", "--target", threaded_server.target, "--model", "nope",
                 "--input", str(path)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["predict", "--target", threaded_server.target, "--model", "digits",
                 "--input", str(tmp_path / "absent.npy")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("shape, batch", [((3, 1, 4, 4), 3), ((1, 4, 4), 1), ((4, 4), 1),
                                          ((3, 4, 4), 3)])
def test_cli_predict_takes_the_obvious_shapes(threaded_server: ThreadedServer, tmp_path: Path,
                                              shape: tuple[int, ...], batch: int) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(np.prod(shape), dtype=np.uint8).reshape(shape))  # cast to float32
    out = io.StringIO()
    assert main(["predict", "--target", threaded_server.target, "--model", "digits",
                 "--input", str(path), "--json"], out=out) == 0
    assert len(json.loads(out.getvalue())["examples"]) == batch


@pytest.mark.parametrize("content, message", [
    (np.array(["a", "b"]), "holds a <U1 array"),
    (np.zeros((0, 1, 4, 4), np.float32), "non-empty"),
    (None, "is text, not a .npy array"),
])
def test_cli_predict_checks_its_input_before_calling(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: np.ndarray | None,
        message: str) -> None:
    path = tmp_path / "x.npy"
    if content is None:
        path.write_bytes(b"not an array")
    else:
        np.save(path, content)
    # No server at all: the file is refused before the first call could fail.
    assert main(["predict", "--target", "127.0.0.1:1", "--model", "digits",
                 "--input", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_the_cli_has_a_version_and_takes_no_abbreviations() -> None:
    done = subprocess.run([sys.executable, "-m", "snapserve.client", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ensemble-client ")
    done = subprocess.run([sys.executable, "-m", "snapserve.client", "predict", "--mod", "digits",
                           "--input", "x.npy"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--model" in done.stderr
