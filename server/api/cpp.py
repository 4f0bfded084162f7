"""The C++ gRPC front end: the server's gRPC methods served through gRPC's C++ library
(server/cpp/frontend.cc) instead of grpc.aio, on the gRPC port (`grpc_frontend`: where the
library is built, by default) or on a port beside grpc.aio's (`cpp_grpc_port`).

The C++ side owns the port and reads each call's bytes on gRPC's threads; the event loop is
woken once per group of calls (an eventfd it watches), takes them all and runs each through
the same method handlers the grpc.aio server registers (api/intake.py `add_servicer`), with
the same drain, tokens, intake bound, request ids, status table and metrics. What grpc.aio
did on the loop for every call (accepting calls one at a time, its poller thread's hand-over,
a servicer context per call) is gone from it: docs/performance.md, "Sixth pass".

Served here: every method the grpc.aio port serves: snapserve.v1.EnsembleService and
inference.GRPCInferenceService (unary and streaming), grpc.health.v1.Health/Check and
Health/Watch, and reflection. A streamed answer is written message by message as the handler
yields it (the C++ side sends them in order; the handler waits while 16 are unread). A stream of
requests is read one message at a time, when the handler asks for the next (`_Stream`), so
its unread messages wait in HTTP/2's flow control as they do on grpc.aio. A call its client
cancels (or whose deadline passes) has its task cancelled, as grpc.aio does: the batcher drops
it before compute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncGenerator, Callable, Mapping, Sequence

import grpc
from google.protobuf.message import DecodeError

from snapserve.server.api.security import (OPEN_METHOD_PREFIXES, UNAUTHENTICATED_MESSAGE,
                                           TokenAuthInterceptor)
from snapserve.server.api.shutdown import MESSAGE as SHUTTING_DOWN, OPEN_WHILE_DRAINING, Drain
from snapserve.server.cpp.binding import (END, MESSAGE, PAUSE, UNREAD, CppServer,
                                          metadata_pairs)
from snapserve.server.models.ensemble import LONE_CALL, TAKEN_IN_OFF_LOOP

__all__ = ["CppContext", "CppFrontEnd"]

logger = logging.getLogger(__name__)


class CppContext:
    """What the method handlers ask of a call's context (grpc.aio.ServicerContext's subset
    they use), for a call of the C++ front end."""

    __slots__ = ("_metadata", "_deadline", "_trailer", "code", "details")

    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout: float) -> None:
        self._metadata = metadata
        self._deadline = None if timeout < 0 else time.monotonic() + timeout
        self._trailer: Sequence[tuple[str, str]] = ()
        self.code = grpc.StatusCode.OK
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._trailer = metadata

    def trailer(self) -> bytes:
        return b"".join(f"{k}\0{v}\0".encode("ascii", "replace") for k, v in self._trailer
                        if isinstance(v, str))

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


class _Stream:
    """A call's stream of requests, as the handler's async iterator: each message is read (the
    C++ side starts the read) only when the handler asks for it. Also where the call's answers
    wait for room to write (`writable`)."""

    __slots__ = ("_server", "_call_id", "_parse", "_waiting", "_room")

    def __init__(self, server: CppServer, call_id: int,
                 parse: Callable[[bytes], object] | None) -> None:
        self._server = server
        self._call_id = call_id
        self._parse = parse
        self._waiting: asyncio.Future[bytes | None] | None = None
        self._room: asyncio.Future[None] | None = None

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> object:
        if not self._server.read(self._call_id):  # ended (or answered): no read starts
            raise StopAsyncIteration
        self._waiting = asyncio.get_running_loop().create_future()
        try:
            data = await self._waiting
        finally:
            self._waiting = None
        if data is None:  # the client's half-close
            raise StopAsyncIteration
        return data if self._parse is None else self._parse(data)

    def arrived(self, data: bytes | None) -> None:
        """The message read (None: the stream's end)."""
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(data)

    async def writable(self) -> None:
        """Returns once the client has taken enough of the answers written (WRITABLE)."""
        self._room = asyncio.get_running_loop().create_future()
        try:
            await self._room
        finally:
            self._room = None

    def room(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)


class CppFrontEnd:
    """The C++ front end's calls, dispatched on the event loop."""

    def __init__(self, handlers: Mapping[str, grpc.RpcMethodHandler], drain: Drain,
                 auth: TokenAuthInterceptor | None) -> None:
        one_way = [method for method, handler in handlers.items()
                   if handler.request_streaming and not handler.response_streaming]
        if one_way:  # _serve streams requests only into a streamed answer
            raise ValueError(f"the C++ front end serves no stream-to-unary methods: {one_way}")
        self._handlers = dict(handlers)
        self._drain = drain
        self._auth = auth
        self._server: CppServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[int, asyncio.Task[None]] = {}  # by call id, until answered
        self._streams: dict[int, _Stream] = {}  # calls that stream answers, by id
        self._is_lone = self._lone  # one bound method for every call's LONE_CALL
        self._stopping = False
        self.port: int | None = None

    def start(self, address: str, channel_args: Sequence[tuple[str, int]], max_queued: int,
              cert_pem: bytes | None = None, key_pem: bytes | None = None,
              client_ca_pem: bytes | None = None) -> int:
        """Bind and serve; the bound port."""
        self._server = CppServer(address, channel_args, max_queued, cert_pem, key_pem,
                                 client_ca_pem, streaming=[
                                     method for method, handler in self._handlers.items()
                                     if handler.request_streaming])
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._server.wake_fd, self._take)
        self.port = self._server.port
        return self.port

    def _take(self) -> None:
        server = self._server
        if server is None:
            return
        loop, calls = self._loop, self._calls
        assert loop is not None
        for call_id, method, data, metadata, timeout in server.take():
            calls[call_id] = loop.create_task(
                self._serve(call_id, method, data, metadata, timeout))
        streams = self._streams
        for call_id, event, data in server.messages():
            stream = streams.get(call_id)
            if stream is None:  # answered already
                continue
            if event == MESSAGE:
                stream.arrived(data)
            elif event == END:
                stream.arrived(None)
            else:
                stream.room()
        for call_id in server.cancelled():  # as grpc.aio cancels a call's task
            task = calls.get(call_id)
            if task is not None:
                task.cancel()

    async def _serve(self, call_id: int, method: str, data: bytes, raw_metadata: bytes,
                     timeout: float) -> None:
        server = self._server
        assert server is not None
        # This call's task only: gRPC's threads take the next calls in while the loop computes.
        TAKEN_IN_OFF_LOOP.set(True)
        context = CppContext(metadata_pairs(raw_metadata), timeout)
        # Every call is answered exactly once, whatever happens (the C++ side holds it until).
        try:
            handler = self._admit(method, context)
            parse = handler.request_deserializer
            request = None if handler.request_streaming else data if parse is None else parse(data)
            # Every method here that streams requests streams answers too (no stream_unary).
            if handler.response_streaming:
                stream = self._streams[call_id] = _Stream(server, call_id, parse)
                answers = (handler.stream_stream(stream, context) if handler.request_streaming
                           else handler.unary_stream(request, context))
                await self._stream(call_id, handler, answers, stream, context)
                return
            LONE_CALL.set(self._is_lone)
            answer = handler.response_serializer(await handler.unary_unary(request, context))
            server.answer(call_id, answer, context.trailer())
        except grpc.aio.AbortError:
            server.fail(call_id, context.code.value[0], context.details, context.trailer())
        except DecodeError as exc:  # a method gRPC would parse for us (the health check)
            server.fail(call_id, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        f"the request is not a valid protobuf message for {method[:200]!r} ({exc})")
        except asyncio.CancelledError:
            if self._stopping:
                server.fail(call_id, grpc.StatusCode.UNAVAILABLE.value[0], SHUTTING_DOWN)
            else:  # its client cancelled it: the answer goes nowhere, but ends the call
                server.fail(call_id, grpc.StatusCode.CANCELLED.value[0],
                            "the client cancelled the call")
            raise
        except Exception:
            logger.exception("C++ front end: %s failed", method)
            server.fail(call_id, grpc.StatusCode.INTERNAL.value[0],
                        "internal error (logged by the server)")
        finally:
            self._calls.pop(call_id, None)
            self._streams.pop(call_id, None)

    async def _stream(self, call_id: int, handler: grpc.RpcMethodHandler,
                      answers: AsyncGenerator[object, None], stream: _Stream,
                      context: CppContext) -> None:
        """A streamed answer: each message written as the handler yields it, then OK. While the
        client has many unread, the handler waits (as a grpc.aio stream's write waits)."""
        server = self._server
        assert server is not None
        try:
            async for answer in answers:
                written = server.write(call_id, handler.response_serializer(answer))
                if written == PAUSE:
                    await stream.writable()
                elif written == UNREAD:  # not reached while the pause holds; the bound behind it
                    server.fail(call_id, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                                "the client does not read this stream's messages; ended")
                    return
        finally:
            await answers.aclose()  # its cleanup (a Watch's count) runs now, cancelled or not
        server.end(call_id, context.trailer())

    def _lone(self) -> bool:
        """Whether the asking unary call is the only call held now but streams of answers
        (a health Watch, a PredictStream): a call taken in and not yet started counts, so
        calls taken together never count as lone."""
        return len(self._calls) - len(self._streams) <= 1

    def _admit(self, method: str, context: CppContext) -> grpc.RpcMethodHandler:
        """The call's handler; or the status it gets instead, raised as context.abort raises it,
        asked in the order of the grpc.aio server's interceptors (drain, then tokens), which
        see every call before its method is looked up: a caller without a token learns
        nothing of what methods exist."""
        if not method.startswith(OPEN_WHILE_DRAINING) and not self._drain.admit():
            context.code, context.details = grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN
            raise grpc.aio.AbortError()
        if (self._auth is not None and not method.startswith(OPEN_METHOD_PREFIXES)
                and not self._auth.authorized(context.invocation_metadata())):
            self._auth.refused += 1
            context.code = grpc.StatusCode.UNAUTHENTICATED
            context.details = UNAUTHENTICATED_MESSAGE
            raise grpc.aio.AbortError()
        handler = self._handlers.get(method)
        if handler is None:  # as grpc.aio words it
            context.code = grpc.StatusCode.UNIMPLEMENTED
            context.details = f"Method not found: {method[:200]!r} is not a method of this server"
            raise grpc.aio.AbortError()
        return handler

    @property
    def refused(self) -> tuple[int, int, int]:
        """What the C++ side refused: calls (its queue full, closed), connections (over
        grpc_max_connections)."""
        return (0, 0, 0) if self._server is None else self._server.refused()

    async def stop(self, grace: float | None) -> None:
        """New calls get UNAVAILABLE; the calls in flight get `grace` seconds (None: no bound),
        then are cancelled (UNAVAILABLE); the port closes."""
        server = self._server
        if server is None:
            return
        server.close()
        refused = server.refused()
        self._take()  # what was queued before the close runs too
        if self._calls:
            await asyncio.wait(set(self._calls.values()), timeout=grace)
        self._stopping = True
        left = list(self._calls.values())
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        assert self._loop is not None
        self._loop.remove_reader(server.wake_fd)
        self._server = None
        await asyncio.to_thread(server.stop, 0.5)
        logger.info("C++ front end stopped (refused so far: %d calls with its queue full, %d "
                    "while closing, %d connections over the cap)", *refused)

