"""The Prometheus /metrics endpoint: aiohttp on the event loop that calls it, no thread at all.

Metrics tell an outsider what is served and how busy it is, and a scrape is cheap to open, so:
- its own host (`metrics_host`, default loopback), apart from the gRPC host: not exposed unless
  asked for;
- a connection must send its request within `timeout_s`, and read the answer within it too;
- at most `max_connections` open at once; beyond, new connections are closed as they arrive;
- one request per connection (`Connection: close`): scrapers reconnect every interval anyway;
- GET (and HEAD) /metrics only: 404 for another path, 405 for another method.

aiohttp's low-level `web.Server` rather than an `Application`: the bound on connections needs
the protocol factory, which the low-level server is, and one path needs no router.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from snapserve.server.config import MetricsEndpointConfig
from snapserve.server.errors import ConfigError

__all__ = ["METRICS_PATH", "MetricsEndpoint", "MetricsEndpointConfig"]

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
MAX_HEAD_BYTES = 8 * 1024  # a request or header line; a scraper sends a few hundred bytes


class _Refused(asyncio.Protocol):
    """A connection beyond `max_connections`: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _BoundedServer(web.Server):
    """aiohttp's protocol factory, which refuses connections beyond `limit` open at once.

    Counted from the factory call to `connection_lost`, not by `connections`: a burst of
    connections calls the factory several times before the first `connection_made` runs.
    """

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 limit: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limit = limit
        self.open = 0  # connections being served now
        self.refused = 0  # connections closed at once: `limit` were open

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        if self.open >= self.limit:
            self.refused += 1
            return _Refused()
        self.open += 1
        return super().__call__()

    def connection_lost(self, handler: web.RequestHandler,
                        exc: BaseException | None = None) -> None:
        self.open -= 1
        super().connection_lost(handler, exc)


def _plain(status: int, text: str, **headers: str) -> web.Response:
    response = web.Response(status=status, text=text, headers=headers)
    response.force_close()
    return response


class MetricsEndpoint:
    """Serves `registry` on config.host; `start` and `stop` run on the loop that serves it."""

    def __init__(self, registry: CollectorRegistry,
                 config: MetricsEndpointConfig = MetricsEndpointConfig()) -> None:
        self._registry = registry
        self.config = config
        self._server: _BoundedServer | None = None
        self._runner: web.ServerRunner | None = None

    @property
    def open(self) -> int:
        """Connections being served now."""
        return 0 if self._server is None else self._server.open

    @property
    def refused(self) -> int:
        """Connections closed at once because `max_connections` were open."""
        return 0 if self._server is None else self._server.refused

    async def start(self, port: int) -> int:
        """Listen on config.host:port; the bound port (for port 0). ConfigError when it cannot
        bind."""
        timeout = self.config.timeout_s
        # keepalive_timeout closes a connection that has not sent its (first) request in time;
        # lingering_time 0: a request body nobody reads is not waited for.
        self._server = _BoundedServer(self._answer, self.config.max_connections, access_log=None,
                                      keepalive_timeout=timeout, lingering_time=0,
                                      max_line_size=MAX_HEAD_BYTES, max_field_size=MAX_HEAD_BYTES)
        self._runner = web.ServerRunner(self._server, handle_signals=False, shutdown_timeout=timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host.strip("[]"), port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"metrics_port: cannot bind {self.config.host}:{port}: {exc}") from exc
        return int(self._runner.addresses[0][1])

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != METRICS_PATH:
            return _plain(404, "only GET /metrics is served\n")
        if request.method not in ("GET", "HEAD"):
            return _plain(405, "only GET /metrics is served\n", Allow="GET, HEAD")
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self._registry)
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.content_length = len(body)
        response.force_close()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await response.prepare(request)
                if request.method == "GET":
                    await response.write(body)
                await response.write_eof()
        except TimeoutError:  # the client reads too slowly: drop it, unsent bytes and all
            if request.transport is not None:
                request.transport.abort()
        return response

    async def stop(self) -> None:
        """Stop listening and close the connections, waiting at most timeout_s for answers
        being written."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
