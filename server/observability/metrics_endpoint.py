"""The Prometheus /metrics endpoint: aiohttp on the event loop that calls it, no thread at all.

Metrics tell an outsider what is served and how busy it is, and a scrape is cheap to open, so:
- its own host (`metrics_host`, default loopback), apart from the gRPC host: not exposed unless
  asked for;
- a connection must send its request within `timeout_s`, and read the answer within it too;
- at most `max_connections` open at once; beyond, a new connection closes the one idle longest
  (connected, its request not sent), or is closed itself when every one is being answered, so
  idle connections cannot keep a scraper out (server/listeners.py);
- one request per connection (`Connection: close`): scrapers reconnect every interval anyway;
- GET (and HEAD) /metrics only: 404 for another path, 405 for another method.

aiohttp's low-level `web.Server` rather than an `Application`: the bound on connections needs
the protocol factory, which the low-level server is, and one path needs no router.
No `Server:` banner with aiohttp's and Python's versions.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from snapserve.server.config import MetricsEndpointConfig
from snapserve.server.errors import ConfigError
from snapserve.server.listeners import BoundedServer, ListenerLimits

__all__ = ["METRICS_PATH", "MetricsEndpoint", "MetricsEndpointConfig"]

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
SERVER_NAME = "snapserve-metrics"


def _plain(status: int, text: str, **headers: str) -> web.Response:
    response = web.Response(status=status, text=text, headers=headers)
    response.force_close()
    return response


def _overflow() -> web.Response:  # no reserve: never called
    return _plain(503, "too many metrics connections\n")


class MetricsEndpoint:
    """Serves `registry` on config.host; `start` and `stop` run on the loop that serves it."""

    def __init__(self, registry: CollectorRegistry,
                 config: MetricsEndpointConfig = MetricsEndpointConfig()) -> None:
        self._registry = registry
        self.config = config
        self._server: BoundedServer | None = None
        self._runner: web.ServerRunner | None = None

    @property
    def open(self) -> int:
        """Connections being served now."""
        return 0 if self._server is None else len(self._server.open)

    @property
    def refused(self) -> int:
        """Connections closed at once because `max_connections` were being answered."""
        return 0 if self._server is None else self._server.refused

    @property
    def evicted(self) -> int:
        """Idle connections closed to make room for new ones."""
        return 0 if self._server is None else self._server.evicted

    async def start(self, port: int) -> int:
        """Listen on config.host:port; the bound port (for port 0). ConfigError when it cannot
        bind."""
        timeout = self.config.timeout_s
        # One request per connection: the header timeout is the only one a connection needs.
        limits = ListenerLimits(timeout, timeout, self.config.max_connections)
        self._server = BoundedServer(self._answer, limits, _overflow, SERVER_NAME,
                                     access_log=None, auto_decompress=False)
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
        response = web.StreamResponse(headers={"Content-Type": content_type,
                                               "Server": SERVER_NAME})
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
