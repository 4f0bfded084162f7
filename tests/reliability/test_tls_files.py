"""TLS files that cannot serve are reported for what they are, not as "cannot bind": a key that
is not the certificate's, an encrypted key; a certificate outside its validity dates starts the
server with a warning that gives the dates."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from snapserve.server import ServerConfig, start_server
from snapserve.server.config import SecurityConfig
from snapserve.server.errors import ConfigError
from tests.support.pki import Pki, self_signed
from tests.support.servers import local_config


def _config(repo: Path, cert: Path, key: Path) -> ServerConfig:
    return local_config(repo, security=SecurityConfig(tls_cert=cert, tls_key=key))


async def test_a_key_that_is_not_the_certificates_is_named(model_repo: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="does not match tls_cert") as info:
        await start_server(_config(model_repo, pki.server_cert, pki.client_key))
    assert "cannot bind" not in str(info.value)


async def test_an_encrypted_key_is_named(model_repo: Path, pki: Pki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret passphrase")))
    encrypted.chmod(0o600)
    with pytest.raises(ConfigError, match="encrypted with a passphrase"):
        await start_server(_config(model_repo, pki.server_cert, encrypted))


@pytest.mark.parametrize("days, words", [(-10, "expired on"), (10, "is not valid until")])
async def test_a_certificate_out_of_its_dates_warns(model_repo: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture, days: int,
                                                    words: str) -> None:
    cert_path, key_path = self_signed(tmp_path, valid_from_days=days)
    start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    with caplog.at_level(logging.WARNING, "snapserve.server.api.security"):
        running = await start_server(_config(model_repo, cert_path, key_path))
        await running.stop(None)
    warnings = [r.getMessage() for r in caplog.records if words in r.getMessage()]
    assert warnings and str(start.year) in warnings[0], caplog.text
