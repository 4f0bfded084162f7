"""What happens to a request's bytes before it joins a batcher's queue: admitted, parsed, decoded.

- Raw-bytes method handlers (`add_servicer`): gRPC hands the servicer the request's bytes, not a
  message, so bytes that are not a protobuf get INVALID_ARGUMENT naming the message type
  expected (`MalformedRequest`), on both APIs, instead of grpc.aio's UNKNOWN before any code of
  ours runs.
- A server-wide bound (`Intake`) on calls received but not yet queued and on the bytes they hold:
  beyond either, RESOURCE_EXHAUSTED at once (`Overloaded`). The batchers' queues have their own
  bound; this one covers the work before them (parsing, decoding), where a flood of large
  requests would otherwise pile up memory and CPU unseen.
- Heavy work off the event loop: parsing a large message and decoding a large payload run on a
  small pool of decode threads (`Intake.run`), so health checks and small requests are answered
  meanwhile. Small ones stay on the loop, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, TypeVar

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from snapserve.server.api.status import describe_error
from snapserve.server.config import IntakeConfig
from snapserve.server.errors import MalformedRequest, Overloaded
from snapserve.server.observability.threads import name_os_thread

__all__ = ["OFFLOAD_BYTES", "Intake", "IntakeConfig", "Ticket", "add_servicer"]

# Payloads from this size are parsed and decoded on a decode thread: below it, the hop to a
# thread and back costs more than the work (a 256 KiB message parses in well under 1 ms).
OFFLOAD_BYTES = 256 * 1024

T = TypeVar("T")


class Ticket:
    """One admitted call's share of the bound, held for the `with` block and given back once:
    when the request joins a batcher's queue (`queued`, called by the pipeline it is passed to),
    or when the block ends. A class, not a generator: it is on every call's path."""

    __slots__ = ("_intake", "nbytes", "_held")

    def __init__(self, intake: Intake, nbytes: int) -> None:
        self._intake, self.nbytes, self._held = intake, nbytes, False

    def __enter__(self) -> Ticket:
        self._held = True
        self._intake.calls += 1
        self._intake.bytes += self.nbytes
        return self

    def __exit__(self, *exc_info: object) -> bool:
        self.queued()
        return False

    def queued(self) -> None:
        """The request went to a batcher: from there the queue's own bound holds it, so it no
        longer counts against the intake bound. Idempotent."""
        if self._held:
            self._held = False
            self._intake.calls -= 1
            self._intake.bytes -= self.nbytes


class Intake:
    """The server-wide bound and the decode threads. Touched only on the event loop thread."""

    def __init__(self, config: IntakeConfig = IntakeConfig()) -> None:
        self.config = config
        self.calls = 0
        self.bytes = 0
        self.refused = 0
        self._pool: ThreadPoolExecutor | None = None
        # Streamed requests read and not yet answered, server-wide (api/streams.py).
        self.stream_room = asyncio.Semaphore(config.max_stream_requests)

    def admit(self, nbytes: int) -> Ticket:
        """A call of `nbytes`, counted while its `with` block runs (until queued); Overloaded
        at once beyond the bound."""
        config = self.config
        if self.calls >= config.max_pending_calls or (
                self.calls and self.bytes + nbytes > config.max_pending_bytes):
            self.refused += 1
            raise Overloaded(
                f"the server is decoding too much at once ({self.calls} calls holding "
                f"{self.bytes / 2**20:.1f} MiB; limits max_pending_calls="
                f"{config.max_pending_calls}, max_pending_bytes={config.max_pending_bytes}); "
                "retry later")
        return Ticket(self, nbytes)

    async def run(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), on a decode thread when the payload is large (OFFLOAD_BYTES)."""
        if nbytes < OFFLOAD_BYTES:
            return fn(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.decode_threads,
                                            thread_name_prefix="decode",
                                            initializer=name_os_thread, initargs=("decode",))
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def parse(self, cls: type[protobuf_message.Message], data: bytes) -> Any:
        """The message of type `cls` in `data` (on a decode thread when large); MalformedRequest
        naming the type if it is not one."""
        return await self.run(len(data), parse_message, cls, data)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def parse_message(cls: type[protobuf_message.Message], data: bytes) -> Any:
    """The message of type `cls` in `data`; MalformedRequest naming the type if it is not one."""
    try:
        return cls.FromString(data)
    except protobuf_message.DecodeError as exc:
        name = cls.DESCRIPTOR.full_name
        raise MalformedRequest(f"the request is not a valid {name} protobuf message "
                               f"({exc}); send a serialized {name}") from exc


# -- raw-bytes method handlers -----------------------------------------------------------------

def _unary_request(intake: Intake, cls: type, impl: Callable[..., Any]) -> Callable[..., Any]:
    # A method with a `ticket` parameter (inference) is handed the call's ticket, which it
    # passes to the pipeline to give back once the request is queued; the others hold it to
    # the end of the call.
    takes_ticket = "ticket" in inspect.signature(impl).parameters

    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            with intake.admit(len(data)) as ticket:
                # A small message parsed here: not even the coroutine of intake.parse.
                request = (parse_message(cls, data) if len(data) < OFFLOAD_BYTES
                           else await intake.parse(cls, data))
                if takes_ticket:
                    return await impl(request, context, ticket)
                return await impl(request, context)
        except (MalformedRequest, Overloaded) as exc:
            await context.abort(*describe_error(exc))

    return handler


def _streamed_requests(intake: Intake, cls: type, impl: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            # A message that is not a protobuf is a read error: the stream ends with its status.
            # Pulled only when the stream has room (api/streams.py): the bytes of a message
            # count here while it is parsed, the stream's bounds hold it from then on.
            async for data in requests:
                with intake.admit(len(data)):
                    request = await intake.parse(cls, data)
                yield request

        # An async generator function, as grpc.aio wants for a streamed answer; closed with the
        # call, so what the servicer still computes is cancelled at once.
        async with contextlib.aclosing(impl(parsed(), context)) as answers:
            async for answer in answers:
                yield answer

    return handler


# Both services have unary and bidirectional-streaming methods only.
_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
          (True, True): grpc.stream_stream_rpc_method_handler}


def _method_handler(servicer: object, method: MethodDescriptor,
                    intake: Intake) -> grpc.RpcMethodHandler:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    impl = getattr(servicer, method.name)
    wrap = _streamed_requests if method.client_streaming else _unary_request
    serialize = response_cls.SerializeToString

    def serializer(answer: Any) -> bytes:
        # An answer assembled from bytes (proto/wire.py) goes as it is.
        return answer if type(answer) is bytes else serialize(answer)

    return _KINDS[method.client_streaming, method.server_streaming](
        wrap(intake, request_cls, impl), request_deserializer=None,
        response_serializer=serializer)


def add_servicer(servicer: object, service: ServiceDescriptor, server: grpc.aio.Server,
                 intake: Intake) -> dict[str, grpc.RpcMethodHandler]:
    """Register every method of `service` on `server` as a raw-bytes handler calling `servicer`
    (what the generated add_*_to_server does, with our parsing in place of gRPC's); the
    handlers, by full method path (/service/method), for the C++ front end."""
    handlers = {m.name: _method_handler(servicer, m, intake) for m in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
    return {f"/{service.full_name}/{name}": handler for name, handler in handlers.items()}


def grow(ticket: Ticket, nbytes: int) -> None:
    """Count `nbytes` more on a held ticket (a REST body as it streams in); Overloaded, the
    ticket unchanged, when that takes the server past max_pending_bytes."""
    intake = ticket._intake
    if ticket._held and intake.calls > 1 and (
            intake.bytes + nbytes > intake.config.max_pending_bytes):
        intake.refused += 1
        raise Overloaded(
            f"the server is decoding too much at once ({intake.calls} calls holding "
            f"{intake.bytes / 2**20:.1f} MiB, max_pending_bytes="
            f"{intake.config.max_pending_bytes}); retry later")
    if ticket._held:
        intake.bytes += nbytes
    ticket.nbytes += nbytes
