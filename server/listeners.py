"""What an HTTP listener (the REST port, the metrics port) lets one connection hold, and for how
long, so that idle and half-sent connections cannot take the server's file descriptors.

- A header timeout: a connection sends its request's headers within `header_timeout_s` of its
  open (or of the first byte of a later request on it), else it is closed (nginx's
  client_header_timeout). Between requests, aiohttp's keep-alive timeout closes an idle one.
- A cap: at most `max_connections` open at once, and `reserved` more whose requests may only
  be for `reserved_paths` (health checks): a request for anything else on one of those gets
  503 and its connection is closed. A connection takes a full place only while fewer than
  `max_connections` hold one, so closing a reserve connection never turns its place into a full
  one: the reserve stays for health checks however the places churn.
- Eviction: at the full count, a new connection closes the one that has waited longest for a
  request (idle since its last answer, or since its open while it is still sending its
  headers: slow senders go first, a client between back-to-back requests last), as nginx reuses
  its idle keep-alive connections. One that waited less than `evict_grace_s` is never closed:
  its request is on its way (a health probe, a client's fresh connection), and closing it would
  fail a request that was never slow. Nor is one whose request has arrived but is not yet
  read, or one accepted in the same burst whose `connection_made` has not run. With none to
  close (every one answering a request or within its grace), the new connection is closed at
  once.
- Accept errors (EMFILE: no file descriptor left) are logged once per interval with a count,
  not once per attempt (`quiet_accept_errors`).
- No `Server:` banner naming aiohttp's and Python's versions: the listener's own name.
- aiohttp's own 400s (a bad request line, headers too large) log one DEBUG line, not a
  traceback quoting the request's bytes.

`check_file_limit` raises the process's soft open-file limit to what the caps need, and warns
when the hard limit is below it: past the limit, `accept` fails on every port at once.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import logging
import resource
import termios
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["EVICT_GRACE_S", "ListenerLimits", "BoundedServer", "check_file_limit", "quiet_accept_errors"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# aiohttp's request line and header field bound; a client sends a few hundred bytes.
MAX_HEAD_BYTES = 8 * 1024
# Descriptors the process needs besides client connections: models, logs, pipes, threads.
SPARE_FILES = 256
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_LOG_INTERVAL_S = 10.0
# A fresh connection's request is on its way within this on any link a probe uses; longer would
# let a flood of fresh connections keep every place from being freed for as long.
EVICT_GRACE_S = 1.0


@dataclass(frozen=True)
class ListenerLimits:
    """One listener's bounds (from HttpLimits for REST, MetricsEndpointConfig for metrics)."""

    header_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    reserved: int = 0
    reserved_paths: Collection[str] = ()
    evict_grace_s: float = 0.0


class _Refused(asyncio.Protocol):
    """A connection beyond the cap with none idle to make room: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Connection(RequestHandler):
    """aiohttp's connection protocol with a header timer: armed when the connection opens and
    when the first byte of a later request arrives, disarmed when its request is handled."""

    def __init__(self, server: BoundedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.bounded = server
        self.busy = False  # answering a request (its body included)
        self.reserve = False  # took one of the reserved places: health checks only
        self.counted = True  # still counted as open (an evicted one stops counting at once)
        self.waiting_since = server.now()  # open, or the end of its last answer
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.arm()

    def closable(self) -> bool:
        """Whether closing this connection for room loses no request: it is made (a burst of
        accepts calls the factory before any `connection_made`, and `force_close` before it
        closes nothing yet discards every byte after, leaving the client to the header timeout),
        is not answering one, and holds no request bytes the loop has yet to read (a probe's
        whole request can arrive in the same burst that fills the reserve)."""
        if self.busy or self.transport is None:
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        unread = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, unread)
        except OSError:
            return True  # closed under us: nothing to lose
        return unread[0] == 0

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._header_timer is None:
            self.arm()  # the first byte of the next request: its headers are due
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.disarm()
        self.bounded.forget(self)
        super().connection_lost(exc)

    def arm(self) -> None:
        self.disarm()
        self._header_timer = self._loop.call_later(self.bounded.limits.header_timeout_s,
                                                   self._headers_late)

    def disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.busy:
            self.bounded.timed_out += 1
            self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (a bad request line, headers too
        large), or whose client went away mid-body: one line at DEBUG, not a traceback quoting
        the request's bytes at ERROR."""
        if isinstance(exc, ConnectionError):
            logger.debug("client %s went away before its request was read", request.remote)
            status = 400  # never delivered: nobody is listening
        if status >= 500:
            response = super().handle_error(request, status, exc, message)
        else:
            logger.debug("refused a request from %s that is not valid HTTP/1.1: %s (%d)",
                         request.remote, type(exc).__name__, status)
            phrase = HTTPStatus(status).phrase
            response = web.Response(status=status, text=f"{status} {phrase}: the request is "
                                                        "not valid HTTP/1.1\n")
            response.force_close()
        response.headers["Server"] = self.bounded.server_name
        return response


class BoundedServer(web.Server):
    """aiohttp's protocol factory with the header timeout and the connection cap above.

    Counted from the factory call to `connection_lost`: a burst of connections calls the
    factory several times before the first `connection_made` runs.
    """

    def __init__(self, handler: Handler, limits: ListenerLimits,
                 overflow: Callable[[web.BaseRequest], web.StreamResponse], server_name: str,
                 **kwargs: Any) -> None:
        kwargs.setdefault("max_line_size", MAX_HEAD_BYTES)
        kwargs.setdefault("max_field_size", MAX_HEAD_BYTES)
        # A body nobody reads is not waited for: the connection closes after the answer.
        super().__init__(self._tracked, keepalive_timeout=limits.keepalive_timeout_s,
                         lingering_time=0, **kwargs)
        self._inner = handler
        self._overflow = overflow
        self.server_name = server_name  # the Server header: no aiohttp or Python version
        self.limits = limits
        self.open: dict[_Connection, None] = {}  # in the order they began waiting
        self.full = 0  # open connections in full places (not the reserve)
        self.refused = 0  # closed at once: every place taken by a request being answered
        self.evicted = 0  # idle ones closed to make room
        self.timed_out = 0  # closed for sending their headers too slowly

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        limits = self.limits
        if len(self.open) >= limits.max_connections + limits.reserved and not self._evict():
            self.refused += 1
            return _Refused()
        connection = _Connection(self, loop=self._loop, **self._kwargs)
        # Decided after the eviction: a new connection that closed a reserve one takes the
        # reserve place it freed, never a full one.
        connection.reserve = self.full >= limits.max_connections
        self.full += not connection.reserve
        self.open[connection] = None
        return connection

    def now(self) -> float:
        return self._loop.time()

    def _evict(self) -> bool:
        """Close the connection that has waited longest for a request, past the grace; False
        when every one is answering a request or within its grace.

        `open` is in the order connections began waiting (`waited`), so the first idle one is
        the one to close, and when it is within the grace every later one is too."""
        victim = None
        for connection in self.open:
            if not connection.closable():
                continue
            if self.now() - connection.waiting_since >= self.limits.evict_grace_s:
                victim = connection
            break
        if victim is None:
            # Every idle one is within its grace: the reserve's oldest still sending its request
            # goes, young or not. Else a flood of fresh connections keeps every place young and
            # a probe is refused at once; this way it always gets in, and has as many arrivals
            # as there are reserve places to send its request, which a probe does at once.
            victim = next((c for c in self.open if c.reserve and c.closable()), None)
        if victim is None:
            return False
        self.forget(victim)
        self.evicted += 1
        victim.force_close()
        return True

    def waited(self, connection: _Connection) -> None:
        """`connection` answered a request and waits for the next: last in the eviction order."""
        connection.waiting_since = self.now()
        if connection.counted:
            self.open.pop(connection, None)
            self.open[connection] = None

    def forget(self, connection: _Connection) -> None:
        if connection.counted:
            connection.counted = False
            self.full -= not connection.reserve
            self.open.pop(connection, None)

    async def _tracked(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        if not isinstance(connection, _Connection):  # pragma: no cover - always ours
            return await self._inner(request)
        connection.busy = True
        connection.disarm()
        try:
            if connection.reserve and request.path not in self.limits.reserved_paths:
                response = self._overflow(request)
                response.force_close()
            else:
                response = await self._inner(request)
        finally:
            connection.busy = False
            self.waited(connection)
        if not response.prepared:
            response.headers["Server"] = self.server_name
        return response


def check_file_limit(connections: int) -> None:
    """Raise the soft open-file limit towards what `connections` (every listener's cap) need,
    up to the hard limit; warn when even that is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as exc:
                logger.debug("cannot raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < want:
        logger.warning("open-file limit %d is below the %d the connection caps need "
                       "(grpc_max_connections, http_max_connections + http_reserved_connections, "
                       "metrics_max_connections, plus %d): lower the caps or raise the limit "
                       "(ulimit -n), or a flood of connections can leave no descriptor for "
                       "health checks", soft, want, SPARE_FILES)


class _AcceptErrors:
    """The loop's exception handler, with accept errors (no descriptors left) logged once per
    interval: asyncio reports each failed accept, every second on every listener."""

    def __init__(self, previous: Callable[..., Any] | None) -> None:
        self.previous = previous
        self.suppressed = 0
        self._next = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + ACCEPT_LOG_INTERVAL_S
        logger.error("cannot accept connections: %s (%d more such errors in the last %.0f s); "
                     "new connections wait in the listen queue", exc.strerror, self.suppressed,
                     ACCEPT_LOG_INTERVAL_S)
        self.suppressed = 0


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Install the bounded accept-error log on `loop` (once; other errors go on as before)."""
    previous = loop.get_exception_handler()
    if not isinstance(previous, _AcceptErrors):
        loop.set_exception_handler(_AcceptErrors(previous))
