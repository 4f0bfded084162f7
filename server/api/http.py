"""The KServe v2 / Open Inference Protocol over REST, beside gRPC, in the server's event loop.

Inference decodes the body straight to arrays and calls the one pipeline (api/pipeline.py, the
KServe core's `plane`), which answers with the encoded body (api/http_messages.py). Every other
endpoint turns its request into the protocol message a gRPC caller would send and calls the same
operation (api/kserve.py `KServeCore`), writing the answer as JSON. Errors come from the same table as gRPC's
(api/status.py: the exception's gRPC code, and that code's HTTP status), with the same message,
in the protocol's `{"error": "..."}` body.

aiohttp.web (AppRunner + TCPSite) runs in the loop that runs gRPC: measured against Starlette on
uvicorn it costs as little per request or less (docs/performance.md), embeds without a server
process of its own, and brings the request-size bound, TLS and a graceful shutdown with it.

Around every endpoint but the health checks, in gRPC's order: the drain (api/shutdown.py: 503
once the server is stopping), then the bearer tokens (api/security.py: 401), both decided on the
headers, before a byte of the body is read. The health checks stay open for probes and
balancers, as gRPC health does.

Bounds before bytes: the listener bounds connections and how long they may take to send their
headers or sit idle (server/listeners.py, `HttpLimits`); a body is read by api/http_body.py
within the server's message bound and, for inference, within what the model can take (its
`max_batch_size` examples of its input shape), counted against the pending-bytes bound as it
arrives; each input's declared shape and datatype are checked against the model before its data
becomes an array.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Awaitable, Callable

import grpc
import orjson
from aiohttp import web

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.version import package_version
from snapserve.server.api.http_body import BodyLimits, BodyRefused, read_body
from snapserve.server.api.http_messages import (BINARY_HEADER, BINARY_TYPE, JSON_TYPE,
                                                RestInferRequest, decode_infer_request,
                                                decode_json, decode_rest, encode_rest,
                                                error_body, message_json, model_body_bound)
from snapserve.server.api.kserve import SERVER_NAME, KServeCore
from snapserve.server.api.openapi import OPENAPI_PATH, openapi_document
from snapserve.server.api.pipeline import InferRequest, parse_version
from snapserve.server.api.security import UNAUTHENTICATED_MESSAGE, TokenAuthInterceptor
from snapserve.server.api.shutdown import MESSAGE as SHUTTING_DOWN_MESSAGE
from snapserve.server.api.shutdown import Drain
from snapserve.server.api.status import HTTP_STATUS, describe_http_error
from snapserve.server.config import HttpLimits, format_address
from snapserve.server.errors import (ConfigError, InvalidInput, ItemExpired, ServerError,
                                     ShuttingDown, Unauthenticated)
from snapserve.server.listeners import EVICT_GRACE_S, BoundedServer, ListenerLimits
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.observability.metrics import API_HTTP
from snapserve.server.observability.request_context import REQUEST_ID_KEY, request_context
from snapserve.server.observability.tracing import extract_parent

__all__ = ["OPEN_PATHS", "HttpFrontEnd"]

logger = logging.getLogger(__name__)

# Probes and balancers call these without credentials, and must hear "not ready" while draining.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Repository control bodies hold a flag or a few parameter names.
CONTROL_BODY_BYTES = 64 * 1024
# Connections the kernel queues before the loop accepts them (the system's somaxconn caps it).
LISTEN_BACKLOG = 1024


def _json(obj: object) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type=JSON_TYPE)


# Queue full or server-wide bound (429), shutting down, not ready, at the connection limit (503).
RETRY_LATER = frozenset({HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED],
                         HTTP_STATUS[grpc.StatusCode.UNAVAILABLE]})
RETRY_AFTER_S = "1"


def _error(status: int, message: str) -> web.Response:
    response = web.Response(body=error_body(message), status=status, content_type=JSON_TYPE)
    if status == HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED]:
        response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: which scheme to use
    elif status in RETRY_LATER:
        # RFC 9110: when to come back. Overload and a drain pass within about a second; a client
        # that honours it (urllib3's Retry, many gateways) backs off instead of retrying at once.
        response.headers["Retry-After"] = RETRY_AFTER_S
    return response


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


class HttpFrontEnd:
    """The REST endpoints over a KServeCore; `start` binds, `stop` finishes what was accepted."""

    def __init__(self, core: KServeCore, drain: Drain, auth: TokenAuthInterceptor | None,
                 max_body_bytes: int, limits: HttpLimits = HttpLimits()) -> None:
        self._core = core
        self._drain = drain
        self._auth = auth
        self._max_body_bytes = max_body_bytes
        self.limits = limits
        self.server: BoundedServer | None = None
        self._runner: web.AppRunner | None = None
        self.address = ""
        # Where /metrics is served, for a scraper pointed at this port (app.py sets it; None:
        # metrics are off).
        self.metrics_url: str | None = None

    # -- the application ----------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes,
                              middlewares=[self._guard])
        get, post = web.get, web.post
        routes = [get("/v2", self.server_metadata),
                  get("/v2/health/live", self.live),
                  get("/v2/health/ready", self.ready),
                  get("/v2/models/stats", self.statistics),  # before /v2/models/{model}
                  post("/v2/repository/index", self.repository_index),
                  post("/v2/repository/models/{model}/load", self.repository_load),
                  post("/v2/repository/models/{model}/unload", self.repository_unload),
                  get(OPENAPI_PATH, self.openapi),
                  get("/metrics", self.metrics_elsewhere)]
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [get(base, self.model_metadata), get(f"{base}/ready", self.model_ready),
                       get(f"{base}/config", self.model_config),
                       get(f"{base}/stats", self.statistics), post(f"{base}/infer", self.infer)]
        app.add_routes(routes)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Drain, then tokens, then the endpoint; every failure as `{"error": ...}`."""
        try:
            response = await self._admitted(request, handler)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
            response = _error(exc.status, self._http_message(exc, request))
        except BodyRefused as exc:
            response = _error(exc.status, str(exc))
        except ConnectionError:
            raise  # the client went away mid-body: the listener logs it at DEBUG
        except Exception as exc:
            response = _error(*describe_http_error(exc))
        if not request.content.is_eof():
            response.force_close()  # a refused body is read on and dropped: the answer ends it
        if self._drain.draining:
            response.force_close()  # no keep-alive: the client's next call goes elsewhere
        response.headers["Server"] = SERVER_NAME  # not aiohttp's and Python's versions
        return response

    async def _admitted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if not self._drain.admit():
            raise ShuttingDown(SHUTTING_DOWN_MESSAGE)
        if self._auth is not None and not self._auth.authorized(
                [("authorization", request.headers.get("Authorization", ""))]):
            self._auth.refused += 1
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return await handler(request)

    def _http_message(self, exc: web.HTTPException, request: web.Request) -> str:
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return (f"the request body is larger than this server's limit of "
                    f"{self._max_body_bytes} bytes (--max-message-mb)")
        if isinstance(exc, web.HTTPMethodNotAllowed):
            return (f"{request.method} is not allowed on {request.path}; use "
                    f"{', '.join(sorted(exc.allowed_methods))}")
        if isinstance(exc, web.HTTPNotFound):
            return f"no endpoint {request.path}; the KServe v2 REST API is under /v2"
        return exc.reason

    # -- health and metadata -------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        self._core.server_live(kpb.ServerLiveRequest())
        return web.Response()

    async def ready(self, request: web.Request) -> web.Response:
        if self._core.server_ready(kpb.ServerReadyRequest()).ready:
            return web.Response()
        return _error(503, f"not ready: {self._core.not_ready_reason()}")

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], _version(request)
        if self._core.model_ready(kpb.ModelReadyRequest(name=name, version=version)).ready:
            return web.Response()
        return _error(503, f"model {name!r}{f' version {version}' if version else ''} is not "
                           "ready (not loaded, loading, or unloaded)")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(message_json(self._core.server_metadata(kpb.ServerMetadataRequest())))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(message_json(self._core.model_metadata(kpb.ModelMetadataRequest(
            name=request.match_info["model"], version=_version(request)))))

    async def model_config(self, request: web.Request) -> web.Response:
        answer = self._core.model_config(kpb.ModelConfigRequest(
            name=request.match_info["model"], version=_version(request)))
        return _json(message_json(answer.config))  # Triton's REST answer is the config itself

    async def statistics(self, request: web.Request) -> web.Response:
        return _json(message_json(self._core.model_statistics(kpb.ModelStatisticsRequest(
            name=request.match_info.get("model", ""), version=_version(request)))))

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document(package_version()))

    async def metrics_elsewhere(self, request: web.Request) -> web.Response:
        """Prometheus metrics have a port of their own (Triton's 8002), not this one: a 404
        that says where they are."""
        where = (f"they are served at {self.metrics_url}" if self.metrics_url else
                 "they are off on this server (--metrics-port off); --metrics-port 8002 serves them")
        return _error(404, f"metrics are not on the REST port: {where} (--metrics-port, "
                           "--metrics-host)")

    # -- inference -----------------------------------------------------------------------------

    def _served(self, request: web.Request) -> ServedEnsemble | None:
        """The version a request names, to bound its body by; None when there is none (the
        pipeline reports why, counted as every refusal is)."""
        try:
            return self._core.plane.registry.get(request.match_info["model"],
                                                 parse_version(_version(request)))
        except ServerError:
            return None

    def _body_limits(self, served: ServedEnsemble | None) -> BodyLimits:
        limits = self.limits
        bound, what = self._max_body_bytes, "--max-message-mb"
        if served is not None:
            model_bound, what_model = model_body_bound(served)
            if model_bound < bound:
                bound, what = model_bound, what_model
        return BodyLimits(bound, limits.body_timeout_s, limits.max_inflate_ratio, what,
                          limits.body_min_kib_s * 1024)

    async def infer(self, request: web.Request) -> web.Response:
        plane = self._core.plane
        served = self._served(request)
        # The declared length counts against the gRPC side's bound before a byte is read; a
        # chunked or compressed body counts as it arrives (api/http_body.py).
        with plane.intake.admit(request.content_length or 0) as ticket:
            body = await read_body(request, self._body_limits(served), ticket)
            rest = await plane.intake.run(len(body), decode_infer_request, body,
                                          request.headers.get(BINARY_HEADER), served)
            headers = [(key.lower(), value) for key, value in request.headers.items()]
            with request_context(rest.id or request.headers.get(REQUEST_ID_KEY, ""),
                                 extract_parent(headers)) as current:
                # The array views the body: nothing left to decode that is worth a thread.
                infer = InferRequest(request.match_info["model"], _version(request),
                                     current.request_id, rest, decode_rest, 0, rest.timeout_s,
                                     ticket)
                payload, header_length = await self._answer(infer)
        if header_length is None:
            response = web.Response(body=payload, content_type=JSON_TYPE)
        else:
            response = web.Response(body=payload, content_type=BINARY_TYPE)
            response.headers[BINARY_HEADER] = str(header_length)
        response.headers[REQUEST_ID_KEY] = current.request_id
        return response

    async def _answer(self, infer: InferRequest[RestInferRequest]) -> tuple[bytes, int | None]:
        """The pipeline's answer, given up at the request's timeout as gRPC gives up at a
        deadline (the batcher drops a request whose caller went away), so the client hears at
        once. In this task: `asyncio.timeout`, unlike `wait_for`, starts no task of its own."""
        try:
            async with asyncio.timeout(infer.timeout):
                return await self._core.plane.infer(infer, encode_rest, API_HTTP)
        except TimeoutError:
            assert infer.timeout is not None
            raise ItemExpired(f"the request's timeout of {infer.timeout * 1e3:.0f} ms passed "
                              "before it was answered") from None

    # -- repository ----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        limits = self.limits
        body = await read_body(request, BodyLimits(CONTROL_BODY_BYTES, limits.body_timeout_s,
                                                   limits.max_inflate_ratio,
                                                   "a repository request's bound",
                                                   limits.body_min_kib_s * 1024))
        if not body.strip():
            return {}
        obj = decode_json(body)
        if not isinstance(obj, dict):
            raise InvalidInput("the request body must be a JSON object")
        return obj

    async def repository_index(self, request: web.Request) -> web.Response:
        ready = (await self._body(request)).get("ready", False)
        answer = await self._core.repository_index(kpb.RepositoryIndexRequest(ready=ready is True))
        return _json([message_json(entry) for entry in answer.models])  # Triton's: a list

    def _parameters(self, body: dict) -> list[str]:
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput("parameters must be a JSON object")
        return list(parameters)

    async def repository_load(self, request: web.Request) -> web.Response:
        message = kpb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        for key in self._parameters(await self._body(request)):
            message.parameters[key].string_param = ""  # the names are what the check reads
        await self._core.repository_model_load(message)
        return web.Response()

    async def repository_unload(self, request: web.Request) -> web.Response:
        message = kpb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        for key in self._parameters(await self._body(request)):
            message.parameters[key].string_param = ""
        await self._core.repository_model_unload(message)
        return web.Response()

    # -- serving -------------------------------------------------------------------------------

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None,
                    reuse_port: bool = False) -> int:
        """Bind host:port (0: any free port) and serve; the bound port. `reuse_port`: with
        SO_REUSEPORT, beside the other worker processes of `--workers` (server/process/workers.py)."""
        # handle_signals=False: the CLI owns SIGTERM (cli.serve -> RunningServer.stop).
        self._runner = _Runner(self.application(), self._listener_limits(), access_log=None,
                               handle_signals=False)
        await self._runner.setup()
        # A deep accept queue: under a flood of connections a busy loop accepts late, and a
        # health probe whose SYN the kernel drops waits for the client's 1 s retransmission.
        site = web.TCPSite(self._runner, host.strip("[]"), port, ssl_context=ssl_context,
                           reuse_port=reuse_port or None, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(f"http_port: cannot bind {format_address(host, port)}: "
                              f"{exc.strerror}") from exc
        self.server = self._runner.server  # type: ignore[assignment]
        bound = self._runner.addresses[0][1]
        scheme = "https" if ssl_context is not None else "http"
        self.address = f"{scheme}://{format_address(host, bound)}"
        logger.info("serving KServe v2 REST on %s/v2", self.address)
        return bound

    def _listener_limits(self) -> ListenerLimits:
        limits = self.limits
        # A connection is not protected longer than it may take to send its headers.
        return ListenerLimits(limits.header_timeout_s, limits.keepalive_timeout_s,
                              limits.max_connections, limits.reserved_connections, OPEN_PATHS,
                              min(EVICT_GRACE_S, limits.header_timeout_s))

    async def stop(self, grace: float | None) -> None:
        """Stop listening, give requests still being answered `grace` seconds (None: none),
        then close every connection."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            # aiohttp reads a timeout of 0 as none at all: the smallest positive one instead.
            await runner.server.shutdown(max(grace or 0.0, 0.001))
        await runner.cleanup()


def _overflow() -> web.Response:
    return _error(503, "the server is at its connection limit (http_max_connections); this "
                       "connection may ask for /v2/health/* only: retry later")


class _Runner(web.AppRunner):
    """aiohttp's AppRunner, serving through a BoundedServer (server/listeners.py)."""

    def __init__(self, app: web.Application, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's own handler, after its start-up
        # auto_decompress off: a body is inflated by api/http_body.py, within its bounds.
        return BoundedServer(plain.request_handler, self._limits, _overflow,
                             request_factory=plain.request_factory, server_name=SERVER_NAME,
                             auto_decompress=False, access_log=None)
