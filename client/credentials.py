"""What a client needs to reach a secured server: TLS channel credentials and a bearer token.

Both clients (and the CLI) build their channels and call metadata from a `Security`:

    EnsembleClient("host:50051", tls_ca="ca.pem", tls_cert="client.pem", tls_key="client.key",
                   token="...")

- TLS: `tls_ca` (PEM, the CA that signed the server's certificate; default: the system's roots),
  plus `tls_cert` + `tls_key` for mutual TLS. Any of them, or `tls=True`, turns TLS on.
- Token: sent as `authorization: Bearer <token>` metadata on every call. It works on plain
  channels too (a trusted network, a mesh that terminates TLS), unlike gRPC's call credentials.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import grpc

__all__ = ["Pem", "Security", "read_token_file"]

Pem = Union[str, os.PathLike, bytes]  # a PEM file's path, or the PEM bytes themselves


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {str(value)!r} cannot be read: {exc.strerror}") from exc


def read_token_file(path: str | os.PathLike) -> str:
    """The first token in a token file (one per line; '#' comments and blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"token file {str(path)!r} cannot be read: {exc}") from exc
    for line in lines:
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise ValueError(f"token file {str(path)!r} holds no token")


@dataclass(frozen=True)
class Security:
    """A client's TLS material and token, read once; `channel_credentials` None means plain."""

    channel_credentials: grpc.ChannelCredentials | None = None
    token: str | None = None

    @classmethod
    def build(cls, *, tls: bool = False, tls_ca: Pem | None = None, tls_cert: Pem | None = None,
              tls_key: Pem | None = None, token: str | None = None) -> Security:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS): give both or neither")
        if token is not None and (not token or any(c.isspace() for c in token)):
            raise ValueError("token must be a non-empty string without spaces")
        credentials = None
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca, "tls_ca"), private_key=_pem(tls_key, "tls_key"),
                certificate_chain=_pem(tls_cert, "tls_cert"))
        return cls(credentials, token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata: the bearer token, or None."""
        return None if self.token is None else (("authorization", f"Bearer {self.token}"),)

    def channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        if self.channel_credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self.channel_credentials, options=options)

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        if self.channel_credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, self.channel_credentials, options=options)
