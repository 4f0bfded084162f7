"""The server's log lines: plain text or one JSON object per line, each naming the request it is
about (server/observability/request_context.py).

    ensemble-server ... --log-format json
    {"time": "2026-12-01T20:45:25.404Z", "level": "INFO", "logger": "snapserve.server.access",
     "message": "native nope: NOT_FOUND in 0.10 ms", "request_id": "lost-1", "model": "nope",
     "status": "NOT_FOUND", "latency_ms": 0.095}

`RequestFilter` sits on the handler, so a line from any logger (the registry, the batcher's
caller, an INTERNAL error's traceback) gets the request's id, model and version while that
request is being answered.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from snapserve.server.observability.request_context import current_request, loggable

__all__ = ["LOG_FORMATS", "JsonFormatter", "RequestFilter", "configure_logging"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
# Fields a line may carry beyond the standard ones: the request's, and the access log's.
EXTRA_FIELDS = ("request_id", "model", "version", "status", "latency_ms")


class RequestFilter(logging.Filter):
    """Adds the current request's id, model and version to every record (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = current_request()
        record.request_id = request.request_id if request else None
        # A model name is the client's text until a version resolved it: escaped and cut.
        record.model = (loggable(request.model) or None) if request else None
        record.version = request.version if request else None
        record.request_tag = f" [{request.request_id}]" if request else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, and what is known of
    EXTRA_FIELDS; `exception` holds a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str | int = "INFO", log_format: str = "text",
                      log_requests: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """The root logger writes to `stream` (stderr) in `log_format`; `log_requests`: every answered
    request gets an access line (INFO), not only the failed ones."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(RequestFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if log_requests:
        logging.getLogger("snapserve.server.access").setLevel(logging.DEBUG)
    return handler
