"""The client's first hour: a batch above the model's limit split and joined (or refused on
request), CSV input, a URL or the REST port as the target said plainly, and `predict --json |
head` quiet."""

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

from snapserve.client import AsyncEnsembleClient, ClientError, EnsembleClient
from snapserve.client.cli import main
from tests.support.servers import ThreadedServer, local_config

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 8  # tests/support/servers.py fast_batching


def raw_digits(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(batch, 1, 4, 4)).astype(np.float32)


def test_a_batch_above_the_limit_is_split_and_joined(threaded_server: ThreadedServer) -> None:
    x = raw_digits(3 * LIMIT + 3)
    with EnsembleClient(threaded_server.target) as client:
        assert client.get_model("digits").max_batch_size == LIMIT
        joined = client.predict("digits", x, member_probabilities=True)
        parts = [client.predict("digits", x[i:i + LIMIT], member_probabilities=True)
                 for i in range(0, len(x), LIMIT)]
        with pytest.raises(ClientError) as refused:
            client.predict("digits", x, split=False)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(joined) == len(x) and joined.member_probabilities.shape[0] == len(x)
    np.testing.assert_allclose(joined.probabilities,
                               np.concatenate([p.probabilities for p in parts]), rtol=1e-6)
    np.testing.assert_array_equal(joined.top_label, np.concatenate([p.top_label for p in parts]))

    async def split_async() -> np.ndarray:
        async with AsyncEnsembleClient(threaded_server.target) as client:
            return (await client.predict("digits", x)).probabilities

    np.testing.assert_allclose(asyncio.run(split_async()), joined.probabilities, rtol=1e-6)


def test_the_cli_reads_csv_and_splits(threaded_server: ThreadedServer, tmp_path: Path) -> None:
    x = raw_digits(LIMIT * 2 + 1)
    path = tmp_path / "x.csv"
    np.savetxt(path, x.reshape(len(x), -1), delimiter=",", header="a,b,c", comments="")
    out = io.StringIO()
    assert main(["predict", "--target", threaded_server.target, "--model", "digits",
                 "--input", str(path), "--json"], out) == 0
    assert len(json.loads(out.getvalue())["examples"]) == len(x)


def test_a_text_file_named_npy_gets_a_message_about_csv(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.npy"
    path.write_text("1,2,3\n4,5,6\n")
    assert main(["predict", "--target", "127.0.0.1:1", "--model", "digits", "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is text, not a .npy array: name it .csv to read it as CSV" in err
    assert "pickle" not in err


@pytest.mark.parametrize("target, suggested", [("http://127.0.0.1:8000", "127.0.0.1:50051"),
                                               ("grpc://10.0.0.5:9000/", "10.0.0.5:9000")])
def test_a_url_target_says_the_target_takes_host_port(target: str, suggested: str) -> None:
    with pytest.raises(ValueError, match=f"is a URL; the target takes host:port of the gRPC port "
                                         f"\\(default 50051\\), e.g. {suggested}"):
        EnsembleClient(target)


def test_the_rest_port_as_target_says_which_port_speaks_grpc(model_repo: Path) -> None:
    server = ThreadedServer(local_config(model_repo, http_port=0))
    try:
        with EnsembleClient(f"127.0.0.1:{server.running.http_port}", timeout=5) as client:
            with pytest.raises(ClientError) as refused:
                client.list_models()
    finally:
        server.stop()
    assert "the target answers HTTP/1.1, not gRPC: is it the REST port?" in refused.value.message
    assert "gRPC on --port (default 50051)" in refused.value.message


def test_predict_json_into_head_exits_quietly(threaded_server: ThreadedServer, tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, raw_digits(600))  # answers far larger than a pipe's buffer
    command = (f"{sys.executable} -m snapserve.client predict --target {threaded_server.target} "
               f"--model digits --input {path} --json | head -n 3")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.count("\n") == 3
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 0
