"""The server's configuration: one frozen dataclass, validated at construction.

The CLI maps its flags onto it; tests and other code build it directly. Component settings live
in their components' own dataclasses (BatcherConfig, RuntimeConfig, RepositoryConfig) and are
nested here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from snapserve.server.api.connections import ConnectionConfig
from snapserve.server.api.intake import IntakeConfig
from snapserve.server.api.security import SecurityConfig
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.runtime import RuntimeConfig
from snapserve.server.errors import ConfigError
from snapserve.server.observability.metrics_endpoint import MetricsEndpointConfig
from snapserve.server.models.policy import RepositoryConfig

__all__ = ["DEFAULT_HTTP_PORT", "BatcherConfig", "IntakeConfig", "RepositoryConfig", "RuntimeConfig",
           "ServerConfig", "format_address"]


# Triton's HTTP port (its gRPC one is 8001; MLServer's are 8080/8081): clear of the gRPC default
# 50051 and of the metrics port the docs use (9100).
DEFAULT_HTTP_PORT = 8000


def format_address(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ServerConfig:
    # <repository>/<model>/<version>/ as the trainer writes it (docs/model-repository.md).
    model_repository: Path
    host: str = "127.0.0.1"  # 0.0.0.0 / [::] to accept connections from other machines
    port: int = 50051  # 0: any free port; RunningServer.port says which
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # On SIGTERM, in-flight requests get this long to finish before they are cancelled.
    grace_s: float = 5.0
    # On SIGTERM, health says NOT_SERVING at once, but new requests are still answered this long
    # (balancers and Kubernetes endpoints keep sending for seconds); then they are refused with
    # UNAVAILABLE and the grace period begins. 0: refuse at once.
    drain_window_s: float = 3.0
    # Largest request or response on the wire; gRPC's own default (4 MiB) is small for images.
    max_message_bytes: int = 64 * 1024 * 1024
    # Requests of one PredictStream computed ahead of the answer being sent: more lets a stream
    # fill batches by itself, and bounds the memory one stream may hold.
    max_stream_in_flight: int = 64
    # The share of a model's queue (batcher max_queue_size) one stream may hold: a stream's
    # window is the smaller of the two, so one PredictStream cannot fill the queue by itself.
    max_stream_share: float = 0.25
    # TLS / mutual TLS and bearer tokens (server/api/security.py); all off by default.
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # Concurrent calls (HTTP/2 streams) per client connection; more wait in the client until one
    # ends. Bounds what one connection can hold open; gRPC's own default is unlimited.
    max_concurrent_streams: int = 256
    # Version policy, polling for new versions, explicit load/unload.
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    # Prometheus /metrics over HTTP on host:metrics_port. None: not served (still counted);
    # 0: any free port (RunningServer.metrics_port says which).
    metrics_port: int | None = None
    # The metrics endpoint's own host (loopback unless asked), timeouts and connection bound.
    metrics_endpoint: MetricsEndpointConfig = field(default_factory=MetricsEndpointConfig)
    # The KServe v2 REST API (server/api/http.py) on host:http_port, beside gRPC, with the same
    # TLS and tokens. None: not served; 0: any free port (RunningServer.http_port says which).
    # (The CLI's --http-port 0 turns it off, as Triton users expect.)
    http_port: int | None = DEFAULT_HTTP_PORT
    # Server-wide bound on calls received but not yet queued and the bytes they hold, and the
    # threads that decode large requests (server/api/intake.py).
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    # Idle and age limits of client connections, keepalive pings (server/api/connections.py).
    connections: ConnectionConfig = field(default_factory=ConnectionConfig)
    # Bind the gRPC and REST ports with SO_REUSEPORT: one of `--workers N` processes sharing
    # them (server/process/workers.py). Off otherwise, so a second server on a taken port fails to start.
    reuse_port: bool = False
    # Freeze the heap once the server is up, out of the cyclic collector's way (server/process/heap.py:
    # full collections under load stopped the loop for ~30 ms each). Off for a server embedded
    # in a process whose own heap should stay the collector's (the test suite: a collection of
    # pytest's heap at every start cost it 80 s).
    freeze_heap: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        if not self.model_repository.is_dir():
            raise ConfigError(f"model_repository {str(self.model_repository)!r} is not a directory")
        if not self.host:
            raise ConfigError("host must not be empty")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if not self.grace_s >= 0:
            raise ConfigError(f"grace_s must be >= 0, got {self.grace_s!r}")
        if not self.drain_window_s >= 0:
            raise ConfigError(f"drain_window_s must be >= 0, got {self.drain_window_s!r}")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be an integer >= 1024, "
                              f"got {self.max_message_bytes!r}")
        if not isinstance(self.max_stream_in_flight, int) or self.max_stream_in_flight < 1:
            raise ConfigError("max_stream_in_flight must be an integer >= 1, "
                              f"got {self.max_stream_in_flight!r}")
        if not 0 < self.max_stream_share <= 1:
            raise ConfigError(f"max_stream_share must be in (0, 1], got {self.max_stream_share!r}")
        if not isinstance(self.max_concurrent_streams, int) or self.max_concurrent_streams < 1:
            raise ConfigError("max_concurrent_streams must be an integer >= 1, "
                              f"got {self.max_concurrent_streams!r}")
        if self.metrics_port is not None and (
                not isinstance(self.metrics_port, int) or not 0 <= self.metrics_port <= 65535):
            raise ConfigError(f"metrics_port must be an integer in [0, 65535], got "
                              f"{self.metrics_port!r}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(f"metrics_port {self.metrics_port} is the gRPC port; pick another")
        if self.http_port is not None and (
                not isinstance(self.http_port, int) or not 0 <= self.http_port <= 65535):
            raise ConfigError(f"http_port must be an integer in [0, 65535] or None (off), got "
                              f"{self.http_port!r}")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            which = "gRPC" if self.http_port == self.port else "metrics"
            raise ConfigError(f"http_port {self.http_port} is the {which} port; pick another")

    @property
    def stream_window(self) -> int:
        """Requests of one stream in flight at once: max_stream_in_flight, and no more than
        max_stream_share of the queue (at least 1)."""
        share = max(1, int(self.batcher.max_queue_size * self.max_stream_share))
        return min(self.max_stream_in_flight, share)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)
