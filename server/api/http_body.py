"""Reading a REST request's body within its bounds, before the bytes they bound are taken in.

- The declared `Content-Length` is checked against the bound before a byte is read, and admitted
  against the server's pending-bytes bound (api/intake.py); a chunked or compressed body is
  counted there as it arrives, and refused (429) as soon as it takes the server past it.
- A compressed body (`Content-Encoding: gzip` or `deflate`) is inflated here, in steps of at
  most INFLATE_STEP bytes with the event loop free between them, and refused (413) as soon as
  it passes the bound or inflates more than `max_inflate_ratio` times what was sent: aiohttp's
  own inflation runs in its protocol before any handler could bound it, so it is off
  (`auto_decompress=False`). Another encoding gets 415.
- A body that goes `body_timeout_s` without a byte is cut (408), as nginx's client_body_timeout,
  and so is one slower than `min_rate` bytes/s on average past its first `body_timeout_s`
  (Apache mod_reqtimeout's MinRate): its deadline is `body_timeout_s` after the headers plus a
  second for every `min_rate` bytes arrived. A gap bound alone lets a body trickled a byte at a
  time hold its connection, and a place under the connection cap, for as long as it likes.
- A refused body is not read further: the answer closes the connection (`BodyRefused`).
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass

from aiohttp import web

from snapserve.server.api.intake import Ticket, grow

__all__ = ["BodyLimits", "BodyRefused", "INFLATE_STEP", "read_body"]

# Output per inflate call: a few hundred microseconds of CPU, then other callbacks run.
INFLATE_STEP = 256 * 1024
# Small bodies are not held to the ratio: a short run of zeros inflates far more than 100:1.
RATIO_FLOOR = 2**20
# zlib's window bits for each encoding: gzip's header, zlib's header.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class BodyRefused(Exception):
    """A body refused on its way in; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int  # after inflating
    body_timeout_s: float
    max_inflate_ratio: float
    what: str = "--max-message-mb"  # where the bound comes from, for the message
    min_rate: float = 16 * 1024  # bytes/s, averaged from the headers on (http_body_min_kib_s)


def _decompressor(request: web.BaseRequest) -> zlib._Decompress | None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in _WBITS:
        return zlib.decompressobj(_WBITS[encoding])
    raise BodyRefused(415, f"Content-Encoding {encoding[:64]!r} is not supported; send the body "
                           "as it is, or with gzip or deflate")


def _too_large(limits: BodyLimits) -> BodyRefused:
    return BodyRefused(413, f"the request body is larger than this server's limit of "
                            f"{limits.max_bytes} bytes ({limits.what})")


class _Body:
    """The bytes taken in so far, counted against the bound and the ticket."""

    def __init__(self, limits: BodyLimits, ticket: Ticket | None) -> None:
        self.limits, self.ticket = limits, ticket
        self.parts: list[bytes] = []
        self.size = 0
        self.sent = 0  # as sent, before inflating

    def add(self, part: bytes) -> None:
        self.size += len(part)
        if self.size > self.limits.max_bytes:
            raise _too_large(self.limits)
        ratio = self.limits.max_inflate_ratio
        if self.size > max(RATIO_FLOOR, self.sent * ratio):
            raise BodyRefused(413, f"the request body inflates more than {ratio:g} times its "
                                   f"{self.sent} compressed bytes (max_inflate_ratio); send it "
                                   "uncompressed")
        if self.ticket is not None and self.size > self.ticket.nbytes:
            grow(self.ticket, self.size - self.ticket.nbytes)
        self.parts.append(part)


async def _inflated(inflater: zlib._Decompress, chunk: bytes, body: _Body) -> None:
    data = chunk
    while data:
        try:
            part = inflater.decompress(data, INFLATE_STEP)
        except zlib.error as exc:
            raise BodyRefused(400, f"the body is not valid for its Content-Encoding: {exc}") from None
        data = inflater.unconsumed_tail
        if part:
            body.add(part)
        if data:
            await asyncio.sleep(0)  # a bomb's next step waits its turn behind other callbacks
        if inflater.eof and (data or inflater.unused_data):
            raise BodyRefused(400, "the compressed body has bytes after its end")


async def read_body(request: web.BaseRequest, limits: BodyLimits,
                    ticket: Ticket | None = None) -> bytes:
    """The body, inflated; BodyRefused (413, 415, 408, 400) without reading on once refused,
    Overloaded (from the ticket) past the server's pending-bytes bound."""
    inflater = _decompressor(request)
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:
        raise _too_large(limits)
    if ticket is not None and declared is not None and declared > ticket.nbytes:
        grow(ticket, declared - ticket.nbytes)
    body = _Body(limits, ticket)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        deadline = start + limits.body_timeout_s + body.sent / limits.min_rate
        wait = min(limits.body_timeout_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):
                chunk = await request.content.readany()
        except TimeoutError:
            if wait < limits.body_timeout_s:
                raise BodyRefused(408, f"the request body arrives slower than "
                                       f"{limits.min_rate / 1024:g} KiB/s (http_body_min_kib_s): "
                                       f"{body.sent} bytes in {loop.time() - start:.1f} s") from None
            raise BodyRefused(408, f"no byte of the request body arrived for "
                                   f"{limits.body_timeout_s:g} s (http_body_timeout_s); "
                                   f"{body.sent} bytes arrived before") from None
        if not chunk:
            break
        body.sent += len(chunk)
        if inflater is None:
            body.add(chunk)
        else:
            await _inflated(inflater, chunk, body)
    if inflater is not None and not inflater.eof:
        raise BodyRefused(400, "the compressed body ends before its compressed stream does")
    return b"".join(body.parts)
