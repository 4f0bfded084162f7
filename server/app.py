"""Starting and stopping the gRPC server: `start_server(config) -> RunningServer`."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from server.config import ServerConfig, format_address
from server.errors import ConfigError
from server.registry import ModelRegistry, load_repository
from server.runtime import execution_providers
from server.service import EnsembleServicer

__all__ = ["RunningServer", "start_server"]

logger = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A started server. `port` is the bound port (the real one when the config asked for 0)."""

    config: ServerConfig
    port: int
    registry: ModelRegistry
    server: grpc.aio.Server
    executor: ThreadPoolExecutor

    @property
    def address(self) -> str:
        return format_address(self.config.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking RPCs, give in-flight ones `grace` seconds (None: cancel them now), then
        close the batchers and the inference threads."""
        await self.server.stop(grace)
        await self.registry.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        logger.info("stopped serving on %s", self.address)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServerConfig) -> RunningServer:
    """Load the repository, bind, start serving; logs `serving on HOST:PORT` once ready."""
    providers = execution_providers(config.runtime)  # refuses device=cuda without CUDA, up front
    logger.info("device %s: execution providers %s", config.runtime.device,
                [p if isinstance(p, str) else p[0] for p in providers])
    # One batch in flight per model version; the threads are made on demand.
    executor = ThreadPoolExecutor(thread_name_prefix="inference")
    loop = asyncio.get_running_loop()
    registry = await loop.run_in_executor(None, load_repository, config.model_repository,
                                          config.runtime, config.batcher, executor)
    if not len(registry):
        logger.warning("no model loaded from %s", config.model_repository)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ])
    pb_grpc.add_EnsembleServiceServicer_to_server(
        EnsembleServicer(registry, config.max_stream_in_flight), server)
    try:
        port = server.add_insecure_port(config.address)
    except RuntimeError as exc:
        port = 0
        cause: Exception | None = exc
    else:
        cause = None
    if port == 0:
        executor.shutdown(wait=False)
        raise ConfigError(f"cannot bind {config.address} (port in use, or host not local)") from cause
    await registry.start()
    await server.start()
    running = RunningServer(config, port, registry, server, executor)
    logger.info("serving on %s", running.address)
    return running
