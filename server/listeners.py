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
  fail a request that was never slow; in the reserve, one younger than `LOOK_S` is spared
  likewise. Nor is one whose request has arrived but is not yet read. Places are decided as
  connections are made, not as they are accepted (`_Admission`): in a burst of accepts, the
  earlier ones are made by then.
- The lobby: a newcomer with no place and none to close is judged by its request line. One
  whose line is already in its socket is judged at once (peeked, left for the loop to read);
  any other is held (at most `LOBBY_PER_RESERVED` per reserved place, each for at most
  `LOOK_S`; a full lobby closes the entry held longest) until its line arrives. A health probe
  that came in a flood of connections is admitted over the cap (by at most the lobby's size,
  with `LOOK_S` for its headers, for one answer); any other request is answered 503 once its
  headers are in (then a lingering close); a newcomer that sends no line in time is closed.
- A lingering close, as nginx's: a request answered before its whole body was read (refused
  on its headers: 401, 413, 429, a reserve place's 503) has the rest of its body read and
  dropped after the answer, until it ends, no byte comes for `LINGER_GAP_S`, or `LINGER_S` in
  all. A client that writes its whole body before it reads (http.client, requests) would
  otherwise have its write reset by the close and never see the answer.
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
import socket
import termios
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["EVICT_GRACE_S", "LINGER_GAP_S", "LINGER_S", "LOBBY_PER_RESERVED", "LOOK_S",
           "ListenerLimits", "BoundedServer", "check_file_limit", "quiet_accept_errors"]

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
# A newcomer sends its request line within a round trip of its open: a reserve connection
# younger than this is not closed for room, and a newcomer with no place is held this long for
# a look at its request line (`_Lobby`).
LOOK_S = 0.25
# Newcomers held for a look at once, per reserved place; a full lobby closes its oldest.
LOBBY_PER_RESERVED = 4
# A refused request's body still arriving after the answer is read and dropped while it keeps
# coming (a gap this long ends it: a client waiting for the answer before it sends), for at most
# LINGER_S in all (nginx's lingering_timeout and lingering_time: 5 s and 30 s).
LINGER_GAP_S = 0.5
LINGER_S = 5.0


@dataclass(frozen=True)
class ListenerLimits:
    """One listener's bounds (from HttpLimits for REST, MetricsEndpointConfig for metrics)."""

    header_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    reserved: int = 0
    reserved_paths: Collection[str] = ()
    evict_grace_s: float = 0.0


class _Admission(asyncio.Protocol):
    """An accepted connection until it is made: its place is decided then, not in the factory.
    A burst of accepts calls the factory for every connection before the first `connection_made`,
    so a place decided in the factory could only be taken from connections not yet made, which
    have had no chance to send their request and cannot be closed (see `_Connection.closable`):
    a probe in the burst would be refused for want of anything to close. At `connection_made`
    the earlier ones of the burst are made, and the oldest of them can make room as usual."""

    def __init__(self, server: BoundedServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        server = self.server
        connection = server.admit()
        if connection is not None:
            transport.set_protocol(connection)
            connection.connection_made(transport)
        elif server.reserved_request(_peek(transport, server.judged_bytes)):
            server.admit_probe(transport)  # its request is here: read as usual, not peeked
        elif not server.hold(transport):
            transport.close()


class _Lobby(asyncio.Protocol):
    """A newcomer with no place and none to close, held for at most `LOOK_S` (or until a full
    lobby needs its place) while its request line arrives. In a flood of connections a health
    probe looks like any newcomer until it sends; the one whose request line asks for a
    reserved path is admitted over the cap (by at most the lobby's size), any other is answered
    503 once its headers are in, and one that sends neither within `LOOK_S` is closed."""

    def __init__(self, server: BoundedServer, transport: asyncio.Transport) -> None:
        self.server = server
        self.transport = transport
        self.head = bytearray()
        self.answered = False
        self.timer = server.loop.call_later(min(LOOK_S, server.limits.header_timeout_s),
                                            self.refuse)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing() or self.answered:
            return  # the rest of a request answered 503: read, not kept
        if len(self.head) + len(data) > MAX_HEAD_BYTES:
            self.refuse()
            return
        self.head += data
        wanted = self.server.reserved_request(self.head)
        if wanted:
            self.server.admit_probe(self.transport, self)
        elif wanted is not None and b"\r\n\r\n" in self.head:
            self.answer()

    def answer(self) -> None:
        """The 503 once the request's headers are in (a client answered while it still sends
        them may fail its write and never read the answer), then a lingering close: the rest of
        the request is read and dropped until the client closes, for at most `LOOK_S`, since
        closing with bytes unread would reset the connection under the answer."""
        self.answered = True
        self.server.refused += 1
        self.transport.write(self.server.overflow_answer)
        self.timer.cancel()
        self.timer = self.server.loop.call_later(LOOK_S, self.refuse)

    def eof_received(self) -> bool:
        self.refuse()
        return False

    def refuse(self) -> None:
        self.server.leave(self, refused=not self.answered)
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.leave(self)


class _Connection(RequestHandler):
    """aiohttp's connection protocol with a header timer: armed when the connection opens and
    when the first byte of a later request arrives, disarmed when its request is handled."""

    def __init__(self, server: BoundedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.bounded = server
        self.busy = False  # answering a request (its body included)
        self.reserve = False  # took one of the reserved places: health checks only
        self.counted = True  # still counted as open (an evicted one stops counting at once)
        self.over = False  # admitted over the cap from the lobby: one answer, never closed for room
        self.waiting_since = server.now()  # open, or the end of its last answer
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.arm()

    def closable(self) -> bool:
        """Whether closing this connection for room loses no request: it is not answering one,
        and holds no request bytes the loop has yet to read (a probe's whole request can arrive
        in the same burst that fills the reserve)."""
        if self.busy or self.over or self.transport is None:
            return False
        return not _unread(self.transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._header_timer is None:
            self.arm()  # the first byte of the next request: its headers are due
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.disarm()
        self.bounded.forget(self)
        super().connection_lost(exc)

    def arm(self, timeout_s: float | None = None) -> None:
        self.disarm()
        limit = self.bounded.limits.header_timeout_s
        if timeout_s is not None:
            limit = min(timeout_s, limit)
        self._header_timer = self._loop.call_later(limit, self._headers_late)

    def disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.busy:
            self.bounded.timed_out += 1
            self.force_close()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """Write the answer, then, when the request's body was not read to its end, linger:
        aiohttp's own lingering is off (`lingering_time=0`), since it waits out its whole time
        for a client that sends nothing more, holding the place."""
        answered = await super().finish_response(request, resp, start_time)
        if not answered[1] and not request.content.is_eof():
            await _linger(request.content, self._loop)
        return answered

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

    Counted from `connection_made` (`admit`) to `connection_lost`; until it is made, an accepted
    connection holds a descriptor but no place (at most the listen backlog of them: one accept
    burst).
    """

    def __init__(self, handler: Handler, limits: ListenerLimits,
                 overflow: Callable[[], web.Response], server_name: str,
                 **kwargs: Any) -> None:
        kwargs.setdefault("max_line_size", MAX_HEAD_BYTES)
        kwargs.setdefault("max_field_size", MAX_HEAD_BYTES)
        # aiohttp's lingering close waits its whole time for a client that has stopped sending:
        # off, for `_Connection.finish_response`'s, which stops at a gap.
        super().__init__(self._tracked, keepalive_timeout=limits.keepalive_timeout_s,
                         lingering_time=0, **kwargs)
        self._inner = handler
        self._overflow = overflow
        self.server_name = server_name  # the Server header: no aiohttp or Python version
        self.limits = limits
        self.open: dict[_Connection, None] = {}  # in the order they began waiting
        self.lobby: dict[_Lobby, None] = {}  # in the order they came
        self.lobby_places = LOBBY_PER_RESERVED * limits.reserved if limits.reserved_paths else 0
        self.over = 0  # open over the cap: probes admitted from the lobby, at most lobby_places
        self.overflow_answer = _raw_answer(overflow(), server_name)
        # A request line's method and target, up to a reserved path's end: enough to judge.
        longest = max((len(path) for path in limits.reserved_paths), default=0)
        self.judged_bytes = len("HEAD ") + longest + 1
        self.full = 0  # open connections in full places (not the reserve)
        self.refused = 0  # no place: closed unanswered, or answered 503 from the lobby
        self.evicted = 0  # idle ones closed to make room
        self.timed_out = 0  # closed for sending their headers too slowly

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        return _Admission(self)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def admit(self) -> _Connection | None:
        """A place for a connection just made, closing the longest-waiting one for room at the
        full count; None when none can be closed."""
        limits = self.limits
        if (len(self.open) - self.over >= limits.max_connections + limits.reserved
                and not self._evict()):
            return None
        connection = _Connection(self, loop=self._loop, **self._kwargs)
        # Decided after the eviction: a new connection that closed a reserve one takes the
        # reserve place it freed, never a full one.
        connection.reserve = self.full >= limits.max_connections
        self.full += not connection.reserve
        self.open[connection] = None
        return connection

    def hold(self, transport: asyncio.Transport) -> bool:
        """Hold a newcomer with no place in the lobby for a look at its request line. A full
        lobby closes the entry held longest that has nothing unread (it had the most time to
        send a line, and a probe sends at once); False (refused, to be closed at once) when
        every entry's line is arriving."""
        if len(self.lobby) >= self.lobby_places:
            victim = next((lobby for lobby in self.lobby if not _unread(lobby.transport)), None)
            if victim is None:
                self.refused += 1
                return False
            victim.refuse()
        lobby = _Lobby(self, transport)
        self.lobby[lobby] = None
        transport.set_protocol(lobby)
        return True

    def reserved_request(self, head: bytes | bytearray) -> bool | None:
        """Whether the request line `head` begins asks for a reserved path (GET or HEAD, the
        query aside); None while it is too short to tell."""
        line, newline, _ = bytes(head[:self.judged_bytes + len(" HTTP/1.1\r\n")]).partition(b"\n")
        method, space, rest = line.partition(b" ")
        if space and method not in (b"GET", b"HEAD"):
            return False
        target, space, _ = rest.partition(b" ")
        if not (space or newline):
            return None if len(head) <= self.judged_bytes else False
        path = target.split(b"?", 1)[0].decode("latin-1")
        return method in (b"GET", b"HEAD") and path in self.limits.reserved_paths

    def admit_probe(self, transport: asyncio.Transport, lobby: _Lobby | None = None) -> None:
        """Admit a newcomer with no place whose request line asks for a reserved path: over the
        cap (refused past `lobby_places` of them), in the reserve. What the lobby read of it is
        handed on as if just received."""
        if self.over >= self.lobby_places:
            self.refused += lobby is None
            if lobby is not None:
                lobby.refuse()
            else:
                transport.close()
            return
        if lobby is not None:
            self.leave(lobby)
        connection = _Connection(self, loop=self._loop, **self._kwargs)
        connection.reserve = connection.over = True
        self.over += 1
        self.open[connection] = None
        transport.set_protocol(connection)
        connection.connection_made(transport)
        connection.arm(LOOK_S)  # a probe's whole request comes at once; over the cap, no slower
        if lobby is not None:
            connection.data_received(bytes(lobby.head))

    def leave(self, lobby: _Lobby, refused: bool = False) -> None:
        """`lobby` is decided (admitted or refused) or gone."""
        if lobby in self.lobby:
            del self.lobby[lobby]
            lobby.timer.cancel()
            self.refused += refused

    async def shutdown(self, timeout: float | None = None) -> None:
        for lobby in list(self.lobby):
            lobby.refuse()
        await super().shutdown(timeout)

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
            # goes once it has had `LOOK_S` to send it. Else a flood of fresh connections keeps
            # every place young and a probe waits for the lobby's look; this way the reserve
            # turns over for it too.
            old = self.now() - LOOK_S
            victim = next((c for c in self.open
                           if c.reserve and c.waiting_since <= old and c.closable()), None)
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
            self.over -= connection.over
            self.open.pop(connection, None)

    async def _tracked(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        if not isinstance(connection, _Connection):  # pragma: no cover - always ours
            return await self._inner(request)
        connection.busy = True
        connection.disarm()
        try:
            if connection.reserve and request.path not in self.limits.reserved_paths:
                response = self._overflow()
                response.force_close()
            else:
                response = await self._inner(request)
        finally:
            connection.busy = False
            self.waited(connection)
        if not response.prepared:
            response.headers["Server"] = self.server_name
            if connection.over:
                response.force_close()  # over the cap for one answer, not kept alive
        return response


async def _linger(body: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Read and drop the rest of an answered request's `body` (aiohttp's StreamReader) until
    it ends, no byte comes for `LINGER_GAP_S`, or `LINGER_S` have passed."""
    deadline = loop.time() + LINGER_S
    try:
        while (left := deadline - loop.time()) > 0:
            async with asyncio.timeout(min(LINGER_GAP_S, left)):
                if not await body.readany():
                    return  # its end
    except Exception:  # noqa: BLE001 - quiet for a gap, gone, or the body's own error: done
        return


def _unread(transport: asyncio.BaseTransport) -> int:
    """Bytes in `transport`'s socket that the loop has yet to read (0 once it is closed)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    unread = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, unread)
    except OSError:
        return 0  # closed under us: nothing to lose
    return unread[0]


def _peek(transport: asyncio.BaseTransport, size: int) -> bytes:
    """Up to `size` bytes waiting in `transport`'s socket, left there for the loop to read."""
    sock = transport.get_extra_info("socket")
    if sock is None or size <= 0:
        return b""
    # asyncio's socket wrapper has no recv: a socket object over the same descriptor, detached
    # before it could close it.
    peer = socket.socket(fileno=sock.fileno())
    try:
        return peer.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing yet (EAGAIN), or closed under us
        return b""
    finally:
        peer.detach()


def _raw_answer(response: web.Response, server_name: str) -> bytes:
    """`response` as bytes on the wire, for a connection that has no request handler."""
    body = response.body if isinstance(response.body, bytes) else b""
    extra = "".join(f"{name}: {response.headers[name]}\r\n" for name in ("Retry-After",)
                    if name in response.headers)
    head = (f"HTTP/1.1 {response.status} {response.reason}\r\n"
            f"Content-Type: {response.headers.get('Content-Type', 'text/plain')}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n"
            f"Server: {server_name}\r\n\r\n")
    return head.encode("latin-1") + body


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
