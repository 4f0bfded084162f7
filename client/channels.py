"""How both clients open their channel: retries, load balancing, message limits, targets.

gRPC does the retrying and the balancing itself, from a service config passed as a channel
option (`grpc.service_config`), so both clients, sync and async, behave alike and a retry never
re-enters Python:

- `RetryPolicy`: a call that fails with UNAVAILABLE (a server draining or gone, a connection
  refused) or RESOURCE_EXHAUSTED (a full queue) is tried again, up to `max_attempts` in all,
  after a random wait in [0, backoff] (full jitter), the backoff growing by `multiplier` from
  `initial_backoff_s` to `max_backoff_s`. All attempts share the call's one deadline. gRPC
  retries only calls whose request it still holds (`grpc.per_rpc_retry_buffer_size`, set here
  to the message limit) and a stream only until its first answer arrives.
- Load balancing: `round_robin` over every address the target resolves to: a headless
  Kubernetes Service (`dns:///snapserve-headless.ns.svc.cluster.local:50051`) or a list of
  addresses (`["10.0.0.5:50051", "10.0.0.6:50051"]`, made into an `ipv4:` target). A retry goes
  through the balancer again, so it lands on another replica when one is draining. The balancer
  also watches each replica's health (grpc.health.v1, gRFC A17) and skips one that says
  NOT_SERVING, as a draining server does at once: most calls never meet the refusal at all.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Sequence, Union

from snapserve.client.credentials import Pem, Security
from snapserve.client.messages import ModelInfo
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT_S", "MAX_MESSAGE_BYTES", "ClientBase", "RetryPolicy",
           "Target", "channel_options", "resolve_target", "service_config"]

DEFAULT_TARGET = "127.0.0.1:50051"
# A call's default deadline, every retry included: long enough for a cold batch on a CPU, short
# enough that a hung server does not hang its callers. None (per call or per client): no deadline.
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default; gRPC's own 4 MiB is small for images
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
MAX_ATTEMPTS_CAP = 5  # gRPC's own ceiling: a service config asking for more gets 5

Target = Union[str, Sequence[str]]  # "host:port", "dns:///name:port", or a list of addresses
ChannelOption = tuple[str, Any]


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retryPolicy, with defaults for riding out a rolling update."""

    max_attempts: int = 5  # the first call included; gRPC allows at most 5
    initial_backoff_s: float = 0.05  # the first retry waits up to this long (uniformly random)
    max_backoff_s: float = 1.0  # no wait grows beyond this
    multiplier: float = 2.0  # each retry's backoff ceiling is this times the one before
    codes: tuple[str, ...] = RETRYABLE_CODES  # grpc.StatusCode names worth another attempt

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= MAX_ATTEMPTS_CAP:
            raise ValueError(f"max_attempts must be in [2, {MAX_ATTEMPTS_CAP}], "
                             f"got {self.max_attempts!r} (no retries: retry=None)")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s, got "
                             f"{self.initial_backoff_s!r} and {self.max_backoff_s!r}")
        if not self.multiplier > 0:
            raise ValueError(f"multiplier must be > 0, got {self.multiplier!r}")
        if not self.codes:
            raise ValueError("codes must name at least one status code")

    def as_service_config(self) -> dict[str, Any]:
        return {"maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": list(self.codes)}


def service_config(retry: RetryPolicy | None, load_balancing: str | None = "round_robin",
                   health_service: str | None = "") -> str:
    """The channel's service config JSON: `retry` for every method of every service; with a
    balancer, each address watched on grpc.health.v1 (`health_service`; None: not watched), so
    a replica that starts draining (NOT_SERVING) gets no more calls."""
    config: dict[str, Any] = {}
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
        if health_service is not None:
            config["healthCheckConfig"] = {"serviceName": health_service}
    if retry is not None:
        config["methodConfig"] = [{"name": [{}], "retryPolicy": retry.as_service_config()}]
    return json.dumps(config)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, retry: RetryPolicy | None = None,
                    load_balancing: str | None = None,
                    extra: Sequence[ChannelOption] = ()) -> list[ChannelOption]:
    """Message limits, the service config when there is one, and `extra`, which wins over
    both. No retry and no balancing, as the load generator wants: it measures refusals rather
    than hiding them."""
    options: list[ChannelOption] = [("grpc.max_receive_message_length", max_message_bytes),
                                    ("grpc.max_send_message_length", max_message_bytes)]
    if retry is not None or load_balancing is not None:
        options.append(("grpc.service_config", service_config(retry, load_balancing)))
        # gRPC's service config is not fetched from DNS here (TXT records): ours is the one.
        options.append(("grpc.service_config_disable_resolution", 1))
    if retry is not None:
        # A request larger than this buffer is not retried; gRPC's default is 256 KiB.
        options.append(("grpc.per_rpc_retry_buffer_size", max_message_bytes))
    # gRPC reads the first of repeated options: one of each, `extra`'s value where it has one.
    return list({**dict(options), **dict(extra)}.items())


def resolve_target(target: Target) -> str:
    """A gRPC target for one address or a list of them. A list becomes an `ipv4:`/`ipv6:` target
    (gRPC balances over it); its addresses must be IP literals of one family with ports."""
    if isinstance(target, str):
        scheme = target.split("://", 1)[0].lower() if "://" in target else ""
        if scheme in ("http", "https", "grpc", "grpcs"):
            netloc = target.split("://", 1)[1].split("/")[0]
            host, sep, port = netloc.rpartition(":")
            if not sep:
                host, port = netloc, ""
            suggested = f"{host or '127.0.0.1'}:{50051 if port in ('', '8000') else port}"
            raise ValueError(f"target {target!r} is a URL; the target takes host:port of the gRPC "
                             f"port (default 50051), e.g. {suggested}"
                             f"{' with TLS' if scheme in ('https', 'grpcs') else ''}; the REST "
                             "port (--http-port, default 8000) is for curl and HTTP clients")
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("target: an empty list of addresses")
    families = {_family(address) for address in addresses}
    if len(families) != 1:
        raise ValueError(f"target: mix of IPv4 and IPv6 addresses in {addresses}")
    return f"{families.pop()}:{','.join(addresses)}"


def _family(address: str) -> str:
    host, sep, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if not sep or not port.isdigit() or ip is None:
        raise ValueError(f"target: {address!r} is not IP:PORT ([IPv6]:PORT); for host names use "
                         "one dns:///NAME:PORT target, which resolves to every address")
    return f"ipv{ip.version}"


class ClientBase:
    """What the blocking and the asyncio client share: the target, the default deadline, the
    security, the channel and its stub, the metadata cache. A subclass says only how its
    channel opens (`_open_channel`), since a grpc.aio channel is another type."""

    def __init__(self, target: Target = DEFAULT_TARGET, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, tls: bool = False,
                 tls_ca: Pem | None = None, tls_cert: Pem | None = None,
                 tls_key: Pem | None = None, token: str | None = None,
                 retry: RetryPolicy | None = RetryPolicy(),
                 load_balancing: str | None = "round_robin",
                 options: Sequence[ChannelOption] = ()) -> None:
        """`target`: host:port, a dns:/// name (a headless Service) or a list of IP:PORT;
        `tls_ca`/`tls_cert`/`tls_key`: PEM paths or bytes (any of them, or tls=True: TLS;
        cert + key: mutual TLS); `token`: sent as `authorization: Bearer <token>`;
        `options`: more gRPC channel options, which win over the client's own."""
        self.target = resolve_target(target)
        self.timeout = timeout  # default per-call deadline in seconds; None: no deadline
        self._security = Security.build(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                                        tls_key=tls_key, token=token)
        self._channel = self._open_channel(
            self._security, channel_options(max_message_bytes, retry, load_balancing, options))
        self._stub = pb_grpc.EnsembleServiceStub(self._channel)
        self._models: dict[tuple[str, int], ModelInfo] = {}

    def _open_channel(self, security: Security, options: list[ChannelOption]) -> Any:
        raise NotImplementedError
