"""`grpc.health.v1.Health`: the server's overall status and one status per model.

Service names:
- `""`: the whole server, ready meaning "can serve": SERVING once the repository has loaded
  while at least one model serves (Triton's strict readiness); NOT_SERVING while the repository
  loads at start-up, while no model is loaded, and from the moment shutdown begins (then
  in-flight requests drain).
- `snapserve.v1.EnsembleService`, `inference.GRPCInferenceService`: the same as `""`, for
  clients that check a service by its gRPC name.
- `<model name>`: SERVING while at least one version of the model takes requests; NOT_SERVING
  from the first answer at start-up (every model of the repository is known before the ports
  answer, loaded or still queued behind another's load) until its first version serves, after
  it was unloaded, or when none of its versions loads.
  A model that left the repository is forgotten (Check: NOT_FOUND, Watch: SERVICE_UNKNOWN).

Not grpc_health's own aio HealthServicer: its Watch deletes a service's shared condition when
any one watcher leaves, so the other watchers of that service stop getting updates; and its
setter is a coroutine, where ours is called from plain code on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["MAX_WATCHERS", "NOT_SERVING", "SERVICE_UNKNOWN", "SERVING", "HealthServicer"]

logger = logging.getLogger(__name__)

Status = health_pb2.HealthCheckResponse.ServingStatus
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# Watch streams open at once, server-wide: Watch is open without a token (probes use it) and
# each stream holds a call's memory for as long as the client keeps it open.
MAX_WATCHERS = 256


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Statuses by service name; `set`/`forget` are called on the event loop thread."""

    def __init__(self, server_names: Sequence[str] = ("",),
                 max_watchers: int = MAX_WATCHERS) -> None:
        self.max_watchers = max_watchers
        self.watchers = 0  # Watch streams open now
        self._status: dict[str, Status] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self._shutting_down = False
        # The server's own names follow the models: every other name is a model's.
        self._server_names = tuple(server_names)
        self._started = False
        for service in self._server_names:
            self._status[service] = NOT_SERVING
        self._authorized: Callable[[object], bool] | None = None
        self._public: frozenset[str] = frozenset()

    def protect(self, authorized: Callable[[object], bool], public: Sequence[str]) -> None:
        """Answer services other than `public` only to callers `authorized(metadata)` accepts:
        the status of a named model (or NOT_FOUND) tells who asks which models exist. Probes
        check the `public` names (the server's), which stay open."""
        self._authorized, self._public = authorized, frozenset(public)

    async def _check_caller(self, service: str, context: grpc.aio.ServicerContext) -> None:
        if (self._authorized is not None and service not in self._public
                and not self._authorized(context.invocation_metadata())):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "the health of a named model needs a bearer token "
                                "('authorization: Bearer <token>'); '' (the whole server) is open")

    def status(self, service: str) -> Status:
        return self._status.get(service, SERVICE_UNKNOWN)

    def set(self, service: str, serving: bool) -> None:
        """A model's SERVING or NOT_SERVING; ignored once shutdown began (everything stays
        NOT_SERVING). The server's own names follow: see `_follow_models`."""
        if service in self._server_names:
            raise ValueError(f"{service!r} is the server's own status; it follows the models")
        if not self._shutting_down:
            self._set(service, SERVING if serving else NOT_SERVING)
            self._follow_models()

    def forget(self, service: str) -> None:
        if not self._shutting_down and self._status.pop(service, None) is not None:
            self._wake()
            self._follow_models()

    def start_serving(self) -> None:
        """Start-up is done (the repository loaded): the server is SERVING from now on while
        at least one model is."""
        self._started = True
        self._follow_models()

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready, for the REST answer; None when it is."""
        if self._shutting_down:
            return "the server is shutting down"
        if not self._started:
            return "the server is loading its models"
        if not self._models_serving():
            return ("no model is loaded (see the server log, or POST /v2/repository/index for why "
                    "each version was refused)")
        return None

    def _models_serving(self) -> bool:
        return any(status == SERVING for service, status in self._status.items()
                   if service not in self._server_names)

    def _follow_models(self) -> None:
        ready = self._started and not self._shutting_down and self._models_serving()
        for service in self._server_names:
            self._set(service, SERVING if ready else NOT_SERVING)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, whatever is set later."""
        for service in self._status:
            self._set(service, NOT_SERVING)
        self._shutting_down = True

    def _set(self, service: str, status: Status) -> None:
        if self._status.get(service) != status:
            self._status[service] = status
            logger.debug("health %r: %s", service, Status.Name(status))
            self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await self._check_caller(request.service, context)
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service!r}; '' is the whole server")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status at once, then every change until the call ends; at most
        `max_watchers` at once, server-wide (RESOURCE_EXHAUSTED beyond: Watch needs no token)."""
        await self._check_caller(request.service, context)
        if self.watchers >= self.max_watchers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watchers} Health/Watch streams are open, the most this "
                                f"server keeps ({self.max_watchers}); use Health/Check, or "
                                "retry later")
        self.watchers += 1
        try:
            async for answer in self._changes(request.service):
                yield answer
        finally:
            self.watchers -= 1

    async def _changes(self, service: str) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            status = self.status(service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
                continue  # the status may have changed while the answer was being sent
            if self._shutting_down:
                return  # it has heard NOT_SERVING: end the call, or it would hold up the stop
            # No await between reading the status and registering: no change is missed.
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
