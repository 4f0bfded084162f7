"""`--workers N`: N server processes on one port, as gRPC's Python guidance does for many cores.

One Python process answers on one core's worth of event loop (grpc.aio's per-call work and ours
hold the GIL: docs/performance.md, the profile). Here the parent starts N copies of the same
command line (`python -m snapserve.server ...`), each a whole server with its own sessions,
batchers, health and repository polling, all bound to the same gRPC (and REST) port with
SO_REUSEPORT, so the kernel spreads new connections over them. The parent loads no model; it
holds the port (reserved here when the setting is 0), says `serving on HOST:PORT` once every
worker is ready, forwards SIGTERM/SIGINT to all of them (each drains as a lone server does:
drain window, grace) and exits 0 when all have. A worker that dies on its own stops the rest.

Metrics are one endpoint for the whole server: the parent serves /metrics on metrics_host:
metrics_port (0: a free port, logged as a lone server logs it), once every worker is ready. Each
worker serves its own on a free loopback port and writes that port into its ready pipe; at each
scrape the parent fetches them all and serves the sum (server/observability/metrics_merge.py), with
`snapserve_workers` and `snapserve_worker_scrape_errors_total` of its own. The parent's endpoint
runs on an event loop of its own, on a daemon thread: the main thread stays in the plain loops
below, so signals are forwarded as before. A balancer connection stays on one worker; so does a
client's channel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Sequence

from prometheus_client import CollectorRegistry

from snapserve.server.config import ServerConfig, format_address
from snapserve.server.engine.cores import usable_cores
from snapserve.server.errors import ConfigError
from snapserve.server.observability.metrics_endpoint import MetricsEndpoint, MetricsEndpointConfig
from snapserve.server.observability.metrics_merge import WorkerMetrics

__all__ = ["READY_FD_ENV", "WORKER_ENV", "notify_ready", "run_workers", "worker_config",
           "worker_index"]

logger = logging.getLogger(__name__)

WORKER_ENV = "ENSEMBLE_SERVER_WORKER"  # the worker's index, set by the parent for each child
READY_FD_ENV = "ENSEMBLE_SERVER_READY_FD"  # a pipe the worker writes to once it serves
NO_METRICS = b"-"  # what a worker says for its metrics port when metrics are off
WORKER_METRICS_HOST = "127.0.0.1"  # only the parent reads a worker's metrics


def worker_index() -> int | None:
    """This process's index among `--workers`, or None when it is not a worker."""
    value = os.environ.get(WORKER_ENV)
    return None if value is None else int(value)


def worker_config(config: ServerConfig, index: int, count: int) -> ServerConfig:
    """A worker's config: the shared ports with SO_REUSEPORT, metrics (when on) on a free
    loopback port for the parent to fetch, and its share of the cores for the auto instances
    and threads (engine/cores.py)."""
    metrics_port = None if config.metrics_port is None else 0
    endpoint = config.metrics_endpoint.replace(host=WORKER_METRICS_HOST)
    cores = config.runtime.cores or usable_cores()
    runtime = config.runtime.replace(cores=max(cores // count, 1))
    return config.replace(reuse_port=True, metrics_port=metrics_port, metrics_endpoint=endpoint,
                          runtime=runtime)


def notify_ready(metrics_port: int | None) -> None:
    """Tell the parent this worker serves, and on which loopback port its metrics are (None:
    not served); a no-op outside `--workers`."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        word = NO_METRICS if metrics_port is None else str(metrics_port).encode()
        os.write(int(fd), word + b"\n")  # one write, under PIPE_BUF: read whole
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
        self.metrics_ports: dict[int, int] = {}  # worker index -> its loopback metrics port
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
                said = os.read(fd, 64).strip()
                os.close(fd)
                index = self.ready_pipes.pop(fd)
                if not said:  # closed without a word: the worker is gone
                    logger.error("worker %d exited before serving", index)
                    return False
                if said != NO_METRICS:
                    self.metrics_ports[index] = int(said)
        return not self.ready_pipes

    def live_metrics_ports(self) -> dict[int, int]:
        """Index -> metrics port of each worker still running (asked from the metrics thread)."""
        return {index: port for index, port in self.metrics_ports.items()
                if self.processes[index].poll() is None}

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


class _MetricsThread:
    """The parent's /metrics: a MetricsEndpoint on an event loop of its own, on a daemon thread.
    A scrape holds that loop while WorkerMetrics fetches the workers (at most its timeout)."""

    def __init__(self, collector: WorkerMetrics, config: MetricsEndpointConfig) -> None:
        registry = CollectorRegistry()
        registry.register(collector)
        self._collector = collector
        self._endpoint = MetricsEndpoint(registry, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="metrics", daemon=True)

    def start(self, port: int) -> int:
        """Listen on the config's host:port; the bound port. ConfigError when it cannot bind."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._endpoint.start(port), self._loop).result()

    def close(self) -> None:
        if self._thread.is_alive():  # the endpoint stops on the loop that serves it
            stopping = asyncio.run_coroutine_threadsafe(self._endpoint.stop(), self._loop)
            concurrent.futures.wait([stopping], timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
        self._collector.close()


def _serve_metrics(config: ServerConfig, workers: _Workers) -> _MetricsThread | None:
    """The merged /metrics on metrics_host:metrics_port, logged as a lone server logs its own;
    None when metrics are off."""
    if config.metrics_port is None:
        return None
    collector = WorkerMetrics(workers.live_metrics_ports, len(workers.processes))
    metrics = _MetricsThread(collector, config.metrics_endpoint)
    try:
        bound = metrics.start(config.metrics_port)
    except BaseException:
        metrics.close()
        raise
    logger.info("metrics on http://%s:%d/metrics", config.metrics_endpoint.host, bound)
    return metrics


def run_workers(argv: Sequence[str], config: ServerConfig, count: int) -> int:
    """Run `count` workers of this command line on config's port until a signal; the exit
    status (0 when every worker drained and exited cleanly; 2 when the metrics port cannot be
    bound, as for a lone server)."""
    holder, port = _reserve(config.host, config.port)
    workers = _Workers(argv, count, port)
    previous = {sig: signal.signal(sig, workers.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics = None
    failed = False  # the parent's own start: its metrics port
    try:
        ready = workers.wait_ready()
        if ready:
            try:
                metrics = _serve_metrics(config, workers)
            except ConfigError as exc:
                logger.error("%s", exc)
                ready, failed = False, True
        if ready:
            logger.info("serving on %s with %d workers", format_address(config.host, port), count)
        elif not workers.stopping:
            workers.stopping = True
            workers.signal_all(signal.SIGTERM)
        code = workers.wait()
        for fd in workers.ready_pipes:
            os.close(fd)
        logger.info("all %d workers stopped", count)
        return 2 if failed else code
    finally:
        if metrics is not None:
            metrics.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        holder.close()
