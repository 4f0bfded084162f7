"""The client's one exception: a failed call, with its gRPC status code and the server's message.

Chosen over re-raising grpc.RpcError so callers need not import grpc to handle errors, and so a
failed request inside a PredictStream (which is not an RpcError) looks the same as a failed
unary call.
"""

from __future__ import annotations

import grpc

__all__ = ["ClientError"]


class ClientError(Exception):
    """A call the server refused or could not answer. `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")

    @classmethod
    def from_code_value(cls, value: int, message: str, request_id: str | None = None) -> ClientError:
        """From the numeric code of a PredictResponse.error (google.rpc.Code numbering)."""
        code = next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
        return cls(code, message, request_id)
