"""`--workers N`: N server processes on one port, as gRPC's Python guidance does for many cores.

One Python process answers on one core's worth of event loop (grpc.aio's per-call work and ours
hold the GIL: docs/performance.md, the profile). Here the parent starts N copies of the same
command line (`python -m snapserve.server ...`), each a whole server with its own sessions,
batchers, health and repository polling, all bound to the same gRPC (and REST) port with
SO_REUSEPORT, so the kernel spreads new connections over them. The parent loads no model; it
holds the port (reserved here when the setting is 0), says `serving on HOST:PORT` once every
worker is ready, forwards SIGTERM/SIGINT to all of them (each drains as a lone server does:
drain window, grace) and exits 0 when all have. A worker that dies on its own stops the rest.

Metrics are per worker: worker k serves /metrics on metrics_port + k (0: each its own free
port, logged). A balancer connection stays on one worker; so does a client's channel.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from types import FrameType
from typing import Sequence

from snapserve.server.config import ServerConfig, format_address
from snapserve.server.engine.cores import usable_cores

__all__ = ["READY_FD_ENV", "WORKER_ENV", "notify_ready", "run_workers", "worker_config",
           "worker_index"]

logger = logging.getLogger(__name__)

WORKER_ENV = "ENSEMBLE_SERVER_WORKER"  # the worker's index, set by the parent for each child
READY_FD_ENV = "ENSEMBLE_SERVER_READY_FD"  # a pipe the worker writes to once it serves


def worker_index() -> int | None:
    """This process's index among `--workers`, or None when it is not a worker."""
    value = os.environ.get(WORKER_ENV)
    return None if value is None else int(value)


def worker_config(config: ServerConfig, index: int, count: int) -> ServerConfig:
    """A worker's config: the shared ports with SO_REUSEPORT, its own metrics port, and its
    share of the cores for the auto instances and threads (engine/cores.py)."""
    metrics_port = config.metrics_port
    if metrics_port:  # None: not served; 0: any free port, per worker
        metrics_port += index
    cores = config.runtime.cores or usable_cores()
    runtime = replace(config.runtime, cores=max(cores // count, 1))
    return replace(config, reuse_port=True, metrics_port=metrics_port, runtime=runtime)


def notify_ready() -> None:
    """Tell the parent this worker serves (a no-op outside `--workers`)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        os.write(int(fd), b"1")
        os.close(int(fd))


def _reserve(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound to host:port with SO_REUSEPORT, not listening: it holds the port (the
    one picked for 0) while the workers bind it too; no connection ever goes to it."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port,
                                                         type=socket.SOCK_STREAM)[0]
    holder = socket.socket(family, kind, proto)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(address)
    return holder, holder.getsockname()[1]


class _Workers:
    def __init__(self, argv: Sequence[str], count: int, port: int) -> None:
        self.stopping = False
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ready_pipes: dict[int, int] = {}  # read end -> worker index
        for index in range(count):
            read, write = os.pipe()
            env = {**os.environ, WORKER_ENV: str(index), READY_FD_ENV: str(write)}
            # The same command line, the reserved port last (a later flag wins).
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "snapserve.server", *argv, "--port", str(port)],
                env=env, pass_fds=(write,)))
            os.close(write)
            self.ready_pipes[read] = index

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self.signal_all(signum)  # a second signal too: the workers stop at once on it

    def wait_ready(self) -> bool:
        """True once every worker has said it serves; False if one exited or we are stopping."""
        while self.ready_pipes and not self.stopping:
            readable, _, _ = select.select(list(self.ready_pipes), [], [], 0.2)
            for fd in readable:
                said = os.read(fd, 1)
                os.close(fd)
                index = self.ready_pipes.pop(fd)
                if not said:  # closed without a word: the worker is gone
                    logger.error("worker %d exited before serving", index)
                    return False
        return not self.ready_pipes

    def wait(self) -> int:
        """Until every worker has exited; the first non-zero exit status, else 0."""
        while True:
            codes = [p.poll() for p in self.processes]
            if all(c is not None for c in codes):
                return next((c for c in codes if c), 0)
            failed = next((i for i, c in enumerate(codes) if c is not None and c != 0), None)
            if failed is not None and not self.stopping:
                logger.error("worker %d exited with status %d: stopping the others", failed,
                             codes[failed])
                self.stopping = True
                self.signal_all(signal.SIGTERM)
            time.sleep(0.1)


def run_workers(argv: Sequence[str], config: ServerConfig, count: int) -> int:
    """Run `count` workers of this command line on config's port until a signal; the exit
    status (0 when every worker drained and exited cleanly)."""
    holder, port = _reserve(config.host, config.port)
    workers = _Workers(argv, count, port)
    previous = {sig: signal.signal(sig, workers.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if workers.wait_ready():
            logger.info("serving on %s with %d workers", format_address(config.host, port), count)
        elif not workers.stopping:
            workers.stopping = True
            workers.signal_all(signal.SIGTERM)
        code = workers.wait()
        for fd in workers.ready_pipes:
            os.close(fd)
        logger.info("all %d workers stopped", count)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        holder.close()
