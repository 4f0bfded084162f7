"""Transport security and caller authentication: TLS / mutual TLS credentials, bearer tokens.

- TLS: `tls_cert` + `tls_key` (PEM) put TLS on the listening ports (gRPC: `server_credentials`,
  REST: `server_ssl_context`); `tls_client_ca` (PEM bundle) also requires every client to present
  a certificate that CA signed (mutual TLS), on both.
- Tokens: `auth_token_file` holds one or more bearer tokens, one per line (`#` comments and blank
  lines ignored). Every call must then carry `authorization: Bearer <token>` metadata, except the
  health checks and reflection, which probes and tools call without credentials. Tokens are
  compared in constant time against every token, and never logged.

Nothing here is needed for a local, unauthenticated server: every field defaults to off.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import grpc

from snapserve.server.api.status import status_code
from snapserve.server.config import SecurityConfig
from snapserve.server.errors import ConfigError, Unauthenticated
from snapserve.server.observability.request_context import loggable

__all__ = ["OPEN_METHOD_PREFIXES", "SecurityConfig", "TokenAuthInterceptor", "read_tokens",
           "refusing_handler", "server_credentials", "server_ssl_context", "tls_pem"]

logger = logging.getLogger(__name__)

# Methods any caller may use: liveness/readiness probes (Kubernetes, load balancers) and
# reflection (grpcurl) carry no credentials. Reflection describes the API, never the models.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# Shorter tokens are accepted with a warning: guessable, but the operator's call.
MIN_TOKEN_CHARS = 16
UNAUTHENTICATED_MESSAGE = ("missing or invalid bearer token: send the metadata "
                           "'authorization: Bearer <token>' with a token the server was given")


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field} {str(path)!r} cannot be read: {exc.strerror}") from exc


def tls_pem(config: SecurityConfig) -> tuple[bytes, bytes, bytes | None] | None:
    """The listening ports' TLS as PEM bytes: (certificate chain, key, client CA or None); None
    when TLS is off. Files are read and checked once, here."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert, key = _read(config.tls_cert, "tls_cert"), _read(config.tls_key, "tls_key")
    if b"-----BEGIN" not in cert or b"CERTIFICATE-----" not in cert:
        raise ConfigError(f"tls_cert {str(config.tls_cert)!r} holds no PEM certificate")
    if b"-----BEGIN" not in key or b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"tls_key {str(config.tls_key)!r} holds no PEM private key")
    if os.stat(config.tls_key).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("tls_key %s is readable by other users; chmod 600 it", config.tls_key)
    _check_key_pair(config.tls_cert, config.tls_key, key)
    _warn_validity(config.tls_cert)
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read(config.tls_client_ca, "tls_client_ca")
        if b"CERTIFICATE-----" not in client_ca:
            raise ConfigError(f"tls_client_ca {str(config.tls_client_ca)!r} holds no PEM certificate")
    return cert, key, client_ca


def server_credentials(pem: tuple[bytes, bytes, bytes | None] | None
                       ) -> grpc.ServerCredentials | None:
    """gRPC's TLS credentials for `tls_pem`'s answer; None when TLS is off."""
    if pem is None:
        return None
    cert, key, client_ca = pem
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _no_passphrase() -> bytes:
    raise ConfigError("no passphrase")  # never a prompt on the terminal


def _check_key_pair(cert_path: Path, key_path: Path, key: bytes) -> None:
    """ConfigError naming the fault when the key is encrypted or is not the certificate's:
    gRPC would only report that it cannot bind the port."""
    if b"ENCRYPTED" in key:  # PKCS#8 "ENCRYPTED PRIVATE KEY", or a legacy "Proc-Type: 4,ENCRYPTED"
        raise ConfigError(f"tls_key {str(key_path)!r} is encrypted with a passphrase, which the "
                          "server cannot ask for: write it unencrypted (openssl pkey -in KEY "
                          "-out KEY.plain) and chmod 600 it")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path,
                                                                password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"tls_key {str(key_path)!r} does not match tls_cert "
                              f"{str(cert_path)!r}: the key is not the one the certificate was "
                              "issued for") from exc
        raise ConfigError(f"tls_cert {str(cert_path)!r} / tls_key {str(key_path)!r} cannot be "
                          f"used: {exc}") from exc


def _warn_validity(cert_path: Path) -> None:
    """A warning, with its dates, when the certificate has expired or is not valid yet: clients
    will refuse the handshake, but the operator may be replacing it, so the server starts."""
    try:
        # The standard library's only certificate parser outside a handshake (no extra
        # dependency); a Python without it skips the warning.
        decoded = ssl._ssl._test_decode_cert(str(cert_path))  # type: ignore[attr-defined]
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (AttributeError, KeyError, ValueError, ssl.SSLError):
        return
    now = time.time()
    if now > not_after:
        logger.warning("tls_cert %s expired on %s (valid from %s): clients will refuse it",
                       cert_path, decoded["notAfter"], decoded["notBefore"])
    elif now < not_before:
        logger.warning("tls_cert %s is not valid until %s (and until %s): clients will refuse "
                       "it until then", cert_path, decoded["notBefore"], decoded["notAfter"])


def server_ssl_context(config: SecurityConfig) -> ssl.SSLContext | None:
    """The REST port's TLS, from the same files and with the same client-certificate rule as
    gRPC's (`server_credentials`, which checks the files first); None when TLS is off."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2+, modern ciphers
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(cafile=config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key/tls_client_ca cannot be used for HTTPS: {exc}") from exc
    return context


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The tokens in a token file. Errors name the line, never the token."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth_token_file {str(path)!r} cannot be read: {exc}") from exc
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):  # as for the TLS key
        logger.warning("auth_token_file %s is readable by other users; chmod 600 it", path)
    tokens: list[bytes] = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        # gRPC metadata values are printable ASCII; a token with a space could never be sent.
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise ConfigError(f"auth_token_file {str(path)!r} line {number}: a token must be "
                              "printable ASCII without spaces")
        if len(token) < MIN_TOKEN_CHARS:
            logger.warning("auth_token_file %s line %d: token shorter than %d characters is "
                           "easy to guess", path, number, MIN_TOKEN_CHARS)
        tokens.append(token.encode("ascii"))
    if not tokens:
        raise ConfigError(f"auth_token_file {str(path)!r} holds no token (one per line; "
                          "'#' starts a comment)")
    return tuple(tokens)


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the first `authorization: Bearer <token>` entry (scheme case-insensitive)."""
    for key, value in metadata or ():
        if key != "authorization":  # gRPC lower-cases metadata keys
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode("utf-8", "replace")
        return None
    return None


def refusing_handler(handler: grpc.RpcMethodHandler | None,
                     error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming) that only fails the call with
    `error`'s status (STATUS_CODES) and message. It has no request deserializer: a refused
    caller's bytes never reach the protobuf parser."""
    code, message = status_code(error), str(error)

    async def refuse(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_stream_rpc_method_handler(refuse)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) calls without a valid bearer token, except OPEN_METHOD_PREFIXES."""

    def __init__(self, tokens: Sequence[bytes]) -> None:
        if not tokens:
            raise ConfigError("token authentication needs at least one token")
        self._tokens = tuple(tokens)
        self.refused = 0  # calls refused so far, for logs and tests

    def __repr__(self) -> str:  # never the tokens themselves
        return f"TokenAuthInterceptor({len(self._tokens)} tokens)"

    def authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = _bearer(metadata)
        if presented is None:
            return False
        # Every token is compared, whatever matched: the time taken tells nothing about which
        # token, or how much of one, was right.
        match = False
        for token in self._tokens:
            match |= hmac.compare_digest(presented, token)
        return match

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES) or self.authorized(
                handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        self.refused += 1
        # Debug only: under a scan or a misconfigured client this would flood the log.
        logger.debug("refused %s: no valid bearer token (%d refused so far)", loggable(method),
                     self.refused)
        return refusing_handler(await continuation(handler_call_details),
                                Unauthenticated(UNAUTHENTICATED_MESSAGE))
