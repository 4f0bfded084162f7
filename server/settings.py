"""The server's settings: one flat, typed list of every knob, read from flags, environment and a file.

`ServerSettings` is the one definition: the CLI's flags are made from its fields (`--max-batch-size`
for `max_batch_size`), pydantic-settings reads the `SNAPSERVE_*` variables, and `--config` names a
YAML or TOML file with the same keys. Precedence: flags > environment > file > defaults, all
validated once, at start-up, with messages that name the key and where it can be set. The
defaults are the component configs' own (BatcherConfig, RuntimeConfig, ...), so they are written
once; `to_server_config` then builds the frozen ServerConfig the server runs with, whose own
checks (ports, ranges, combinations) still apply.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict

from snapserve.server.api.connections import ConnectionConfig
from snapserve.server.api.intake import IntakeConfig
from snapserve.server.api.security import SecurityConfig
from snapserve.server.config import ServerConfig
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.runtime import RuntimeConfig
from snapserve.server.errors import ConfigError
from snapserve.server.observability.metrics_endpoint import MetricsEndpointConfig
from snapserve.server.models.policy import RepositoryConfig

__all__ = ["ENV_PREFIX", "ServerSettings", "env_name", "flag_name", "load_settings", "read_config_file"]

ENV_PREFIX = "SNAPSERVE_"

_S = ServerConfig.__dataclass_fields__
_B, _R, _P = BatcherConfig(), RuntimeConfig(), RepositoryConfig()
_I, _M, _C = IntakeConfig(), MetricsEndpointConfig(), ConnectionConfig()


def _words(value: Any) -> Any:
    """'digits=2 tiny=1,3' (a variable, a file's string, or each flag) -> ['digits=2', 'tiny=1,3']."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [word for item in value for word in (item.split() if isinstance(item, str) else [item])]
    return value


def _auto(value: Any) -> Any:
    """'auto' -> 0 (decide at load); anything else as given."""
    return 0 if isinstance(value, str) and value.strip().lower() == "auto" else value


def _sizes(value: Any) -> Any:
    """'1,2,4' -> [1, 2, 4]; a list stays a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ServerSettings(BaseSettings):
    """Every setting of `ensemble-server`. A field's description is its flag's help."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True,
                                      env_ignore_empty=True, validate_default=True)

    model_repository: Path = Field(description="folder of <model>/<version>/ as the trainer writes them")
    host: str = Field(_S["host"].default, description="address to bind")
    port: int = Field(_S["port"].default, description="gRPC port; 0 picks a free one")
    http_port: int = Field(_S["http_port"].default,
                           description="serve the KServe v2 REST API (JSON, and Triton's binary "
                                       "tensors) on this port of host, with the same TLS and "
                                       "tokens as gRPC; 0 turns it off")
    device: Literal["auto", "cpu", "cuda"] = Field(_R.device,
                                                   description="auto: CUDA when available, else CPU")
    intra_op_threads: int = Field("auto",
                                  description="ONNX Runtime threads per session; auto (or 0): "
                                              "chosen at load from the usable cores and a lone "
                                              "example's time on 1 and on every core")
    instances: int = Field("auto",
                           description="runtime instances per model version: batches computed "
                                       "at once; auto (or 0): one per usable core when the "
                                       "model's compute outweighs request handling, else 1")
    graph: Literal["auto", "fused", "members"] = Field(
        _R.graph, description="auto: time the fused ensemble.onnx and the members at load, keep "
                              "the faster")
    precision: Literal["fp32", "fp16"] = Field(
        _R.precision, description="fp16: the version's FP16 fused graph, where it has one (for GPUs)")
    cuda_graph_batch_sizes: Annotated[tuple[int, ...], NoDecode] = Field(
        (), description="CUDA: capture the fused graph as CUDA graphs for these batch sizes, "
                        "e.g. 1,2,4,8,16,32 (empty: off)")
    max_batch_size: int = Field(_B.max_batch_size,
                                description="examples per inference call, and per request")
    max_queue_delay_ms: float = Field(_B.max_queue_delay_s * 1000,
                                      description="longest wait for a batch to fill")
    max_queue_size: int = Field(_B.max_queue_size,
                                description="requests waiting per model before RESOURCE_EXHAUSTED")
    adaptive_wait: bool = Field(_B.adaptive_wait,
                                description="when none is computing, send a batch once it holds the "
                                            "company to expect (as many requests as there were "
                                            "callers lately); off: always wait up to the queue "
                                            "delay for a full batch")
    max_stream_in_flight: int = Field(_S["max_stream_in_flight"].default,
                                      description="requests of one stream computed ahead")
    max_stream_share: float = Field(_S["max_stream_share"].default,
                                    description="share of a model's queue one stream may hold")
    max_message_mb: float = Field(_S["max_message_bytes"].default / 2**20,
                                  description="largest gRPC message in MiB")
    grace_s: float = Field(_S["grace_s"].default,
                           description="on SIGTERM/SIGINT, time for in-flight requests")
    drain_window_s: float = Field(_S["drain_window_s"].default,
                                  description="on SIGTERM/SIGINT, report NOT_SERVING but keep "
                                              "answering new requests this long before refusing "
                                              "them; 0: refuse at once")
    max_concurrent_streams: int = Field(_S["max_concurrent_streams"].default,
                                        description="concurrent calls per client connection")
    max_pending_calls: int = Field(_I.max_pending_calls,
                                   description="calls received but not yet queued, server-wide, "
                                               "before RESOURCE_EXHAUSTED")
    max_pending_mb: float = Field(_I.max_pending_bytes / 2**20,
                                  description="MiB those calls may hold, server-wide")
    decode_threads: int = Field(_I.decode_threads,
                                description="threads that parse and decode large requests")
    max_connection_idle_s: float = Field(_C.max_idle_s,
                                         description="close a client connection without a call "
                                                     "this long")
    max_connection_age_s: float = Field(_C.max_age_s,
                                        description="ask every connection to go away after this "
                                                    "long, so clients spread over new instances; "
                                                    "0: never")
    keepalive_s: float = Field(_C.keepalive_s,
                               description="ping idle connections this often to find dead peers")
    allow_nonfinite: bool = Field(_R.allow_nonfinite,
                                  description="pass NaN/Inf inputs to the model instead of refusing them")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve TLS (with tls_key)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: require client "
                                                         "certificates it signed (mutual TLS)")
    auth_token_file: Path | None = Field(None, description="bearer tokens, one per line: calls "
                                                           "need 'authorization: Bearer <token>' "
                                                           "(health and reflection stay open)")
    metrics_port: int | None = Field(None, description="serve Prometheus metrics on "
                                                       "http://METRICS_HOST:PORT/metrics; 0 picks a "
                                                       "free port (default: not served); with "
                                                       "workers, one endpoint for all of them")
    metrics_host: str = Field(_M.host, description="address the metrics endpoint binds, apart from "
                                                   "host: metrics show what is served and how busy")
    metrics_timeout_s: float = Field(_M.timeout_s, description="seconds a metrics connection may "
                                                               "take to send its request and to "
                                                               "read the answer")
    metrics_max_connections: int = Field(_M.max_connections, description="metrics connections open "
                                                                         "at once; more are closed "
                                                                         "as they arrive")
    version_policy: Literal["latest", "all", "specific"] = Field(
        _P.version_policy, description="latest: the newest loadable version of each model; all: "
                                       "every version; specific: only the pinned versions")
    pin: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="MODEL=V[,V]: versions to serve with version_policy specific; a flag per "
                        "model, or separated by spaces ('digits=2 tiny=1,3')")
    poll_interval: float = Field(_P.poll_interval_s,
                                 description="seconds between scans of the repository for new or "
                                             "removed versions, switched without downtime; 0: never")
    allow_repository_control: bool = Field(_P.allow_repository_control,
                                           description="allow repository load/unload (KServe v2) "
                                                       "from clients")
    workers: int = Field(1, ge=1, description="server processes sharing the gRPC and REST ports "
                                               "(SO_REUSEPORT), each with its own sessions; "
                                               "metrics_port serves their sum "
                                               "(docs/performance.md)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one object per line with request_id, model, version, status, "
                            "latency_ms")
    log_requests: bool = Field(False, description="an access line for every answered request, not "
                                                  "only failed ones")

    _split_pins = field_validator("pin", mode="before")(_words)
    _auto_counts = field_validator("instances", "intra_op_threads", mode="before")(_auto)
    _split_sizes = field_validator("cuda_graph_batch_sizes", mode="before")(_sizes)

    def to_server_config(self) -> ServerConfig:
        """The ServerConfig these settings describe (its own checks raise ConfigError)."""
        return ServerConfig(
            model_repository=self.model_repository, host=self.host, port=self.port,
            batcher=BatcherConfig(max_batch_size=self.max_batch_size,
                                  max_queue_delay_s=self.max_queue_delay_ms / 1000,
                                  max_queue_size=self.max_queue_size,
                                  adaptive_wait=self.adaptive_wait),
            runtime=RuntimeConfig(device=self.device, intra_op_threads=self.intra_op_threads,
                                  allow_nonfinite=self.allow_nonfinite, instances=self.instances,
                                  graph=self.graph, precision=self.precision,
                                  cuda_graph_batch_sizes=self.cuda_graph_batch_sizes),
            grace_s=self.grace_s, drain_window_s=self.drain_window_s,
            max_message_bytes=int(self.max_message_mb * 2**20),
            max_stream_in_flight=self.max_stream_in_flight,
            max_stream_share=self.max_stream_share,
            max_concurrent_streams=self.max_concurrent_streams,
            repository=RepositoryConfig(
                version_policy=self.version_policy, pinned=parse_pins(self.pin),
                poll_interval_s=self.poll_interval,
                allow_repository_control=self.allow_repository_control),
            metrics_port=self.metrics_port,
            connections=ConnectionConfig(max_idle_s=self.max_connection_idle_s,
                                         max_age_s=self.max_connection_age_s,
                                         keepalive_s=self.keepalive_s),
            http_port=self.http_port or None,  # 0: off
            metrics_endpoint=MetricsEndpointConfig(host=self.metrics_host,
                                                   timeout_s=self.metrics_timeout_s,
                                                   max_connections=self.metrics_max_connections),
            intake=IntakeConfig(max_pending_calls=self.max_pending_calls,
                                max_pending_bytes=int(self.max_pending_mb * 2**20),
                                decode_threads=self.decode_threads),
            security=SecurityConfig(tls_cert=self.tls_cert, tls_key=self.tls_key,
                                    tls_client_ca=self.tls_client_ca,
                                    auth_token_file=self.auth_token_file))


def parse_pins(pins: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """('digits=2', 'tiny=1,3', 'digits=4') -> {'digits': (2, 4), 'tiny': (1, 3)}."""
    merged: dict[str, tuple[int, ...]] = {}
    for item in pins:
        name, sep, versions = item.partition("=")
        try:
            numbers = tuple(int(v) for v in versions.split(","))
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(f"pin {item!r} is not MODEL=VERSION[,VERSION...]")
        merged[name] = merged.get(name, ()) + numbers
    return merged


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a YAML (.yaml, .yml) or TOML (.toml) file: a mapping of setting keys."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else yaml.safe_load(raw)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                          f"{exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    # A file may spell keys as the flags do (max-batch-size) or as the fields (max_batch_size).
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _where(key: str) -> str:
    if key not in ServerSettings.model_fields:
        return f"{key!r} (no such setting)"
    return f"{key} ({flag_name(key)}, {env_name(key)} or '{key}' in the config file)"


def _describe(error: ValidationError, config_file: Path | None) -> str:
    lines = []
    for item in error.errors():
        key = str(item["loc"][0]) if item["loc"] else "?"
        if item["type"] == "extra_forbidden":
            lines.append(f"{key!r} in {config_file or 'the settings'} is not a setting; expected "
                         f"one of: {', '.join(ServerSettings.model_fields)}")
        elif item["type"] == "missing":
            lines.append(f"{_where(key)} is required")
        else:
            lines.append(f"{_where(key)}: {item['msg']}, got {item.get('input')!r}")
    return "; ".join(lines)


def load_settings(flags: Mapping[str, Any], config_file: Path | None = None,
                  environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Settings from the flags given, then the environment (`environ`, default os.environ),
    then `config_file`, then the defaults. ConfigError names every bad key."""
    file_values = read_config_file(config_file) if config_file is not None else {}

    class _Sources(ServerSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,  # type: ignore[override]
                                       dotenv_settings, file_secret_settings):
            if environ is not None:
                env_settings = _MappingEnvSource(settings_cls, environ)
            return init_settings, env_settings, InitSettingsSource(settings_cls, file_values)

    try:
        settings = _Sources(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    return ServerSettings.model_construct(**settings.model_dump())


class _MappingEnvSource(InitSettingsSource):
    """The SNAPSERVE_* entries of a given mapping instead of os.environ (tests, --print-config)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        values = {}
        for key in settings_cls.model_fields:
            raw = environ.get(env_name(key), "")
            if raw:  # empty: as if unset, as for the real environment
                values[key] = raw
        super().__init__(settings_cls, values)
