"""`ensemble-server` (also `python -m server`): serve a model repository over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from server.app import start_server
from server.batcher import BatcherConfig
from server.config import ServerConfig
from server.errors import ConfigError
from server.runtime import DEVICES, RuntimeConfig

logger = logging.getLogger("server")


def build_parser() -> argparse.ArgumentParser:
    d, b, r = ServerConfig.__dataclass_fields__, BatcherConfig(), RuntimeConfig()
    parser = argparse.ArgumentParser(
        prog="ensemble-server", description="Serve snapshot ensembles over gRPC (snapserve.v1).")
    parser.add_argument("--model-repository", type=Path, required=True,
                        help="folder of <model>/<version>/ as the trainer writes them")
    parser.add_argument("--host", default=d["host"].default, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=d["port"].default,
                        help="port to bind; 0 picks a free one (default %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default=r.device,
                        help="auto: CUDA when available, else CPU (default %(default)s)")
    parser.add_argument("--intra-op-threads", type=int, default=r.intra_op_threads,
                        help="ONNX Runtime threads per session; 0: one per core (default %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=b.max_batch_size,
                        help="examples per inference call, and per request (default %(default)s)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=b.max_queue_delay_s * 1000,
                        help="longest wait for a batch to fill (default %(default)s)")
    parser.add_argument("--max-queue-size", type=int, default=b.max_queue_size,
                        help="requests waiting per model before RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--max-stream-in-flight", type=int, default=d["max_stream_in_flight"].default,
                        help="requests of one stream computed ahead (default %(default)s)")
    parser.add_argument("--max-message-mb", type=float, default=d["max_message_bytes"].default / 2**20,
                        help="largest gRPC message in MiB (default %(default)s)")
    parser.add_argument("--grace-s", type=float, default=d["grace_s"].default,
                        help="on SIGTERM/SIGINT, time for in-flight requests (default %(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_repository=args.model_repository, host=args.host, port=args.port,
        batcher=BatcherConfig(max_batch_size=args.max_batch_size,
                              max_queue_delay_s=args.max_queue_delay_ms / 1000,
                              max_queue_size=args.max_queue_size),
        runtime=RuntimeConfig(device=args.device, intra_op_threads=args.intra_op_threads),
        grace_s=args.grace_s, max_message_bytes=int(args.max_message_mb * 2**20),
        max_stream_in_flight=args.max_stream_in_flight)


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop with the configured grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before loading, so a signal then also exits 0
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(config)
    try:
        await stop.wait()
        logger.info("stopping (grace %.1fs)", config.grace_s)
    finally:
        await running.stop(config.grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # found at start-up: device, port
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
