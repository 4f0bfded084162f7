"""`python -m snapserve.server.process.healthcheck`: ask a running server's gRPC health service whether it serves.

The container's HEALTHCHECK: calls grpc.health.v1.Health/Check on 127.0.0.1:$SNAPSERVE_PORT for
the overall service "" and exits 0 when the answer is SERVING, 1 otherwise (not serving, unknown
service, unreachable, too slow). Flags override the environment:

    python -m snapserve.server.process.healthcheck --port 50051 --service snapserve.v1.EnsembleService

TLS: when the server serves TLS (SNAPSERVE_TLS_CERT set), the check speaks TLS too and trusts that
certificate file, which suits a self-signed certificate or a chain that ends in its CA; otherwise
name the CA with --tls-ca. A server that requires client certificates (mutual TLS) cannot be
checked this way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapserve.server.config import format_address

DEFAULT_PORT = 50051  # ServerConfig's default, read from the same SNAPSERVE_PORT as the server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m snapserve.server.process.healthcheck",
        description="Exit 0 if the server's grpc.health.v1 status is SERVING, else 1.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="where to ask; the server in the same container (default %(default)s)")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("SNAPSERVE_PORT") or DEFAULT_PORT),
                        help="default: $SNAPSERVE_PORT, else %(default)s")
    parser.add_argument("--service", default="",
                        help='service name to check; "" is the whole server (default "")')
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds before giving up (default %(default)s)")
    parser.add_argument("--tls-ca", type=Path, default=os.environ.get("SNAPSERVE_TLS_CERT") or None,
                        help="PEM certificates to trust, and speak TLS; default: $SNAPSERVE_TLS_CERT "
                             "when set (the server's own), else plaintext")
    parser.add_argument("--tls-server-name", default=None,
                        help="the name the server's certificate must carry (default: --host)")
    return parser


def open_channel(target: str, tls_ca: Path | None = None, server_name: str | None = None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(target: str, service: str = "", timeout: float = 3.0, tls_ca: Path | None = None,
          server_name: str | None = None) -> tuple[bool, str]:
    """(serving, what to print) for one Health/Check call."""
    try:
        with open_channel(target, tls_ca, server_name) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{target}: {exc.code().name}: {exc.details()}"
    except OSError as exc:  # --tls-ca unreadable
        return False, f"{target}: {exc}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    serving, message = check(format_address(args.host, args.port), args.service, args.timeout,
                             args.tls_ca, args.tls_server_name)
    print(message, file=sys.stdout if serving else sys.stderr)  # CLI output: kept in the health log
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
