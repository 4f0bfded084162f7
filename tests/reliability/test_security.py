"""TLS, mutual TLS and bearer tokens through real channels; and nothing that unpickles.

Certificates come from the `pki` fixture (a CA, a server certificate for 127.0.0.1/localhost, a
client certificate, and a client certificate from another CA).
"""

from __future__ import annotations

import ast
import asyncio
import io
import logging
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from snapserve.client import AsyncEnsembleClient, ClientError, EnsembleClient
from snapserve.client.cli import main as client_main
from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server import ServerConfig
from snapserve.server.api.security import SecurityConfig, TokenAuthInterceptor, read_tokens
from snapserve.server.errors import ConfigError
from snapserve.server.models.policy import RepositoryConfig
from tests.support.calls import digits_input, predict_request
from tests.support.pki import Pki, tls_channel
from tests.support.servers import ThreadedServer, pinned_runtime, serving

ROOT = Path(__file__).resolve().parents[2]
TOKENS = ("s3cret-token-for-tests-0001", "another-valid-token-0002")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# tokens for the tests\n\n  {TOKENS[0]}  \n# retired: old-token\n{TOKENS[1]}\n")
    return path


def bearer(token: str, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {token}"),)


# -- TLS ----------------------------------------------------------------------------------------

async def test_tls_serves_clients_that_trust_its_ca_only(model_repo: Path, pki: Pki) -> None:
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)
    async with serving(model_repo, security=security) as running:
        async with tls_channel(running.port, pki) as channel:
            response = await pb_grpc.EnsembleServiceStub(channel).Predict(predict_request(digits_input(2)))
            assert response.model == "digits"
        async with tls_channel(running.port, pki, ca=pki.other_ca) as channel:  # wrong trust root
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EnsembleServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:  # plaintext
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EnsembleServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_missing_and_foreign_client_certificates(
        model_repo: Path, pki: Pki) -> None:
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key,
                              tls_client_ca=pki.ca)
    async with serving(model_repo, security=security) as running:
        async with tls_channel(running.port, pki, client=(pki.client_cert, pki.client_key)) as channel:
            response = await pb_grpc.EnsembleServiceStub(channel).Predict(predict_request(digits_input(1)))
            assert response.model == "digits"
        for client in (None, (pki.other_client_cert, pki.other_client_key)):
            async with tls_channel(running.port, pki, client=client) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.EnsembleServiceStub(channel).Predict(predict_request(digits_input(1)),
                                                                       timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, client
        # the server goes on serving the right client
        async with tls_channel(running.port, pki, client=(pki.client_cert, pki.client_key)) as channel:
            await pb_grpc.EnsembleServiceStub(channel).ListModels(pb.ListModelsRequest())


@pytest.mark.parametrize("kwargs, field", [
    ({"tls_cert": "cert"}, "tls_cert and tls_key go together"),
    ({"tls_key": "key"}, "tls_cert and tls_key go together"),
    ({"tls_client_ca": "ca"}, "tls_client_ca (mutual TLS) needs tls_cert"),
    ({"tls_cert": "absent.pem", "tls_key": "key"}, "tls_cert 'absent.pem' is not a readable file"),
    ({"auth_token_file": "absent"}, "auth_token_file 'absent' is not a readable file"),
])
def test_security_config_names_the_bad_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             kwargs: dict, field: str) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("cert", "key", "ca"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError) as info:
        SecurityConfig(**kwargs)
    assert field in str(info.value)


async def test_files_that_are_not_pem_stop_the_start(model_repo: Path, tmp_path: Path,
                                                     pki: Pki) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="tls_cert .* holds no PEM certificate"):
        async with serving(model_repo, security=SecurityConfig(tls_cert=not_pem,
                                                               tls_key=pki.server_key)):
            pass
    with pytest.raises(ConfigError, match="tls_key .* holds no PEM private key"):
        async with serving(model_repo, security=SecurityConfig(tls_cert=pki.server_cert,
                                                               tls_key=not_pem)):
            pass


# -- tokens -------------------------------------------------------------------------------------

def _blocking_stream_status(port: int) -> grpc.StatusCode:
    """A PredictStream of three requests without a token, through the blocking client."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = pb_grpc.EnsembleServiceStub(channel).PredictStream(
            iter([predict_request(digits_input(1))] * 3), timeout=10)
        try:
            list(stream)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_calls_without_a_valid_token_are_unauthenticated(
        model_repo: Path, token_file: Path, caplog: pytest.LogCaptureFixture,
        each_frontend: str) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(model_repo, security=SecurityConfig(auth_token_file=token_file),
                       grpc_frontend=each_frontend) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            for metadata in (None, bearer("wrong-token-of-some-length"), bearer(TOKENS[0] + "x"),
                             bearer(TOKENS[0][:-1]), bearer(TOKENS[0], "Basic"),
                             (("authorization", TOKENS[0]),)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Predict(predict_request(digits_input(1)), metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
                assert "missing or invalid bearer token" in info.value.details()
                assert "authorization: Bearer <token>" in info.value.details()
            # every kind of call: unary, server and bidirectional streams, the KServe service.
            # grpc.aio's client reports a refusal that ends a stream while it still writes as
            # INTERNAL "Internal error from Core" (grpc/grpc#36066; more often on the C++ front
            # end, which answers sooner): its stream is checked before it writes, and a stream
            # that writes through the blocking client, which reports the server's status.
            refused = stub.PredictStream(timeout=10)
            assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await asyncio.to_thread(_blocking_stream_status, running.port) == (
                grpc.StatusCode.UNAUTHENTICATED)
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            for call, message in ((kserve.ServerMetadata, kpb.ServerMetadataRequest()),
                                  (kserve.RepositoryIndex, kpb.RepositoryIndexRequest()),
                                  (kserve.RepositoryModelUnload,
                                   kpb.RepositoryModelUnloadRequest(model_name="digits"))):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(message)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # unknown methods too: an unauthenticated caller learns nothing of what exists
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/no.such.Service/Method")(b"")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

            # both tokens work, and the scheme is case-insensitive
            for metadata in (bearer(TOKENS[0]), bearer(TOKENS[1]), bearer(TOKENS[1], "bearer")):
                response = await stub.Predict(predict_request(digits_input(1)), metadata=metadata)
                assert response.model == "digits"
            responses = [r async for r in stub.PredictStream(
                iter([predict_request(digits_input(1), request_id="s")]), metadata=bearer(TOKENS[0]))]
            assert [r.request_id for r in responses] == ["s"]
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "bearer token authentication on" in log
    assert not any(token in log for token in TOKENS)  # never logged, even at DEBUG


async def test_health_and_reflection_stay_open(model_repo: Path, token_file: Path) -> None:
    async with serving(model_repo, security=SecurityConfig(auth_token_file=token_file)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = [a async for a in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            names = {s.name for s in answers[0].list_services_response.service}
            assert "snapserve.v1.EnsembleService" in names


async def test_repository_control_needs_a_token(model_repo: Path, token_file: Path) -> None:
    async with serving(model_repo, security=SecurityConfig(auth_token_file=token_file),
                       repository=RepositoryConfig(allow_repository_control=True)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            unload = kpb.RepositoryModelUnloadRequest(model_name="tiny")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await kserve.RepositoryModelUnload(unload)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "tiny" in running.registry.names()
            await kserve.RepositoryModelUnload(unload, metadata=bearer(TOKENS[0]))
            assert "tiny" not in running.registry.names()


async def test_repository_control_without_auth_is_logged_loudly(
        model_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(model_repo, repository=RepositoryConfig(allow_repository_control=True)):
        pass
    assert any(r.levelno == logging.WARNING and "repository control is on without "
               "authentication" in r.getMessage() for r in caplog.records)


def test_token_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# only comments\n\n   \n")
    with pytest.raises(ConfigError, match="holds no token"):
        read_tokens(path)
    path.write_text("fine-token-0123456789\nhas a space in-it-0123456789\n")
    with pytest.raises(ConfigError, match="line 2: a token must be printable ASCII") as info:
        read_tokens(path)
    assert "in-it" not in str(info.value)  # the error names the line, not the secret
    path.write_text("  padded-token-0123456789  \r\n")
    assert read_tokens(path) == (b"padded-token-0123456789",)


def test_every_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    import snapserve.server.api.security as security

    compared: list[bytes] = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    interceptor = TokenAuthInterceptor([t.encode() for t in TOKENS])
    assert interceptor.authorized(bearer(TOKENS[0]))  # matches the first: still compares both
    assert compared == [t.encode() for t in TOKENS]
    assert not interceptor.authorized(bearer("nope"))
    assert not interceptor.authorized(None)
    assert TOKENS[0] not in repr(interceptor)


# -- the client library and CLI -----------------------------------------------------------------

def test_client_and_cli_with_mutual_tls_and_a_token(model_repo: Path, pki: Pki,
                                                    token_file: Path) -> None:
    server = ThreadedServer(ServerConfig(
        model_repository=model_repo, port=0, http_port=None, runtime=pinned_runtime(),
        security=SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key,
                                tls_client_ca=pki.ca, auth_token_file=token_file)))
    tls = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    try:
        with EnsembleClient(server.target, token=TOKENS[1], **tls) as client:
            assert client.predict("digits", digits_input(3)).probabilities.shape == (3, 5)
        with EnsembleClient(server.target, **tls) as client:  # no token
            with pytest.raises(ClientError) as info:
                client.list_models()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with EnsembleClient(server.target, token=TOKENS[0], tls_ca=pki.ca.read_bytes()) as client:
            with pytest.raises(ClientError) as info:  # no client certificate
                client.list_models(timeout=5)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE

        flags = ["--target", server.target, "--tls-ca", str(pki.ca), "--tls-cert",
                 str(pki.client_cert), "--tls-key", str(pki.client_key)]
        out = io.StringIO()
        assert client_main(["models", *flags, "--token-file", str(token_file)], out=out) == 0
        assert "digits" in out.getvalue()
        assert client_main(["models", *flags], out=io.StringIO()) == 1  # UNAUTHENTICATED
        assert client_main(["models", *flags, "--token-file", "/absent"], out=io.StringIO()) == 2
    finally:
        server.stop()


async def test_async_client_sends_the_token(model_repo: Path, token_file: Path) -> None:
    async with serving(model_repo, security=SecurityConfig(auth_token_file=token_file)) as running:
        target = f"127.0.0.1:{running.port}"
        async with AsyncEnsembleClient(target, token=TOKENS[0]) as client:
            assert (await client.predict("digits", digits_input(2))).probabilities.shape == (2, 5)
            answers = [a async for a in client.predict_stream("digits", [digits_input(1), digits_input(2)])]
            assert [len(a) for a in answers] == [1, 2]  # type: ignore[arg-type]
        async with AsyncEnsembleClient(target) as client:
            with pytest.raises(ClientError) as info:
                await client.list_models()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_client_refuses_half_a_key_pair(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        EnsembleClient("127.0.0.1:1", tls_cert=pki.client_cert)


# -- nothing unpickles untrusted data -----------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal", "torch", "trainer"}


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_server_code_imports_nothing_that_unpickles() -> None:
    for package in ("server", "proto", "client"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            assert not _imports(tree) & UNSAFE_MODULES, path
            for node in ast.walk(tree):  # numpy's loader must never be allowed to unpickle
                if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                    assert isinstance(node.value, ast.Constant) and node.value.value is False, path


def test_serving_loads_neither_torch_nor_the_trainer() -> None:
    code = ("import sys, server.app, server.process.cli, client.cli\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer', 'dill', "
            "'cloudpickle', 'joblib'))\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
