"""The request being answered, in a contextvar: its id, model and version, for every log line
(server/observability/logs.py) and trace span (server/observability/tracing.py) about it.

api/status.py opens one per call and per request of a stream: the id comes from the request
itself (native `request_id`, KServe `id`), else the call's `x-request-id` metadata, else it is
made up here; the answer carries it back. A contextvar, not a parameter, because the lines that
need it are written deep below the handler (the registry, the batcher's caller, an INTERNAL
error's traceback), and asyncio copies it into every task a request starts.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

__all__ = ["REQUEST_ID_KEY", "RequestContext", "current_request", "loggable", "metadata_value",
           "new_request_id", "open_request", "request_context"]

REQUEST_ID_KEY = "x-request-id"  # the de facto header name (Envoy, nginx, KServe's ingress)
MAX_ID_CHARS = 128  # a longer id is cut: it goes into every log line of its request
# Model names are at most 255 characters (config.MAX_MODEL_NAME): a valid one is logged whole.
MAX_LOGGED_CHARS = 256


@dataclass
class RequestContext:
    request_id: str
    model: str = ""
    version: int | None = None  # once the request reached a model version
    api: str = ""
    trace_parent: Any = None  # an OpenTelemetry Context from the call's metadata, when tracing


_CURRENT: ContextVar[RequestContext | None] = ContextVar("snapserve_request", default=None)


def _reset_ids() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = os.urandom(8).hex(), itertools.count()


_ID_PREFIX, _ID_COUNTER = "", itertools.count()
_reset_ids()
os.register_at_fork(after_in_child=_reset_ids)  # a forked worker must not repeat its parent's ids


def new_request_id() -> str:
    """32 hex digits, unique per process (a random prefix) and call (a counter): as unique as a
    uuid4 for a log's purposes, without a system call (os.urandom) and a UUID object per
    request, which made uuid4 the largest Python item of the event loop (docs/performance.md)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def clean_request_id(value: str) -> str:
    """Printable ASCII only, at most MAX_ID_CHARS: an id a caller chose cannot forge log lines."""
    return "".join(c for c in value[:4 * MAX_ID_CHARS] if " " < c <= "~")[:MAX_ID_CHARS]


def loggable(value: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """A client's string (a model name, a path) as a log may hold it: control and other
    non-printable characters escaped (a newline cannot start a forged line) and cut to about
    `limit` characters, marked when cut (a 100 KB name writes a short line)."""
    if len(value) <= limit and value.isprintable():
        return value
    text = value[:limit].encode("unicode_escape").decode("ascii")[:limit]
    return text + f"...[{len(value)} chars]" if len(value) > limit else text


def metadata_value(metadata: Sequence[tuple[str, Any]] | None, key: str) -> str:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""


def current_request() -> RequestContext | None:
    return _CURRENT.get()


def open_request(request_id: str = "", trace_parent: Any = None) -> RequestContext:
    """Make a request current, until the context (the task) ends: `request_id` (cleaned), or a
    new one when empty."""
    context = RequestContext(clean_request_id(request_id) or new_request_id(),
                             trace_parent=trace_parent)
    _CURRENT.set(context)
    return context


@contextlib.contextmanager
def request_context(request_id: str = "", trace_parent: Any = None) -> Iterator[RequestContext]:
    """`open_request` for the block only."""
    token = _CURRENT.set(None)
    try:
        yield open_request(request_id, trace_parent)
    finally:
        _CURRENT.reset(token)
