"""Limits on client connections: how long one may sit idle or live, and how keepalive pings go.

gRPC's defaults keep a connection forever, idle or not, and let a client ping as often as it
likes: a client that opens connections and walks away holds them, and a long-lived connection
never moves to a new instance behind a balancer. These are the server's settings for it, as
gRPC channel options (`grpc_options`).
"""

from __future__ import annotations

from dataclasses import dataclass

from snapserve.server.errors import ConfigError

__all__ = ["ConnectionConfig"]


@dataclass(frozen=True)
class ConnectionConfig:
    # A connection without a call this long is closed (GOAWAY); the client reconnects when it
    # needs to. Long enough not to churn a client that calls every few seconds.
    max_idle_s: float = 300.0
    # Any connection is asked to go away after this long (plus max_age_grace_s for its calls to
    # end), so clients spread again over instances added since. 0: no limit.
    max_age_s: float = 1800.0
    max_age_grace_s: float = 30.0
    # The server pings an idle connection this often to find dead peers, and drops it when a
    # ping is not answered within keepalive_timeout_s.
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Clients pinging more often than this (without calls) are told to go away after a few
    # strikes: pings cost the server work too.
    min_client_ping_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_idle_s", "max_age_s", "max_age_grace_s", "keepalive_s",
                     "keepalive_timeout_s", "min_client_ping_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"connections.{name} must be a number >= 0, got {value!r}")

    def grpc_options(self) -> list[tuple[str, int]]:
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        options = [("grpc.max_connection_idle_ms", ms(self.max_idle_s)),
                   ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
                   ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
                   ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
                   ("grpc.http2.max_ping_strikes", 2)]
        if self.max_age_s:
            options += [("grpc.max_connection_age_ms", ms(self.max_age_s)),
                        ("grpc.max_connection_age_grace_ms", ms(self.max_age_grace_s))]
        return [(k, v) for k, v in options if v or k.endswith("strikes")]
