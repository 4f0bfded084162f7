"""Starting and stopping the server: `start_server(config) -> RunningServer`.

Services: the native API (snapserve.v1.EnsembleService), KServe v2 (inference.GRPCInferenceService),
grpc.health.v1.Health and server reflection over gRPC; KServe v2 over REST on its own port
(api/http.py, same core, same event loop); Prometheus metrics over HTTP when a port is given.
The ports are bound and the health checks answer (NOT_SERVING, for the server and for every
model of the repository) before the models load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.server.process import heap
from snapserve.server.api.health import HealthServicer
from snapserve.server.api.http import HttpFrontEnd
from snapserve.server.api.intake import Intake, add_servicer
from snapserve.server.api.kserve import KServeServicer
from snapserve.server.api.cpp import CppFrontEnd
from snapserve.server.cpp.binding import INSTALL_HINT as CPP_INSTALL_HINT
from snapserve.server.cpp.binding import built as cpp_built
from snapserve.server.cpp.binding import library as cpp_library
from snapserve.server.api.reflection import enable_reflection
from snapserve.server.api.security import (TokenAuthInterceptor, read_tokens, server_credentials,
                                           server_ssl_context, tls_pem)
from snapserve.server.api.service import EnsembleServicer
from snapserve.server.api.shutdown import Drain
from snapserve.server.config import ServerConfig, format_address
from snapserve.server.engine.runtime import execution_providers
from snapserve.server.errors import ConfigError
from snapserve.server.listeners import LOBBY_PER_RESERVED, check_file_limit, quiet_accept_errors
from snapserve.server.observability.metrics import ServerMetrics
from snapserve.server.models.lifecycle import LifecycleEvents, ModelManager
from snapserve.server.models.registry import ModelRegistry, check_repository_root

__all__ = ["RunningServer", "start_server"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

SERVICES = [pb.DESCRIPTOR.services_by_name["EnsembleService"],
            kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"]]
# Health service names that follow the server's overall status "" (see api/health.py).
HEALTH_SERVICE_NAMES = ("", "snapserve.v1.EnsembleService", "inference.GRPCInferenceService")
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


@dataclass
class RunningServer:
    """A started server. `port` is the bound port (the real one when the config asked for 0);
    `metrics_port` and `http_port` likewise, None when not served."""

    config: ServerConfig
    port: int
    registry: ModelRegistry
    server: grpc.aio.Server
    manager: ModelManager
    health: HealthServicer
    metrics: ServerMetrics
    metrics_port: int | None = None
    drain: Drain = field(default_factory=Drain)  # the server's first interceptor
    intake: Intake = field(default_factory=Intake)  # admission bound and decode threads
    http: HttpFrontEnd | None = None  # the KServe v2 REST front end, when http_port is set
    http_port: int | None = None
    # The C++ gRPC front end, when it serves `port` (grpc_frontend) or cpp_grpc_port; its port.
    cpp: CppFrontEnd | None = None
    cpp_port: int | None = None
    _hurry: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def address(self) -> str:
        return format_address(self.config.host, self.port)

    async def stop(self, grace: float | None = None, drain_window: float = 0.0) -> None:
        """Shut down in the order clients need, within `drain_window` + `grace` seconds.

        0. Health (and ServerReady) say NOT_SERVING at once, but for `drain_window` seconds new
           calls are still answered: balancers and Kubernetes endpoints keep sending for a few
           seconds after the signal, and what they send meanwhile must not be refused.
        1. New calls (but health checks) are refused with UNAVAILABLE (api/shutdown.py);
           polling stops.
        2. Drain: the batchers compute what they hold while the gRPC server still runs, so every
           answer and every refusal goes out; then wait for the clients to go quiet.
           (gRPC's own stop(grace) would leave calls that arrive meanwhile unanswered until the
           grace period ends, then cancel them: grpc/grpc#41785.)
        3. The gRPC server and the REST front end stop, giving calls still being answered what
           is left of `grace`; then the metrics endpoint. (The drain, the quiet wait and the
           refusals cover REST requests as gRPC calls: one Drain.)

        `grace` is a bound: when it is over, batches still computing are cancelled (their
        callers told UNAVAILABLE) and ONNX Runtime told to stop them. `hurry()` (a second
        signal) cuts every wait short the same way. None: no bound (the batchers finish).
        """
        self.health.enter_graceful_shutdown()  # health watchers hear it before the port closes
        if drain_window > 0:
            logger.info("NOT_SERVING; still answering new requests for the %.1fs drain window",
                        drain_window)
            await self._unless_hurried(asyncio.sleep(drain_window))
        self.drain.start()
        await self.manager.close()
        deadline = None if grace is None else time.monotonic() + grace
        batchers = asyncio.ensure_future(self.registry.close())  # compute what they hold
        if deadline is not None:
            await self._unless_hurried(asyncio.wait({batchers}, timeout=grace))
            if not batchers.done():
                self._cancel(batchers, grace)
            elif await self._unless_hurried(self.drain.wait_quiet(deadline)) is False:
                logger.info("clients still calling at the end of the grace period; stopping")
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        remaining = 0 if self._hurry.is_set() else remaining
        stopping = [self.server.stop(remaining)]
        if self.http is not None:
            stopping.append(self.http.stop(remaining))
        if self.cpp is not None:
            stopping.append(self.cpp.stop(remaining))
        await asyncio.gather(*stopping)
        await asyncio.gather(batchers, return_exceptions=True)  # cancelled ones included
        logger.info("refused %d calls while draining", self.drain.refused)
        self.intake.close()
        await self.metrics.close()
        if self.config.freeze_heap:
            heap.thaw()  # what start_server froze is the collector's again
        logger.info("stopped serving on %s", self.address)

    def hurry(self) -> None:
        """Cut the stop short: no more drain window, grace or quiet wait (a second signal)."""
        self._hurry.set()

    async def _unless_hurried(self, waiting: Awaitable[T]) -> T | None:
        """`waiting`'s result, or None as soon as `hurry()` is called (it is cancelled then)."""
        task = asyncio.ensure_future(waiting)
        hurried = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not task.done():
            task.cancel()
            return None
        return task.result()

    def _cancel(self, batchers: asyncio.Future[None], grace: float) -> None:
        why = "stopping at once" if self._hurry.is_set() else f"grace period of {grace:.1f}s is over"
        logger.warning("%s with requests still queued or computing; cancelling them", why)
        batchers.cancel()  # their callers get UNAVAILABLE
        self.registry.terminate()  # and the threads computing them stop at the next node

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _log_security(config: ServerConfig) -> None:
    security = config.security
    if security.tls:
        logger.info("TLS on; client certificates %s", "required (mutual TLS)"
                    if security.tls_client_ca is not None else "not asked for")
    if security.auth:  # the file's name only: tokens are never logged
        logger.info("bearer token authentication on (tokens from %s)", security.auth_token_file)
        if not security.tls:
            logger.warning("bearer tokens without TLS: every token crosses the network in clear "
                           "text, for anyone on the path to read and reuse (use --tls-cert)")
    elif config.repository.allow_repository_control:
        logger.warning("repository control is on without authentication: any client that reaches "
                       "the port can load and unload models (use --auth-token-file)")


def grpc_frontend_for(config: ServerConfig, tls: bool) -> tuple[str, str]:
    """Which library serves the gRPC port, "aio" or "cpp", and why (for the log)."""
    if config.grpc_frontend != "auto":
        return config.grpc_frontend, f"grpc_frontend {config.grpc_frontend}"
    if config.cpp_grpc_port is not None:
        return "aio", "auto: the C++ front end serves --cpp-grpc-port beside it"
    if tls:  # gRPC's own TLS listener, which libgrpc 1.51 does not cap (docs/reliability.md)
        return "aio", "auto: with TLS the C++ front end's port has no connection cap"
    if not cpp_built():
        return "aio", (f"auto: the C++ front end is not built here; `python -m "
                       f"snapserve.server.cpp.binding` builds it ({CPP_INSTALL_HINT})")
    try:
        cpp_library()
    except (OSError, ConfigError) as exc:  # built, but gRPC's C++ runtime does not load
        return "aio", f"auto: the C++ front end does not load ({exc})"
    return "cpp", "auto: the C++ front end is built here"


def _connection_caps(config: ServerConfig) -> int:
    """Client connections every listener may hold at once, together."""
    caps = config.connections.max_connections
    if config.cpp_grpc_port is not None:  # its own cap (a plaintext port; TLS: uncapped)
        caps += config.connections.max_connections
    if config.http_port is not None:
        # The reserve, and the lobby's newcomers held for a look and probes admitted over the cap.
        caps += (config.http.max_connections
                 + config.http.reserved_connections * (1 + 2 * LOBBY_PER_RESERVED))
    if config.metrics_port is not None:
        caps += config.metrics_endpoint.max_connections
    return caps


def lifecycle_events(health: HealthServicer, metrics: ServerMetrics) -> LifecycleEvents:
    """The lifecycle's reports, delivered: serving state to health, loads and failures to metrics."""
    return LifecycleEvents(serving=health.set, forgotten=health.forget, loaded=metrics.watch,
                           unloaded=metrics.forget, load_failed=metrics.count_load_failure)


async def start_server(config: ServerConfig) -> RunningServer:
    """Bind and start (health NOT_SERVING), load the repository, then report SERVING and log
    `serving on HOST:PORT`. Returns once every model that loads has loaded."""
    providers = execution_providers(config.runtime)  # refuses device=cuda without CUDA, up front
    logger.info("device %s: execution providers %s", config.runtime.device,
                [p if isinstance(p, str) else p[0] for p in providers])
    # Certificates and tokens are read once, now: a bad file stops the start, not a later call.
    pem = tls_pem(config.security)
    credentials = server_credentials(pem)
    # Drain first: while stopping, every call is refused before anything else looks at it.
    drain = Drain()
    interceptors: list[grpc.aio.ServerInterceptor] = [drain]
    auth = None  # the same tokens guard the REST port
    if config.security.auth_token_file is not None:
        auth = TokenAuthInterceptor(read_tokens(config.security.auth_token_file))
        interceptors.append(auth)
    ssl_context = server_ssl_context(config.security) if config.http_port is not None else None
    _log_security(config)
    check_repository_root(config.model_repository)  # one level too deep: refused, not served empty
    registry = ModelRegistry()
    health = HealthServicer(HEALTH_SERVICE_NAMES)  # NOT_SERVING until the repository is loaded
    for interceptor in interceptors:  # a named model's health only for callers with a token
        if isinstance(interceptor, TokenAuthInterceptor):
            health.protect(interceptor.authorized, HEALTH_SERVICE_NAMES)
    metrics = ServerMetrics(registry)
    manager = ModelManager(config.model_repository, config.repository, config.runtime,
                           config.batcher, registry, lifecycle_events(health, metrics))
    check_file_limit(_connection_caps(config))
    quiet_accept_errors(asyncio.get_running_loop())  # for the loop's life: it passes on the rest
    grpc_options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.so_reuseport", int(config.reuse_port)),
        *config.connections.grpc_options(),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=grpc_options)
    # Raw-bytes handlers: our code parses each request (api/intake.py), within one bound.
    intake = Intake(config.intake)
    handlers = add_servicer(EnsembleServicer(registry, config.stream_window, metrics, intake),
                            SERVICES[0], server, intake)
    kserve = KServeServicer(manager, health, metrics, config.stream_window, intake)
    handlers |= add_servicer(kserve, SERVICES[1], server, intake)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    handlers |= enable_reflection(server, SERVICES)
    frontend, why = grpc_frontend_for(config, pem is not None)
    port = 0  # the C++ front end's, bound once health knows every model
    if frontend == "aio":
        try:
            port = (server.add_insecure_port(config.address) if credentials is None
                    else server.add_secure_port(config.address, credentials))
        except RuntimeError as exc:
            cause: Exception | None = exc
        else:
            cause = None
        if port == 0:
            raise ConfigError(f"cannot bind {config.address} (port in use, or host not local)"
                              ) from cause
    running = RunningServer(config, port, registry, server, manager, health, metrics, drain=drain,
                            intake=intake)
    try:
        await manager.announce()  # the first health check already knows every model's name
        await server.start()  # with no port when the C++ front end serves it: its handlers do
        cpp_address = None  # where the C++ front end serves, if anywhere
        if frontend == "cpp":
            cpp_address = config.address
        elif config.cpp_grpc_port is not None:
            cpp_address = format_address(config.host, config.cpp_grpc_port)
        if cpp_address is not None:
            # Built on the first start (seconds of g++), meanwhile health checks are answered
            # on a grpc.aio port (with grpc_frontend cpp there is none yet).
            await asyncio.to_thread(cpp_library)
            handlers[HEALTH_CHECK] = grpc.unary_unary_rpc_method_handler(
                health.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
            # Watched by clients that balance over addresses (ours, grpc-go's): without it
            # they log an error and stop seeing a drain coming.
            handlers[HEALTH_WATCH] = grpc.unary_stream_rpc_method_handler(
                health.Watch, request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
            running.cpp = CppFrontEnd(handlers, drain, auth)
            running.cpp_port = running.cpp.start(cpp_address, grpc_options,
                                                 config.intake.max_pending_calls, *(pem or ()))
            if frontend == "cpp":
                running.port = running.cpp_port
            cpp = running.cpp
            metrics.watch_cpp(lambda: cpp.refused)
            logger.info("C++ front end serving gRPC on %s",
                        format_address(config.host, running.cpp_port))
        logger.info("gRPC port %s: %s (%s)", running.address,
                    "the C++ front end" if frontend == "cpp" else "grpc.aio", why)
        if config.http_port is not None:
            http = running.http = HttpFrontEnd(kserve.core, drain, auth,
                                               config.max_message_bytes, config.http)
            metrics.watch_listener(lambda: http.server)
            running.http_port = await running.http.start(config.host, config.http_port,
                                                         ssl_context, config.reuse_port)
        if config.metrics_port is not None:
            running.metrics_port = await metrics.serve(config.metrics_endpoint,
                                                       config.metrics_port)
            if running.http is not None:  # where REST's /metrics sends a scraper
                running.http.metrics_url = (
                    "the server's --metrics-port (one endpoint for all its workers)"
                    if config.reuse_port else  # a worker's own port is the parent's to read
                    f"http://{format_address(config.metrics_endpoint.host, running.metrics_port)}/metrics")
        await manager.load_all()
    except BaseException:
        await running.stop(None)
        raise
    if not len(registry):
        logger.warning("no model loaded from %s: not ready (health NOT_SERVING, "
                       "/v2/health/ready 503) until one loads", config.model_repository)
    # The start-up heap out of the collector's way: a full collection under load would walk it
    # all, stopping the loop meanwhile (server/process/heap.py).
    if config.freeze_heap:
        heap.freeze()
    health.start_serving()  # SERVING while at least one model serves
    manager.start_polling()
    logger.info("serving on %s", running.address)
    return running
