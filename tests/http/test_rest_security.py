"""Bearer tokens and TLS on the REST port refuse and admit as on gRPC: the same files, the same
tokens, the same open health checks, the same messages."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.server import RepositoryConfig
from snapserve.server.config import HttpLimits
from snapserve.server.api.security import SecurityConfig
from tests.support.calls import digits_input
from tests.support.pki import Pki, tls_channel
from tests.support.servers import serving

TOKEN = "rest-token-for-the-tests-0001"
INFER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                     "data": digits_input(1).ravel().tolist()}]}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# for the tests\n{TOKEN}\n")
    return path


async def grpc_refusal(port: int, metadata: tuple[tuple[str, str], ...] | None) -> str | None:
    """The gRPC side's answer to ServerMetadata with this metadata: None if admitted."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await kpb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
                kpb.ServerMetadataRequest(), metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            return exc.details()
    return None


async def test_tokens_refuse_and_admit_as_on_grpc(model_repo: Path, token_file: Path) -> None:
    security = SecurityConfig(auth_token_file=token_file)
    async with serving(model_repo, http_port=0, security=security,
                       repository=RepositoryConfig(allow_repository_control=True)) as running, \
            aiohttp.ClientSession(f"http://127.0.0.1:{running.http_port}") as session:
        for header in (None, "Bearer wrong-token-of-some-length", f"Bearer {TOKEN}x", f"Basic {TOKEN}",
                       TOKEN):
            headers = {} if header is None else {"Authorization": header}
            metadata = None if header is None else (("authorization", header),)
            for method, path, payload in (("POST", "/v2/models/digits/infer", INFER),
                                          ("GET", "/v2", None), ("GET", "/v2/models/digits/ready", None),
                                          ("POST", "/v2/repository/models/digits/unload", {}),
                                          ("GET", "/v2/nothing-here", None)):
                async with session.request(method, path, json=payload, headers=headers) as response:
                    assert response.status == 401, (header, path)
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    message = (await response.json())["error"]
                    assert message == await grpc_refusal(running.port, metadata)
        # Probes need no token, on either port.
        for path in ("/v2/health/live", "/v2/health/ready"):
            async with session.get(path) as response:
                assert response.status == 200
        for scheme in ("Bearer", "bearer"):
            headers = {"Authorization": f"{scheme} {TOKEN}"}
            async with session.post("/v2/models/digits/infer", json=INFER, headers=headers) as response:
                assert response.status == 200
            assert await grpc_refusal(running.port, (("authorization", f"{scheme} {TOKEN}"),)) is None
        async with session.post("/v2/repository/models/tiny/unload",
                                headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200  # repository control: the flag and a token


def client_context(pki: Pki, ca: Path | None = None,
                   cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def answers(port: int, context: ssl.SSLContext | None) -> bool:
    """Whether a REST infer over https (plain http when `context` is None) is answered."""
    scheme = "http" if context is None else "https"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{scheme}://127.0.0.1:{port}/v2/models/digits/infer",
                                    json=INFER, ssl=context if context is not None else False,
                                    timeout=aiohttp.ClientTimeout(total=10)) as response:
                return response.status == 200
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return False


async def grpc_answers(port: int, pki: Pki, cert: tuple[Path, Path] | None = None) -> bool:
    async with tls_channel(port, pki, client=cert) as channel:
        try:
            await kpb_grpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest(),
                                                                        timeout=5)
        except grpc.aio.AioRpcError:
            return False
    return True


async def test_tls_serves_clients_that_trust_its_ca_only(model_repo: Path, pki: Pki) -> None:
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)
    async with serving(model_repo, http_port=0, security=security) as running:
        assert running.http is not None and running.http.address.startswith("https://")
        assert await answers(running.http_port, client_context(pki))
        assert not await answers(running.http_port, client_context(pki, ca=pki.other_ca))
        assert not await answers(running.http_port, None)  # plaintext to a TLS port
        assert await grpc_answers(running.port, pki)


async def test_mutual_tls_refuses_missing_and_foreign_client_certificates(model_repo: Path,
                                                                          pki: Pki) -> None:
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key,
                              tls_client_ca=pki.ca)
    async with serving(model_repo, http_port=0, security=security) as running:
        mine = (pki.client_cert, pki.client_key)
        foreign = (pki.other_client_cert, pki.other_client_key)
        assert await answers(running.http_port, client_context(pki, cert=mine))
        assert not await answers(running.http_port, client_context(pki))
        assert not await answers(running.http_port, client_context(pki, cert=foreign))
        # gRPC on the same server: the same three answers.
        assert [await grpc_answers(running.port, pki, c) for c in (mine, None, foreign)] == \
            [True, False, False]


async def test_over_tls_a_probe_beyond_the_cap_is_judged_on_its_decrypted_request(
        model_repo: Path, pki: Pki) -> None:
    """The lobby (server/listeners.py) reads what TLS hands the application: with every place
    held by young connections, a health probe over https is admitted and answered, an infer
    gets the 503 that says why."""
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)
    limits = HttpLimits(header_timeout_s=8.0, body_timeout_s=8.0, keepalive_timeout_s=8.0,
                        max_connections=2, reserved_connections=1)
    async with serving(model_repo, http_port=0, security=security, http=limits) as running:
        context = client_context(pki)
        held = [await asyncio.open_connection("127.0.0.1", running.http_port, ssl=context,
                                              server_hostname="localhost") for _ in range(3)]
        await asyncio.sleep(0.1)
        assert running.http is not None and running.http.server is not None
        assert len(running.http.server.open) == 3
        url = f"https://127.0.0.1:{running.http_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/v2/health/ready", ssl=context) as response:
                assert response.status == 200
            async with session.post(f"{url}/v2/models/digits/infer", json=INFER,
                                    ssl=context) as response:
                assert response.status == 503
                assert "http_max_connections" in (await response.json())["error"]
        assert running.http.server.evicted == 0
        for _, writer in held:
            writer.close()
