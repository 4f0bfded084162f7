"""The client's one exception: a failed call, with its gRPC status code and the server's message.

Chosen over re-raising grpc.RpcError so callers need not import grpc to handle errors, and so a
failed request inside a PredictStream (which is not an RpcError) looks the same as a failed
unary call.
"""

from __future__ import annotations

import grpc

__all__ = ["ClientError", "HTTP1_HINT", "REQUEST_ID_KEY", "STREAM_WRITE_HINT"]

REQUEST_ID_KEY = "x-request-id"  # the metadata key the server reads and answers with
# What gRPC core says when the target answers HTTP/1.1 (a REST port, a web server).
_HTTP1_SIGNS = ("http1.x server", "Expected SETTINGS frame")
HTTP1_HINT = ("; the target answers HTTP/1.1, not gRPC: is it the REST port? snapserve speaks "
              "gRPC on --port (default 50051) and REST on --http-port (default 8000); the target "
              "takes host:port of the gRPC port, e.g. 127.0.0.1:50051")

# What grpcio's asyncio client reports when a write fails because the server has already ended
# the stream: its own INTERNAL replaces the server's status (grpc/grpc#36066).
_STREAM_WRITE_SIGN = "Internal error from Core"
STREAM_WRITE_HINT = ("; grpcio's asyncio client reports this when the server ended the stream "
                     "while the client was still writing to it, and loses the server's status "
                     "(grpc/grpc#36066): a refusal such as UNAUTHENTICATED (a missing or wrong "
                     "token) or UNAVAILABLE (a server shutting down) looks like this. The "
                     "server's log names it; a unary call with the same metadata shows it")


class ClientError(Exception):
    """A call the server refused or could not answer. `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        """With the server's `x-request-id` trailer, when it sent one: the id its logs use."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        request_id = next((value for key, value in trailers or () if key == REQUEST_ID_KEY), None)
        details = details or ""
        if any(sign in details for sign in _HTTP1_SIGNS):
            details += HTTP1_HINT
        elif code == grpc.StatusCode.INTERNAL and details == _STREAM_WRITE_SIGN:
            details += STREAM_WRITE_HINT
        return cls(code, details, request_id)

    @classmethod
    def from_code_value(cls, value: int, message: str, request_id: str | None = None) -> ClientError:
        """From the numeric code of a PredictResponse.error (google.rpc.Code numbering)."""
        code = next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
        return cls(code, message, request_id)
