"""The C++ front end's library (frontend.cc): built on first use, loaded with ctypes.

`library()` compiles frontend.cc against the system's gRPC C++ library (pkg-config `grpc++`;
Debian/Ubuntu: `apt-get install g++ libgrpc++-dev pkg-config`) into a cache folder keyed by the
source's hash, once per machine, and loads it. `CppServer` wraps one running server; every
method but `stop` runs on the event loop's thread and returns at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

from snapserve.server.errors import ConfigError

__all__ = ["CPP_DIR_ENV", "END", "MESSAGE", "PAUSE", "UNREAD", "WRITABLE", "WRITTEN", "CallView",
           "CppServer", "MessageView", "build", "built", "library"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("frontend.cc")
# Where the compiled library is kept (default: ~/.cache/snapserve/cpp).
CPP_DIR_ENV = "SNAPSERVE_CPP_DIR"
BUILD_TIMEOUT_S = 300
INSTALL_HINT = ("the C++ front end needs a C++ compiler and gRPC's C++ library "
                "(Debian/Ubuntu: apt-get install g++ libgrpc++-dev pkg-config)")


class CallView(ctypes.Structure):
    """One queued call as frontend.cc's CallView lays it out."""

    _fields_ = [("id", ctypes.c_uint64),
                ("method", ctypes.c_void_p), ("method_len", ctypes.c_int64),
                ("data", ctypes.c_void_p), ("data_len", ctypes.c_int64),
                ("metadata", ctypes.c_void_p), ("metadata_len", ctypes.c_int64),
                ("timeout", ctypes.c_double)]


class MessageView(ctypes.Structure):
    """One event of a stream as frontend.cc lays it out (MESSAGE, END or WRITABLE)."""

    _fields_ = [("id", ctypes.c_uint64),
                ("data", ctypes.c_void_p), ("data_len", ctypes.c_int64),
                ("event", ctypes.c_int32)]


# A stream's events (frontend.cc's Event): a request message read, the requests' end (the
# client's half-close), room to write the answer's messages again.
MESSAGE, END, WRITABLE = 0, 1, 2
# What `write` says: go on writing; wait for the call's WRITABLE first; the client has left
# too many unread (end the call).
WRITTEN, PAUSE, UNREAD = 0, 1, -2


_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def _cache_dir() -> Path:
    configured = os.environ.get(CPP_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "snapserve" / "cpp"


def _compile(target: Path) -> None:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    pkg_config = shutil.which("pkg-config")
    if compiler is None or pkg_config is None:
        raise ConfigError(f"{INSTALL_HINT}: no {'g++' if compiler is None else 'pkg-config'} "
                          "on PATH")
    flags = subprocess.run([pkg_config, "--cflags", "--libs", "grpc++"], capture_output=True,
                           text=True, timeout=30)
    if flags.returncode != 0:
        raise ConfigError(f"{INSTALL_HINT}: pkg-config finds no grpc++ "
                          f"({flags.stderr.strip()[:200]})")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: a concurrent start never loads half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o",
                   str(built), *flags.stdout.split()]
        logger.info("building the C++ front end (once per machine): %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise ConfigError(f"building the C++ front end failed ({INSTALL_HINT}):\n"
                              f"{result.stderr.strip()[-2000:]}")
        os.replace(built, target)


def _target() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return _cache_dir() / f"libsnapfront-{digest}.so"


def built() -> bool:
    """Whether the library for this source is built here (no compiling to find out)."""
    return _target().is_file()


def build() -> Path:
    """The library's file for this source, compiled first if it is not there yet. An image
    builds it ahead (`python -m snapserve.server.cpp.binding`), so its server needs only gRPC's
    shared libraries, no compiler."""
    target = _target()
    if not target.exists():
        try:
            _compile(target)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"cannot build the C++ front end in {target.parent} "
                              f"({exc}); point {CPP_DIR_ENV} at a writable folder") from exc
    return target


def library() -> ctypes.CDLL:
    """The loaded library, compiled first if this source was never built here."""
    global _library
    with _lock:
        if _library is None:
            target = build()
            # PyDLL: the calls keep the GIL. Each returns in microseconds, and a call that
            # let the GIL go would hand it to the inference thread and wait to get it back.
            # Only snapfront_stop blocks; it goes through a CDLL handle, which lets it go.
            _library = _declare(ctypes.PyDLL(str(target)))
            _library.blocking_stop = ctypes.CDLL(str(target)).snapfront_stop
            _library.blocking_stop.restype = None
            _library.blocking_stop.argtypes = [ctypes.c_void_p, ctypes.c_double]
        return _library


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    c = ctypes
    lib.snapfront_start.restype = c.c_void_p
    lib.snapfront_start.argtypes = [c.c_char_p, c.c_char_p, c.c_int64, c.c_char_p, c.c_int64,
                                    c.c_int64, c.c_char_p, c.c_char_p, c.c_char_p,
                                    c.POINTER(c.c_int), c.c_char_p, c.c_int64]
    lib.snapfront_wake_fd.restype = c.c_int
    lib.snapfront_wake_fd.argtypes = [c.c_void_p]
    lib.snapfront_take.restype = c.c_int
    lib.snapfront_take.argtypes = [c.c_void_p, c.POINTER(CallView), c.c_int]
    lib.snapfront_cancelled.restype = c.c_int
    lib.snapfront_cancelled.argtypes = [c.c_void_p, c.POINTER(c.c_uint64), c.c_int]
    lib.snapfront_answer.restype = c.c_int
    lib.snapfront_answer.argtypes = [c.c_void_p, c.c_uint64, c.c_int, c.c_char_p, c.c_int64,
                                     c.c_char_p, c.c_char_p, c.c_int64]
    lib.snapfront_write.restype = c.c_int
    lib.snapfront_write.argtypes = [c.c_void_p, c.c_uint64, c.c_char_p, c.c_int64]
    lib.snapfront_read.restype = c.c_int
    lib.snapfront_read.argtypes = [c.c_void_p, c.c_uint64]
    lib.snapfront_messages.restype = c.c_int
    lib.snapfront_messages.argtypes = [c.c_void_p, c.POINTER(MessageView), c.c_int]
    lib.snapfront_close.restype = None
    lib.snapfront_close.argtypes = [c.c_void_p]
    lib.snapfront_refused.restype = c.c_uint64
    lib.snapfront_refused.argtypes = [c.c_void_p, c.c_int]
    return lib


def _pairs(items: Iterable[tuple[str, str]]) -> bytes:
    """key \\0 value \\0 ..., the C side's form of metadata and channel arguments."""
    return b"".join(f"{k}\0{v}\0".encode("ascii") for k, v in items)


class CppServer:
    """One running C++ front end."""

    def __init__(self, address: str, channel_args: Sequence[tuple[str, int]], max_queued: int,
                 cert_pem: bytes | None = None, key_pem: bytes | None = None,
                 client_ca_pem: bytes | None = None, take_at_once: int = 256,
                 streaming: Iterable[str] = ()) -> None:
        self._lib = lib = library()
        args = _pairs((name, str(int(value))) for name, value in channel_args)
        methods = b"".join(f"{method}\0".encode("ascii") for method in streaming)
        port = ctypes.c_int(0)
        error = ctypes.create_string_buffer(512)
        handle = lib.snapfront_start(address.encode(), args, len(args), methods, len(methods),
                                     max_queued, cert_pem, key_pem, client_ca_pem,
                                     ctypes.byref(port), error, len(error))
        if not handle:
            raise ConfigError(error.value.decode(errors="replace"))
        self._handle: int | None = handle
        self.port = port.value
        self._views = (CallView * take_at_once)()
        self._cancelled = (ctypes.c_uint64 * take_at_once)()
        self._messages = (MessageView * take_at_once)()
        self._take_at_once = take_at_once

    @property
    def wake_fd(self) -> int:
        return self._lib.snapfront_wake_fd(self._handle)

    def take(self) -> list[tuple[int, str, bytes, bytes, float]]:
        """The calls queued so far: (id, method, request bytes, metadata pairs, timeout s, <0
        for none), each to be answered once."""
        if self._handle is None:
            return []
        views = self._views
        count = self._lib.snapfront_take(self._handle, views, self._take_at_once)
        at = ctypes.string_at
        return [(v.id, at(v.method, v.method_len).decode("ascii", "replace"),
                 at(v.data, v.data_len), at(v.metadata, v.metadata_len), v.timeout)
                for v in views[:count]]

    def cancelled(self) -> list[int]:
        """Ids of taken calls whose clients cancelled them since the last look (each is still
        to be answered; the answer goes nowhere)."""
        if self._handle is None:
            return []
        count = self._lib.snapfront_cancelled(self._handle, self._cancelled, len(self._cancelled))
        return list(self._cancelled[:count])

    def read(self, call_id: int) -> bool:
        """Starts reading the next message of a call's stream of requests (it comes back from
        `messages`); False if the call is gone, a read is under way or the stream has ended."""
        if self._handle is None:
            return False
        return self._lib.snapfront_read(self._handle, call_id) == 0

    def messages(self) -> list[tuple[int, int, bytes]]:
        """The streams' events since the last look: (call id, MESSAGE/END/WRITABLE, the
        message's bytes or b"")."""
        if self._handle is None:
            return []
        views = self._messages
        count = self._lib.snapfront_messages(self._handle, views, len(views))
        at = ctypes.string_at
        return [(v.id, v.event, at(v.data, v.data_len) if v.event == MESSAGE else b"")
                for v in views[:count]]

    def answer(self, call_id: int, data: bytes, trailer: bytes = b"") -> None:
        if self._handle is not None:
            self._lib.snapfront_answer(self._handle, call_id, 0, data, len(data), None, trailer,
                                       len(trailer))

    def write(self, call_id: int, data: bytes) -> int:
        """One message of a streamed answer: WRITTEN; PAUSE (written, and the next waits for
        the call's WRITABLE); UNREAD (not written: its client has left too many unread, the
        caller ends the call). A call no longer waiting counts as WRITTEN (its end is near)."""
        if self._handle is None:
            return UNREAD
        written = self._lib.snapfront_write(self._handle, call_id, data, len(data))
        return WRITTEN if written == -1 else written

    def end(self, call_id: int, trailer: bytes = b"") -> None:
        """Ends a streamed answer with OK, after the messages written."""
        if self._handle is not None:
            self._lib.snapfront_answer(self._handle, call_id, 0, None, 0, None, trailer,
                                       len(trailer))

    def fail(self, call_id: int, code: int, message: str, trailer: bytes = b"") -> None:
        if self._handle is not None:
            self._lib.snapfront_answer(self._handle, call_id, code, None, 0,
                                       message.encode("utf-8", "replace"), trailer, len(trailer))

    def close(self) -> None:
        """New calls get UNAVAILABLE from now on; queued ones are still taken."""
        if self._handle is not None:
            self._lib.snapfront_close(self._handle)

    def refused(self) -> tuple[int, int, int]:
        """Refused so far: calls (queue full, closed), connections (over the cap)."""
        if self._handle is None:
            return 0, 0, 0
        return tuple(self._lib.snapfront_refused(self._handle, which)  # type: ignore[return-value]
                     for which in range(3))

    def stop(self, grace: float) -> None:
        """Unanswered calls get UNAVAILABLE; gRPC stops; every later call is a no-op. Blocks:
        run it off the event loop, once the loop no longer takes calls."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.blocking_stop(handle, grace)


def metadata_pairs(raw: bytes) -> tuple[tuple[str, str], ...]:
    """The C side's `key \\0 value \\0 ...` as grpc.aio's invocation metadata."""
    if not raw:
        return ()
    parts = raw.decode("latin-1").split("\0")
    return tuple(zip(parts[0:-1:2], parts[1:-1:2]))


if __name__ == "__main__":  # builds the library into SNAPSERVE_CPP_DIR ahead of any server
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build())
