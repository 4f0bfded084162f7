"""`ensemble-server` (also `python -m snapserve.server`): serve a model repository over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Mapping

from snapserve.proto.version import package_version
from snapserve.server.api.connections import ConnectionConfig
from snapserve.server.api.intake import IntakeConfig
from snapserve.server.api.security import SecurityConfig
from snapserve.server.app import start_server
from snapserve.server.config import ServerConfig
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.runtime import DEVICES, GRAPHS, PRECISIONS, RuntimeConfig
from snapserve.server.errors import ConfigError
from snapserve.server.metrics_endpoint import MetricsEndpointConfig
from snapserve.server.logs import LOG_FORMATS, configure_logging
from snapserve.server.models.policy import VERSION_POLICIES, RepositoryConfig

logger = logging.getLogger(__name__)

# Every flag --foo-bar can also be set by SNAPSERVE_FOO_BAR (containers, Kubernetes); a flag given
# on the command line wins over the variable, which wins over the built-in default (a repeatable
# flag such as --pin adds to its variable's list).
ENV_PREFIX = "SNAPSERVE_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_var(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Turn SNAPSERVE_* variables into the parser's defaults, checked like the flags themselves."""
    for action in parser._actions:  # argparse has no public iterator over its options
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        name = env_var(action)
        action.help = f"{action.help} [env {name}]"
        raw = environ.get(name, "")
        if not raw:  # unset or empty: as if not given
            continue
        if action.nargs == 0:  # a switch (store_true/store_false): 1/true/yes/on or 0/false/no/off
            if raw.lower() not in TRUE + FALSE:
                parser.error(f"{name}={raw!r}: use one of {', '.join(TRUE + FALSE)}")
            action.default = action.const if raw.lower() in TRUE else action.default
            continue
        try:
            value = action.type(raw) if callable(action.type) else raw
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{name}={raw!r}: {exc}")
        except (TypeError, ValueError):
            parser.error(f"{name}={raw!r} is not a valid {getattr(action.type, '__name__', 'value')}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value
        action.required = False


def parse_pins(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """'digits=2' or 'digits=2,3 tiny=1' -> [("digits", (2, 3)), ("tiny", (1,))]."""
    pins = []
    for item in text.split():
        name, sep, versions = item.partition("=")
        try:
            pins.append((name, tuple(int(v) for v in versions.split(","))))
        except ValueError:
            sep = ""
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"{item!r} is not MODEL=VERSION[,VERSION...]")
    return pins


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; defaults come from `environ` (default: os.environ), see ENV_PREFIX."""
    d, b, r = ServerConfig.__dataclass_fields__, BatcherConfig(), RuntimeConfig()
    rp, ic, me = RepositoryConfig(), IntakeConfig(), MetricsEndpointConfig()
    cc = ConnectionConfig()
    # allow_abbrev=False: a prefix such as --version must not be read as --version-policy.
    parser = argparse.ArgumentParser(
        prog="ensemble-server",
        description="Serve snapshot ensembles over gRPC (snapserve.v1, KServe v2) and REST (KServe v2).",
        allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--model-repository", type=Path, required=True,
                        help="folder of <model>/<version>/ as the trainer writes them")
    parser.add_argument("--host", default=d["host"].default, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=d["port"].default,
                        help="port to bind; 0 picks a free one (default %(default)s)")
    parser.add_argument("--http-port", type=int, default=d["http_port"].default,
                        help="serve the KServe v2 REST API (JSON, and Triton's binary tensors) on "
                             "this port of --host, with the same TLS and tokens as gRPC; 0 turns "
                             "it off (default %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default=r.device,
                        help="auto: CUDA when available, else CPU (default %(default)s)")
    parser.add_argument("--intra-op-threads", type=int, default=r.intra_op_threads,
                        help="ONNX Runtime threads per session; 0: one per core (default %(default)s)")
    parser.add_argument("--instances", type=int, default=r.instances,
                        help="runtime instances per model version: batches computed at once "
                             "(default %(default)s)")
    parser.add_argument("--graph", choices=GRAPHS, default=r.graph,
                        help="auto: time the fused ensemble.onnx and the members at load, keep the "
                             "faster (default %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default=r.precision,
                        help="fp16: the version's FP16 fused graph, where it has one (for GPUs) "
                             "(default %(default)s)")
    parser.add_argument("--cuda-graph-batch-sizes", type=_batch_sizes, default=(),
                        help="CUDA: capture the fused graph as CUDA graphs for these batch sizes, "
                             "e.g. 1,2,4,8,16,32 (default: off)")
    parser.add_argument("--max-batch-size", type=int, default=b.max_batch_size,
                        help="examples per inference call, and per request (default %(default)s)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=b.max_queue_delay_s * 1000,
                        help="longest wait for a batch to fill (default %(default)s)")
    parser.add_argument("--max-queue-size", type=int, default=b.max_queue_size,
                        help="requests waiting per model before RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--no-adaptive-wait", action="store_true",
                        help="always wait up to the queue delay for a full batch, even when no "
                             "batch is computing")
    parser.add_argument("--max-stream-in-flight", type=int, default=d["max_stream_in_flight"].default,
                        help="requests of one stream computed ahead (default %(default)s)")
    parser.add_argument("--max-stream-share", type=float, default=d["max_stream_share"].default,
                        help="share of a model's queue one stream may hold (default %(default)s)")
    parser.add_argument("--max-message-mb", type=float, default=d["max_message_bytes"].default / 2**20,
                        help="largest gRPC message in MiB (default %(default)s)")
    parser.add_argument("--grace-s", type=float, default=d["grace_s"].default,
                        help="on SIGTERM/SIGINT, time for in-flight requests (default %(default)s)")
    parser.add_argument("--drain-window-s", type=float, default=d["drain_window_s"].default,
                        help="on SIGTERM/SIGINT, report NOT_SERVING but keep answering new "
                             "requests this long before refusing them; 0: refuse at once "
                             "(default %(default)s)")
    parser.add_argument("--max-concurrent-streams", type=int,
                        default=d["max_concurrent_streams"].default,
                        help="concurrent calls per client connection (default %(default)s)")
    parser.add_argument("--max-pending-calls", type=int, default=ic.max_pending_calls,
                        help="calls received but not yet queued, server-wide, before "
                             "RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--max-pending-mb", type=float, default=ic.max_pending_bytes / 2**20,
                        help="MiB those calls may hold, server-wide (default %(default)s)")
    parser.add_argument("--decode-threads", type=int, default=ic.decode_threads,
                        help="threads that parse and decode large requests (default %(default)s)")
    parser.add_argument("--max-connection-idle-s", type=float, default=cc.max_idle_s,
                        help="close a client connection without a call this long "
                             "(default %(default)s)")
    parser.add_argument("--max-connection-age-s", type=float, default=cc.max_age_s,
                        help="ask every connection to go away after this long, so clients "
                             "spread over new instances; 0: never (default %(default)s)")
    parser.add_argument("--keepalive-s", type=float, default=cc.keepalive_s,
                        help="ping idle connections this often to find dead peers "
                             "(default %(default)s)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="pass NaN/Inf inputs to the model instead of refusing them")
    parser.add_argument("--tls-cert", type=Path, default=None,
                        help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, default=None,
                        help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    parser.add_argument("--auth-token-file", type=Path, default=None,
                        help="bearer tokens, one per line: calls need 'authorization: Bearer "
                             "<token>' (health and reflection stay open)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free "
                             "port (default: not served)")
    parser.add_argument("--metrics-host", default=me.host,
                        help="address the metrics endpoint binds, apart from --host: metrics "
                             "show what is served and how busy (default %(default)s)")
    parser.add_argument("--metrics-timeout-s", type=float, default=me.timeout_s,
                        help="seconds a metrics connection may take to send its request and "
                             "to read the answer (default %(default)s)")
    parser.add_argument("--metrics-max-connections", type=int, default=me.max_connections,
                        help="metrics connections open at once; more are closed as they arrive "
                             "(default %(default)s)")
    parser.add_argument("--version-policy", choices=VERSION_POLICIES, default=rp.version_policy,
                        help="latest: the newest loadable version of each model; all: every "
                             "version; specific: only --pin versions (default %(default)s)")
    parser.add_argument("--pin", type=parse_pins, action="extend", default=[],
                        metavar="MODEL=V[,V]",
                        help="versions to serve with --version-policy specific; repeat per "
                             "model, or separate with spaces ('digits=2 tiny=1,3')")
    parser.add_argument("--poll-interval", type=float, default=rp.poll_interval_s,
                        metavar="SECONDS",
                        help="scan the repository for new or removed versions this often and "
                             "switch without downtime; 0: never (default %(default)s)")
    parser.add_argument("--allow-repository-control", action="store_true",
                        help="allow RepositoryModelLoad/Unload (KServe v2) from clients")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default %(default)s)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="json: one object per line with request_id, model, version, status, "
                             "latency_ms (default %(default)s)")
    parser.add_argument("--log-requests", action="store_true",
                        help="an access line for every answered request, not only failed ones")
    apply_env_defaults(parser, os.environ if environ is None else environ)
    return parser


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_repository=args.model_repository, host=args.host, port=args.port,
        batcher=BatcherConfig(max_batch_size=args.max_batch_size,
                              max_queue_delay_s=args.max_queue_delay_ms / 1000,
                              max_queue_size=args.max_queue_size,
                              adaptive_wait=not args.no_adaptive_wait),
        runtime=RuntimeConfig(device=args.device, intra_op_threads=args.intra_op_threads,
                              allow_nonfinite=args.allow_nonfinite, instances=args.instances,
                              graph=args.graph, precision=args.precision,
                              cuda_graph_batch_sizes=args.cuda_graph_batch_sizes),
        grace_s=args.grace_s, drain_window_s=args.drain_window_s,
        max_message_bytes=int(args.max_message_mb * 2**20),
        max_stream_in_flight=args.max_stream_in_flight, max_stream_share=args.max_stream_share,
        max_concurrent_streams=args.max_concurrent_streams,
        repository=RepositoryConfig(
            version_policy=args.version_policy, pinned=_merge_pins(args.pin),
            poll_interval_s=args.poll_interval,
            allow_repository_control=args.allow_repository_control),
        metrics_port=args.metrics_port,
        connections=ConnectionConfig(max_idle_s=args.max_connection_idle_s,
                                     max_age_s=args.max_connection_age_s,
                                     keepalive_s=args.keepalive_s),
        http_port=args.http_port or None,  # 0: off
        metrics_endpoint=MetricsEndpointConfig(host=args.metrics_host,
                                               timeout_s=args.metrics_timeout_s,
                                               max_connections=args.metrics_max_connections),
        intake=IntakeConfig(max_pending_calls=args.max_pending_calls,
                            max_pending_bytes=int(args.max_pending_mb * 2**20),
                            decode_threads=args.decode_threads),
        security=SecurityConfig(tls_cert=args.tls_cert, tls_key=args.tls_key,
                                tls_client_ca=args.tls_client_ca,
                                auth_token_file=args.auth_token_file))


def _merge_pins(pins: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    merged: dict[str, tuple[int, ...]] = {}
    for name, versions in pins:
        merged[name] = merged.get(name, ()) + versions
    return merged


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop: the drain window, then the grace period. A
    second signal stops at once (RunningServer.hurry)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    running = None

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
        elif running is not None:
            logger.warning("second signal: stopping at once, cancelling what is in flight")
            running.hurry()

    for sig in (signal.SIGINT, signal.SIGTERM):  # before loading, so a signal then also exits 0
        loop.add_signal_handler(sig, on_signal)
    running = await start_server(config)
    try:
        await stop.wait()
        logger.info("stopping (drain window %.1fs, grace %.1fs)", config.drain_window_s,
                    config.grace_s)
    finally:
        await running.stop(config.grace_s, config.drain_window_s)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, args.log_requests)
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
