"""A stream's requests answered in order, read ahead so that they share batches.

Both streaming RPCs (native PredictStream, KServe ModelStreamInfer) answer through
`answer_in_order`: a request that fails gets an error answer and the stream goes on.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from snapserve.server.api.status import answer_with_id, describe_error, request_id_of
from snapserve.server.observability.request_context import current_request, request_context

__all__ = ["answer_in_order"]

Request = TypeVar("Request")
Answer = TypeVar("Answer")


async def answer_in_order(requests: AsyncIterator[Request],
                          answer: Callable[[Request], Awaitable[Answer]],
                          error_answer: Callable[[Request, grpc.StatusCode, str], Answer],
                          window: int, shared: asyncio.Semaphore) -> AsyncIterator[Answer]:
    """A stream's answers, in request order. Requests are read ahead and started at once (up to
    `window` of this stream, and as long as `shared`, the server-wide bound on streamed requests
    in flight, has room), so the requests of one stream share batches. A request that fails gets
    `error_answer(request, code, message)` and the stream goes on; a read error (the client went
    away) is re-raised."""
    stream = current_request()
    parent = None if stream is None else stream.trace_parent

    async def settled(request: Request) -> Answer:
        # In a task of its own (a copy of the stream's context): its own id, the stream's parent.
        with request_context(request_id_of(request), parent) as current:
            answer_with_id(request, current.request_id)
            try:
                return await answer(request)
            except Exception as exc:
                return error_answer(request, *describe_error(exc))

    # At most `window` requests of this stream, and `shared` (server-wide) of all streams, read
    # and not yet answered. Room is taken *before* the next message is read and given back once
    # its answer is sent: a stream with no room reads nothing, so its unread messages stay in
    # gRPC's flow-control window and the client's writes wait (HTTP/2 back-pressure).
    slots = asyncio.Semaphore(window)
    in_flight: asyncio.Queue[asyncio.Task[Answer] | None] = asyncio.Queue()
    held = 0  # shared slots this stream holds; given back, whatever is left, when it ends

    async def take_room() -> None:
        nonlocal held
        await slots.acquire()
        await shared.acquire()
        held += 1

    def give_room() -> None:
        nonlocal held
        held -= 1
        shared.release()
        slots.release()

    async def read() -> None:
        try:
            while True:
                await take_room()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    give_room()
                    break
                await in_flight.put(asyncio.ensure_future(settled(request)))
        except Exception:
            await in_flight.put(None)  # wake the writer, which re-raises from `await reader`
            raise
        await in_flight.put(None)  # not in a finally: a cancelled reader must not block here

    reader = asyncio.ensure_future(read())
    try:
        while (task := await in_flight.get()) is not None:
            try:
                yield await task
            finally:
                give_room()
        await reader  # re-raises a read error (e.g. the client went away mid-stream)
    finally:
        reader.cancel()
        while not in_flight.empty():
            task = in_flight.get_nowait()
            if task is not None:
                task.cancel()
        for _ in range(held):
            shared.release()
