"""The client's first hour: a batch above the model's limit split and joined (or refused on
request), CSV input, a URL or the REST port as the target said plainly, grpcio's INTERNAL for a
stream refused mid-write explained, and `predict --json | head` quiet."""

from __future__ import annotations

import asyncio
import collections
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
from snapserve.client.errors import STREAM_WRITE_HINT
from snapserve.server.api.security import SecurityConfig
from tests.support.servers import ThreadedServer, local_config, serving

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


async def test_a_stream_refused_while_it_writes_says_what_its_internal_means(
        model_repo: Path, tmp_path: Path) -> None:
    """Without a token, a stream of 50 requests is refused while its client writes: grpcio's
    asyncio client then reports INTERNAL in place of the server's UNAUTHENTICATED (most of the
    time; grpc/grpc#36066), and the client's error says what that INTERNAL stands for."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-of-some-length-0001\n")
    tokens.chmod(0o600)
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()
    async with serving(model_repo, security=SecurityConfig(auth_token_file=tokens)) as running:
        async with AsyncEnsembleClient(f"127.0.0.1:{running.port}") as client:
            for _ in range(20):
                with pytest.raises(ClientError) as info:
                    async for _ in client.predict_stream("digits", [raw_digits(1)] * 50):
                        pass
                error = info.value
                seen[error.code] += 1
                if error.code == grpc.StatusCode.INTERNAL:
                    assert error.message == "Internal error from Core" + STREAM_WRITE_HINT
                else:
                    assert error.code == grpc.StatusCode.UNAUTHENTICATED, error
                    assert "missing or invalid bearer token" in error.message
    assert sum(seen.values()) == 20, seen


def test_only_grpcio_s_own_internal_gets_the_stream_hint() -> None:
    def error(code: grpc.StatusCode, details: str) -> ClientError:
        return ClientError.from_rpc_error(grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details))

    assert error(grpc.StatusCode.INTERNAL, "Internal error from Core").message.endswith(
        STREAM_WRITE_HINT)
    # the server's own INTERNAL (a model that failed) is its message alone
    assert error(grpc.StatusCode.INTERNAL, "internal error (logged by the server)").message == (
        "internal error (logged by the server)")
    assert STREAM_WRITE_HINT not in error(grpc.StatusCode.UNAVAILABLE,
                                          "Internal error from Core").message
