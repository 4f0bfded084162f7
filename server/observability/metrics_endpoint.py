"""The Prometheus /metrics endpoint: a small HTTP/1.1 server on the event loop, no thread at all.

Why not prometheus_client's own (a ThreadingHTTPServer): it starts a thread per connection and
never times a connection out, so 300 idle connections held 300 threads, and it bound the gRPC
host (0.0.0.0 in the image). Here:
- its own host (`metrics_host`, default loopback): metrics tell an outsider what is served and
  how busy it is, so they are not exposed unless asked for;
- a connection must send its request within `timeout_s`, and read the answer within it too;
- at most `max_connections` at once; beyond, new connections are closed at once;
- one request per connection (`Connection: close`): scrapers reconnect every interval anyway.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from snapserve.server.errors import ConfigError

__all__ = ["MetricsEndpoint", "MetricsEndpointConfig"]

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8 * 1024  # request line and headers; a scraper sends a few hundred bytes


@dataclass(frozen=True)
class MetricsEndpointConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 for a scraper on another machine (then mind who can reach it)
    # Seconds a connection may take to send its request, and to read the answer.
    timeout_s: float = 5.0
    # Connections open at once; a scraper needs one. More are closed as they arrive.
    max_connections: int = 16

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("metrics_host must not be empty")
        if not self.timeout_s > 0:
            raise ConfigError(f"metrics_timeout_s must be > 0, got {self.timeout_s!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ConfigError("metrics_max_connections must be an integer >= 1, "
                              f"got {self.max_connections!r}")


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry,
                 config: MetricsEndpointConfig = MetricsEndpointConfig()) -> None:
        self._registry = registry
        self.config = config
        self._server: asyncio.base_events.Server | None = None
        self.open = 0  # connections being served now
        self.refused = 0  # connections closed at once: max_connections were open

    async def start(self, port: int) -> int:
        """Listen on config.host:port; the bound port (for port 0)."""
        try:
            self._server = await asyncio.start_server(self._serve, self.config.host.strip("[]"),
                                                      port, limit=MAX_HEAD_BYTES)
        except OSError as exc:
            raise ConfigError(f"metrics_port: cannot bind {self.config.host}:{port}: {exc}") from exc
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.config.max_connections:
            self.refused += 1
            writer.close()
            return
        self.open += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.config.timeout_s)
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), self.config.timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # too slow, too long, or gone: the connection is simply closed
        finally:
            self.open -= 1
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD") or path not in ("/metrics", "/"):
            return _response("404 Not Found", "text/plain", b"only GET /metrics is served\n")
        accept = next((line.partition(":")[2].strip() for line in lines[1:]
                       if line.lower().startswith("accept:")), "")
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._registry)
        return _response("200 OK", content_type, b"" if method == "HEAD" else body)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
