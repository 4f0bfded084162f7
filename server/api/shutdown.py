"""Graceful shutdown: refuse new calls with UNAVAILABLE while what was accepted is answered.

`Drain` is the server's first interceptor. It notes when each call (but health checks) arrives;
once `start()` is called it refuses every new call except health checks (UNAVAILABLE, "the
server is shutting down"), so clients are told at once to go elsewhere rather than left waiting.

Why not gRPC's own `server.stop(grace)` alone: from the moment it is called, gRPC stops handing
new calls to the application; a call that reaches the server after that, before its client has
heard the server's GOAWAY, waits unanswered until the grace period ends and is then CANCELLED
(grpc/grpc#41785), although it never started. So the server first drains with the gRPC server
still running (RunningServer.stop), then waits for its clients to go quiet, and only then stops
gRPC: what remains in transit at that instant is the only exposure left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import grpc

from snapserve.server.api.security import refusing_handler
from snapserve.server.errors import ShuttingDown

__all__ = ["Drain", "QUIET_S"]

logger = logging.getLogger(__name__)

# Health checks keep their answers (NOT_SERVING) during the drain: that is how balancers learn.
OPEN_WHILE_DRAINING = ("/grpc.health.v1.Health/",)
# No call for this long: the clients have heard, gRPC can stop without cutting one off. Long
# enough to outlast a busy client's pause between an answer and its next call.
QUIET_S = 0.25
MESSAGE = "the server is shutting down; retry on another instance"


class Drain(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.draining = False
        self.refused = 0  # calls refused while draining
        self._last_call = time.monotonic()

    def start(self) -> None:
        """From now on, new calls (but health checks) get UNAVAILABLE."""
        self.draining = True

    def admit(self) -> bool:
        """Note a call (not a health check) arriving, on any front end; False once draining:
        refuse it. The gRPC interceptor below and the REST front end (api/http.py) both ask."""
        self._last_call = time.monotonic()
        if self.draining:
            self.refused += 1
            return False
        return True

    async def wait_quiet(self, deadline: float, quiet_s: float = QUIET_S) -> bool:
        """Wait until no call arrived for `quiet_s`, or until `deadline` (time.monotonic());
        True if it went quiet."""
        while (now := time.monotonic()) - self._last_call < quiet_s:
            if now >= deadline:
                return False
            await asyncio.sleep(min(quiet_s, max(deadline - now, 0.001)))
        return True

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_WHILE_DRAINING):
            # Not counted as a call: a balancer's frequent checks must not keep the drain waiting.
            return await continuation(handler_call_details)
        if self.admit():
            return await continuation(handler_call_details)
        return refusing_handler(await continuation(handler_call_details), ShuttingDown(MESSAGE))
