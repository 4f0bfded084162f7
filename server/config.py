"""The settings model: one tree of frozen pydantic models, `ServerConfig` at its root.

One model per component (BatcherConfig, RuntimeConfig, RepositoryConfig, IntakeConfig,
SecurityConfig, ConnectionConfig, MetricsEndpointConfig), each field with its default, bounds and
description written once; the components take their model as it is. The flags, SNAPSERVE_*
variables and `--config` file (server/settings.py) and each model's model-settings.yaml
(server/models/settings.py) are made from these fields (`setting(...)` says how a field is spelt
there) and validated by them. A bad value raises ConfigError naming the key.

Imports only pydantic: the batcher imports it, and must stay light.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Mapping, Self

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator,
                      TypeAdapter, ValidationError, WrapValidator, field_validator, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from snapserve.server.errors import ConfigError

__all__ = ["DEFAULT_HTTP_PORT", "DEFAULT_METRICS_PORT", "DEVICES", "GRAPHS", "MAX_MODEL_NAME", "MODEL_NAME", "PRECISIONS",
           "VERSION_POLICIES", "BatcherConfig", "ConfigModel", "ConnectionConfig", "FlatKey",
           "HttpLimits", "IntakeConfig", "MetricsEndpointConfig", "RepositoryConfig", "RuntimeConfig",
           "SecurityConfig", "ServerConfig", "default_plan_cache", "error_text", "flat_keys",
           "format_address", "OffOrPort", "did_you_mean", "parse_pins", "takes_auto"]

DEVICES = ("auto", "cpu", "cuda")
GRAPHS = ("auto", "fused", "members")
PRECISIONS = ("fp32", "fp16")
VERSION_POLICIES = ("latest", "all", "specific")
GRPC_FRONTENDS = ("auto", "aio", "cpp")
# A model's folder name, as the trainer writes it; one path component on common file systems.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_MODEL_NAME = 255
# Triton's HTTP port (its gRPC one is 8001; MLServer's are 8080/8081): clear of the gRPC default
# 50051 and of the metrics port (8002).
DEFAULT_HTTP_PORT = 8000
# Triton's metrics port, as its users expect; on loopback unless metrics_host says otherwise.
DEFAULT_METRICS_PORT = 8002

_DAY_S = 86400.0
_MiB = 2**20


def format_address(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- how a field is a setting -----------------------------------------------------------------

def setting(default: Any, description: str, *, key: str | None = None, unit: float = 1.0,
            per_model: bool = False, off: Any = None, flat: Any = None, flat_default: Any = None,
            **constraints: Any) -> Any:
    """A field that is also a flat setting: a flag, a SNAPSERVE_* variable and a settings-file key.

    key: its name there, where it differs from the field's; unit: the field's value per unit of
    the flat one (1e-3 for a field in s set in ms); off: the flat value that means None; flat and
    flat_default: the flat type and default, where the field's do not serve; per_model: a model's
    model-settings.yaml may set it too.
    """
    extra = {"setting": {"key": key, "unit": unit, "per_model": per_model, "off": off,
                         "flat": flat, "flat_default": flat_default}}
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def count(default: int, description: str, low: int = 1, high: int = 65536, **options: Any) -> Any:
    """An integer setting in [low, high]; strict: true, 1.5 and '8' are refused."""
    return setting(default, description, strict=True, ge=low, le=high, **options)


def seconds(default: float, description: str, low: float = 0.0, high: float = _DAY_S,
            **options: Any) -> Any:
    """A finite duration in [low, high] seconds (inf and NaN refused)."""
    return setting(default, description, strict=True, allow_inf_nan=False, ge=low, le=high, **options)


def _auto(value: Any) -> Any:
    """'auto' -> 0 (decided at load); anything else as given."""
    return 0 if isinstance(value, str) and value.strip().lower() == "auto" else value


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'max_batch_size'?)' for a near miss among `choices` (a key's typo), else ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def takes_auto(field: FieldInfo) -> bool:
    """Whether the field reads 'auto' as 0 (a value decided at load), so 0 is shown as `auto`."""
    return any(isinstance(m, BeforeValidator) and m.func is _auto for m in field.metadata)


def _sizes(value: Any) -> Any:
    """'1,2,4' -> ['1', '2', '4']; a list stays a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _words(value: Any) -> Any:
    """'digits=2 tiny=1,3' (a variable, a file's string, or each flag) -> ['digits=2', 'tiny=1,3']."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [word for item in value for word in (item.split() if isinstance(item, str) else [item])]
    return value


def parse_pins(pins: Any) -> dict[str, tuple[int, ...]]:
    """('digits=2', 'tiny=1,3', 'digits=4') -> {'digits': (2, 4), 'tiny': (1, 3)}."""
    merged: dict[str, tuple[int, ...]] = {}
    for item in _words(pins):
        name, sep, versions = str(item).partition("=")
        try:
            numbers = tuple(int(v) for v in versions.split(","))
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(f"pin {item!r} is not MODEL=VERSION[,VERSION...]")
        merged[name] = merged.get(name, ()) + numbers
    return merged


def _pins(value: Any) -> Any:
    """`pinned` as a mapping, or as pins ('digits=2 tiny=1,3', the flag's spelling)."""
    return value if isinstance(value, Mapping) else parse_pins(value)


# ---- the base model and its messages ----------------------------------------------------------

class ConfigModel(BaseModel):
    """A frozen component config: unknown keys refused, every bad value a ConfigError naming it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe(exc, type(self))) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated as a new config is (`model_copy` does not validate)."""
        if not changes:
            return self
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields},
                             **changes})


def field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    """The field an error's location points at, through nested configs; None if there is none."""
    field = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return field
        field = model.model_fields[part]
        model = field.annotation  # type: ignore[assignment]
    return field


def _noun(field: FieldInfo | None, unit: float) -> str:
    kinds = (field.annotation, *typing.get_args(field.annotation)) if field is not None else ()
    integral = unit == 1 and any(k is int or typing.get_args(k)[:1] == (int,) for k in kinds)
    return "an integer" if integral else "a number"


def _number(value: Any, unit: float) -> str:
    value = value / unit if unit != 1 else value
    return f"{value:g}" if isinstance(value, float) else str(value)


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def error_text(item: ErrorDetails, field: FieldInfo | None = None, unit: float = 1.0) -> str:
    """One validation error as '<what it must be>, got <value>'; a validator's own message as it
    is. `unit` shows bounds in the unit the key is set in (ms for a field in s)."""
    kind, ctx = item["type"], item.get("ctx") or {}
    got = f", got {item.get('input')!r}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", item["msg"]))
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        return f"must be {_noun(field, unit)} {sign} {_number(ctx[name], unit)}{got}"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind.startswith("int_"):
        return f"must be an integer{got}"
    if kind.startswith("float_"):
        return f"must be a number{got}"
    if kind.startswith("bool_"):
        return f"must be true or false{got}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}{got}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a setting"
    return f"{item['msg']}{got}"


def dotted(loc: tuple[Any, ...]) -> str:
    """('repository', 'pinned', 'digits') -> 'repository.pinned.digits'."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def keyed(key: str, text: str) -> str:
    """'key text', unless the text (a validator's message) already starts with the key."""
    leaf = key.rsplit(".", 1)[-1]
    return text if not key or text.startswith(leaf) else f"{key} {text}"


def describe(error: ValidationError, model: type[BaseModel]) -> str:
    """Every error of `error`, each naming its key, joined with '; '."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        text = error_text(item, field_at(model, loc))
        nested = isinstance((item.get("ctx") or {}).get("error"), ConfigError)
        lines.append(f"{dotted(loc)}.{text}" if nested and loc else keyed(dotted(loc), text))
    return "; ".join(lines)


# ---- the component models ---------------------------------------------------------------------

class BatcherConfig(ConfigModel):
    """The dynamic batcher (server/engine/batcher.py)."""

    # Larger amortises per-call overhead, costs latency and memory.
    max_batch_size: int = count(32, "examples per inference call, and per request",
                                high=1 << 20, per_model=True)
    # Latency traded for batch size.
    max_queue_delay_s: float = seconds(0.002, "longest wait for a batch to fill", high=60.0,
                                       key="max_queue_delay_ms", unit=1e-3, per_model=True)
    # Beyond it callers get QueueFull at once instead of a slow answer.
    max_queue_size: int = count(256, "requests waiting per model before RESOURCE_EXHAUSTED",
                                high=1 << 20, per_model=True)
    # Send once the expected company is queued (the batcher's docstring); off: always wait up to
    # max_queue_delay_s for a full batch, as a plain batcher does.
    adaptive_wait: bool = setting(True, "send a batch once it holds the company to expect (as "
                                        "many requests as there were callers lately, shared "
                                        "among the instances); off: always wait up to the queue "
                                        "delay for a full batch", strict=True)
    # One per runtime instance (set at load, not a setting). More uses more cores on small models.
    max_concurrent_batches: int = Field(1, strict=True, ge=1, le=4096)


Threads = Annotated[int, BeforeValidator(_auto)]
BatchSizes = Annotated[tuple[int, ...], BeforeValidator(_sizes)]


def default_plan_cache() -> Path:
    """Where `plan_cache: auto` keeps plans: $XDG_CACHE_HOME/snapserve/plans, else
    ~/.cache/snapserve/plans (the XDG base directory convention, as pip and torch follow it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "snapserve", "plans")


def _off(value: Any) -> Any:
    """'off' (or 'none') -> None: a port not served, a cache not kept; anything else as given."""
    return None if isinstance(value, str) and value.strip().lower() in ("off", "none") else value


def _plan_cache(value: Any) -> Any:
    """'auto' -> default_plan_cache(); 'off' (or 'none') -> None; a path as given."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return default_plan_cache()
    return _off(value)


PlanCache = Annotated[Path | None, BeforeValidator(_plan_cache)]


class RuntimeConfig(ConfigModel):
    """ONNX Runtime sessions of one model version (server/engine/runtime.py)."""

    # cuda: refuse to start without it.
    device: Literal[DEVICES] = setting("auto", "auto: CUDA when available, else CPU")
    # 0 (auto): decided at load from the cores the process may use (engine/cores.py).
    intra_op_threads: Threads = count(0, "ONNX Runtime threads per session; auto (or 0): chosen at "
                                         "load from the usable cores and a lone example's time on "
                                         "1 and on every core", low=0, high=1024, per_model=True)
    # Each instance costs the model's memory again. 0 (auto): decided at load (engine/cores.py).
    instances: Threads = count(0, "runtime instances per model version: batches computed at once; "
                                  "auto (or 0): one per usable core when the model's compute "
                                  "outweighs request handling, else 1", low=0, high=1024,
                               per_model=True)
    graph: Literal[GRAPHS] = setting("auto", "auto: time the fused ensemble.onnx and the members "
                                             "at load, keep the faster", per_model=True)
    # Checked for accuracy at export.
    precision: Literal[PRECISIONS] = setting("fp32", "fp16: the version's FP16 fused graph, where "
                                                     "it has one (for GPUs)", per_model=True)
    # Inputs padded up to the next size; saves kernel launch time on small batches.
    cuda_graph_batch_sizes: BatchSizes = setting(
        (), "CUDA: capture the fused graph as CUDA graphs for these batch sizes, e.g. "
            "1,2,4,8,16,32 (empty: off)")
    # Off only to measure what it buys: without it each member's run copies the batch to the
    # device itself and its outputs back through a staging copy. CUDA graphs need it.
    io_binding: bool = setting(True, "CUDA: copy a batch to the device once for every member and "
                                     "write outputs straight to host memory (IO binding); off: "
                                     "plain runs, for comparison", strict=True)
    # Needs the version's calibration (manifest `adaptive`, written by the trainer): without it
    # every member runs. Serves the members graph (the fused graph runs every member).
    adaptive_members: bool = setting(False, "adaptive member evaluation: run members one at a "
                                            "time in the calibrated order and answer a row once "
                                            "its running mean passes the version's threshold",
                                     per_model=True, strict=True)
    # NaN/Inf come back as NaN (or quietly wrong) scores, so they are refused by default
    # (models.inputs.conform_input).
    allow_nonfinite: bool = setting(False, "pass NaN/Inf inputs to the model instead of refusing "
                                           "them", strict=True)
    # Read and written by models/plans.py. Off in Python (a RuntimeConfig made in code measures
    # at every load, as tests of the measurement need); `auto` for the command line, its
    # variable and the settings file, where a server's repeated starts want one plan.
    plan_cache: PlanCache = setting(
        None, "folder of measured plans (graph, instances, threads), one file per model version, "
              "machine and settings, reused at later starts so the same model gets the same plan; "
              "auto: $XDG_CACHE_HOME/snapserve/plans (~/.cache/...); off: measure at every load",
        off="off", flat=str, flat_default="auto")
    remeasure_plans: bool = setting(False, "measure each version's plan at load even where the "
                                           "plan cache holds one, and store the new one there",
                                    strict=True)
    device_id: int = Field(0, strict=True, ge=0, le=1024)  # which GPU, with cuda
    # Cores the auto settings plan for; 0: every core the process may use. A worker of
    # --workers N gets its share.
    cores: int = Field(0, strict=True, ge=0, le=1 << 16)

    @field_validator("cuda_graph_batch_sizes")
    @classmethod
    def _increasing(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 or b > 1 << 20 for b in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"cuda_graph_batch_sizes must be increasing integers in [1, {1 << 20}], "
                             f"got {sizes!r}")
        return sizes

    @model_validator(mode="after")
    def _graphs_need_binding(self) -> Self:
        if self.cuda_graph_batch_sizes and not self.io_binding:
            raise ValueError("cuda_graph_batch_sizes needs io_binding: a CUDA graph replays the "
                             "device buffers bound at capture")
        return self


class RepositoryConfig(ConfigModel):
    """Which versions are served, polling for new ones, explicit control (server/models/policy.py)."""

    # specific: models without a pin are not served.
    version_policy: Literal[VERSION_POLICIES] = setting(
        "latest", "latest: the newest loadable version of each model; all: every version; "
                  "specific: only the pinned versions", per_model=True)
    pinned: Annotated[dict[str, tuple[int, ...]], BeforeValidator(_pins)] = setting(
        {}, "MODEL=V[,V]: versions to serve with version_policy specific; a flag per model, or "
            "separated by spaces ('digits=2 tiny=1,3')",
        key="pin", flat=Annotated[tuple[str, ...], BeforeValidator(_words)], flat_default=())
    # A scan lists folders and reads no model file unless something changed: a few seconds costs
    # little. 0: read at start-up and on RepositoryModelLoad only.
    poll_interval_s: float = seconds(0.0, "seconds between scans of the repository for new or "
                                          "removed versions, switched without downtime; 0: never",
                                     key="poll_interval")
    # Off by default: they let any client that reaches the port change what is served.
    allow_repository_control: bool = setting(False, "allow repository load/unload (KServe v2) "
                                                    "from clients", strict=True)

    @field_validator("pinned")
    @classmethod
    def _pinned_names(cls, pinned: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        checked = {}
        for name, versions in pinned.items():
            if len(name) > MAX_MODEL_NAME or not MODEL_NAME.fullmatch(name):
                raise ValueError(f"pinned {name!r} is not a model name: expected letters, digits, "
                                 f"'_', '.', '-', starting with a letter or digit, at most "
                                 f"{MAX_MODEL_NAME} characters")
            versions = tuple(sorted(set(versions)))
            if not versions or versions[0] < 1:
                raise ValueError(f"pinned[{name!r}] must list versions >= 1, got {versions!r}")
            checked[name] = versions
        return checked

    @model_validator(mode="after")
    def _policy_and_pins(self) -> Self:
        if self.pinned and self.version_policy != "specific":
            raise ValueError(f"pinned versions need version_policy 'specific', not "
                             f"{self.version_policy!r}")
        if self.version_policy == "specific" and not self.pinned:
            raise ValueError("version_policy 'specific' needs pinned versions (--pin MODEL=V)")
        return self


class IntakeConfig(ConfigModel):
    """Calls received but not yet queued, and the threads that decode them (server/api/intake.py)."""

    max_pending_calls: int = count(1024, "calls received but not yet queued, server-wide, before "
                                         "RESOURCE_EXHAUSTED", high=1 << 20)
    # 4 messages of the default largest size (64 MiB) at once.
    max_pending_bytes: int = count(256 * _MiB, "MiB those calls may hold, server-wide", high=1 << 40,
                                   key="max_pending_mb", unit=_MiB, flat=float)
    # More decode in parallel; fewer bound the CPU a flood of large requests takes from inference.
    decode_threads: int = count(2, "threads that parse and decode large requests", high=256)
    # Half the default queue (256): streams alone cannot fill a model's queue, so unary calls
    # still get in; a stream with no room reads nothing more (HTTP/2 flow control holds the rest).
    max_stream_requests: int = count(128, "streamed requests read and not yet answered, server-wide; "
                                          "a stream reads its next request only when there is "
                                          "room", high=1 << 20)


class SecurityConfig(ConfigModel):
    """TLS / mutual TLS and bearer tokens (server/api/security.py); all off by default."""

    tls_cert: Path | None = setting(None, "PEM certificate chain: serve TLS (with tls_key)")
    tls_key: Path | None = setting(None, "PEM private key of tls_cert")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle: require client certificates it "
                                               "signed (mutual TLS)")
    auth_token_file: Path | None = setting(None, "bearer tokens, one per line: calls need "
                                                 "'authorization: Bearer <token>' (health and "
                                                 "reflection stay open)")

    @field_validator("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("tls_cert", "tls_key", "tls_client_ca", "auth_token_file")
    @classmethod
    def _readable(cls, path: Path | None, info: Any) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{info.field_name} {str(path)!r} is not a readable file")
        return path

    @model_validator(mode="after")
    def _pairs(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (TLS) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def auth(self) -> bool:
        return self.auth_token_file is not None


class ConnectionConfig(ConfigModel):
    """Limits on client connections, as gRPC channel options (`grpc_options`).

    gRPC's defaults keep a connection forever, idle or not, and let a client ping as often as it
    likes: a client that opens connections and walks away holds them, and a long-lived
    connection never moves to a new instance behind a balancer.
    """

    # Closed with GOAWAY; long enough not to churn a client that calls every few seconds.
    max_idle_s: float = seconds(300.0, "close a client connection without a call this long",
                                key="max_connection_idle_s")
    # Plus max_age_grace_s for its calls to end, so clients spread again over new instances.
    max_age_s: float = seconds(1800.0, "ask every connection to go away after this long, so "
                                       "clients spread over new instances; 0: never",
                               key="max_connection_age_s")
    max_age_grace_s: float = Field(30.0, strict=True, allow_inf_nan=False, ge=0, le=_DAY_S)
    # Dropped when a ping is not answered within keepalive_timeout_s.
    keepalive_s: float = seconds(60.0, "ping idle connections this often to find dead peers")
    keepalive_timeout_s: float = Field(20.0, strict=True, allow_inf_nan=False, ge=0, le=_DAY_S)
    # Clients pinging more often (without calls) are told to go away after a few strikes: pings
    # cost the server work too.
    min_client_ping_s: float = Field(10.0, strict=True, allow_inf_nan=False, ge=0, le=_DAY_S)
    # gRPC's adaptive window (BDP probing) grows a call's window to megabytes, and the bytes a
    # client sends into it are held by the server whether or not it reads them: a fixed window
    # bounds what a call that is not being read (a stream with no room) holds, per call.
    flow_window_kib: int = count(256, "HTTP/2 flow-control window of each call in KiB: what a "
                                      "client may send ahead of what the server reads",
                                 low=64, high=65536)

    # A connection must finish its TLS handshake and send HTTP/2's preface and SETTINGS within
    # this, or it is closed: a half-sent preface otherwise holds its file descriptor for good.
    handshake_timeout_s: float = seconds(10.0, "close a gRPC connection that has not finished "
                                               "its handshake (TLS, HTTP/2 preface) this long",
                                         low=0.1, high=3600.0, key="grpc_handshake_timeout_s")
    # Beyond it, new connections are closed as they arrive; with the REST and metrics caps it
    # keeps the process under its open-file limit (server/listeners.py `check_file_limit`).
    max_connections: int = count(2048, "gRPC client connections open at once; more are closed as "
                                       "they arrive", key="grpc_max_connections", high=1 << 20)

    def grpc_options(self) -> list[tuple[str, int]]:
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        options = [("grpc.max_connection_idle_ms", ms(self.max_idle_s)),
                   ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout_s)),
                   ("grpc.max_allowed_incoming_connections", self.max_connections),
                   ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
                   ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
                   ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
                   ("grpc.http2.max_ping_strikes", 2),
                   ("grpc.http2.bdp_probe", 0),
                   ("grpc.http2.lookahead_bytes", self.flow_window_kib * 1024)]
        if self.max_age_s:
            options += [("grpc.max_connection_age_ms", ms(self.max_age_s)),
                        ("grpc.max_connection_age_grace_ms", ms(self.max_age_grace_s))]
        return options


class MetricsEndpointConfig(ConfigModel):
    """The /metrics endpoint's own host, timeouts and connection bound."""

    # Metrics show what is served and how busy: loopback unless asked.
    host: str = setting("127.0.0.1", "address the metrics endpoint binds, apart from host: metrics "
                                     "show what is served and how busy", key="metrics_host",
                        min_length=1)
    timeout_s: float = seconds(5.0, "seconds a metrics connection may take to send its request and "
                                    "to read the answer", low=0.001, high=3600.0,
                               key="metrics_timeout_s")
    # A scraper needs one; more are closed as they arrive.
    max_connections: int = count(16, "metrics connections open at once; more are closed as they "
                                     "arrive", key="metrics_max_connections")


class HttpLimits(ConfigModel):
    """What one REST connection may take, as nginx's client_header_timeout, client_body_timeout
    and keepalive_timeout (server/listeners.py, server/api/http.py)."""

    # From the connection's open, or the first byte of a later request, to its last header.
    header_timeout_s: float = seconds(10.0, "seconds a REST client has to send a request's "
                                            "headers", low=0.01, high=3600.0,
                                      key="http_header_timeout_s")
    # Between two reads, as nginx's: a slow link still sends a large body, a stalled one is cut.
    body_timeout_s: float = seconds(30.0, "seconds a REST body may go without a byte arriving",
                                    low=0.01, high=3600.0, key="http_body_timeout_s")
    # And on the whole body, as Apache's mod_reqtimeout MinRate: after the first
    # http_body_timeout_s it must average this rate, so a body trickled a byte at a time (never a
    # gap as long as the timeout) still ends, while a large body on a slow link goes through.
    body_min_kib_s: float = setting(16.0, "REST bodies slower than this on average (KiB/s, after "
                                          "the first http_body_timeout_s) are cut", strict=True,
                                    allow_inf_nan=False, ge=0.001, le=1e6,
                                    key="http_body_min_kib_s")
    keepalive_timeout_s: float = seconds(60.0, "close a REST connection idle between requests "
                                               "this long", low=0.01, high=3600.0,
                                         key="http_keepalive_timeout_s")
    # At the cap a new connection closes the longest-idle one (idle, or still sending headers).
    max_connections: int = count(512, "REST connections open at once", key="http_max_connections",
                                 high=1 << 20)
    # Beyond max_connections: health checks only, so probes get through busy connections too.
    reserved_connections: int = count(16, "REST connections beyond http_max_connections kept for "
                                          "the health checks", low=0, high=4096,
                                      key="http_reserved_connections")
    # gzip and deflate reach about 1000:1; tensors of real data stay far below 100:1.
    max_inflate_ratio: float = setting(100.0, "a compressed REST body may inflate to this many "
                                              "times its size (above 1 MiB)", strict=True,
                                       allow_inf_nan=False, ge=1.0, le=1e6)


Port = Annotated[int, Field(strict=True, ge=0, le=65535)]


# A port setting spelt `off` where it is not served (flags, variables, files).
OffOrPort = Annotated[int | None, BeforeValidator(_off)]


class ServerConfig(ConfigModel):
    """What `start_server` runs with. The field order is the order of `--help` and `--print-config`."""

    # <repository>/<model>/<version>/ as the trainer writes it (docs/model-repository.md).
    model_repository: Path = setting(..., "folder of <model>/<version>/ as the trainer writes them")
    # 0.0.0.0 / [::] to accept connections from other machines.
    host: str = setting("127.0.0.1", "address to bind", min_length=1)
    port: Port = setting(50051, "gRPC port; 0 picks a free one")
    # None: not served; 0: any free port (RunningServer.http_port says which). The flag's 0 turns
    # it off, as Triton users expect.
    http_port: Port | None = setting(DEFAULT_HTTP_PORT, "serve the KServe v2 REST API (JSON, and "
                                                        "Triton's binary tensors) on this port of "
                                                        "host, with the same TLS and tokens as "
                                                        "gRPC; 0 turns it off", off=0)
    # Which library serves `port` (server/app.py `grpc_frontend_for`). `aio` in Python (a
    # ServerConfig made in code serves as it always has); `auto` for the command line, its
    # variable and the settings file: the C++ front end where it is built (the images), else
    # grpc.aio, logged either way.
    grpc_frontend: Literal[GRPC_FRONTENDS] = setting(
        "aio", "which library serves the gRPC port: auto (the C++ front end where it is built, "
               "as in the images, on a port without TLS and without --cpp-grpc-port; grpc.aio "
               "otherwise), aio, or cpp (built at the first start if need be: g++, libgrpc++)",
        flat=str, flat_default="auto")
    # Off by default: outside the images it needs a C++ compiler and libgrpc++ on the machine
    # (built on first use), and a TLS port of it is not capped (docs/reliability.md).
    cpp_grpc_port: Port | None = setting(None, "also serve every gRPC method (inference, "
                                                  "streams, metadata, health, reflection) on "
                                                  "this port of host through the C++ front end, "
                                                  "with the same TLS and tokens; off: not "
                                                  "served; 0 "
                                                  "picks a free port", flat=OffOrPort)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    batcher: BatcherConfig = Field(default_factory=BatcherConfig)
    # More lets a stream fill batches by itself; bounds the memory one stream may hold.
    max_stream_in_flight: int = count(64, "requests of one stream computed ahead")
    # A stream's window is the smaller of the two, so one PredictStream cannot fill the queue.
    max_stream_share: float = setting(0.25, "share of a model's queue one stream may hold",
                                      strict=True, gt=0, le=1)
    # gRPC's own default (4 MiB) is small for images; gRPC's limit is 2 GiB.
    max_message_bytes: int = count(64 * _MiB, "largest gRPC message in MiB", low=1024,
                                   high=2**31 - 1, key="max_message_mb", unit=_MiB, flat=float)
    grace_s: float = seconds(5.0, "on SIGTERM/SIGINT, time for in-flight requests")
    # Balancers and Kubernetes endpoints keep sending for seconds after NOT_SERVING.
    drain_window_s: float = seconds(3.0, "on SIGTERM/SIGINT, report NOT_SERVING but keep answering "
                                         "new requests this long before refusing them; 0: refuse "
                                         "at once")
    # HTTP/2 streams per connection; past it gRPC refuses the stream (UNAVAILABLE, never seen by
    # the server), which the snapserve clients retry. gRPC's own default is unlimited.
    max_concurrent_streams: int = count(256, "concurrent calls per client connection")
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    connections: ConnectionConfig = Field(default_factory=ConnectionConfig)
    http: HttpLimits = Field(default_factory=HttpLimits)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    # None: not served (still counted); 0: any free port (RunningServer.metrics_port says which).
    # The process serves them on Triton's 8002 unless told `off` (a flat default: a server
    # embedded with ServerConfig(...) binds no port it was not given).
    metrics_port: Port | None = setting(None, "serve Prometheus metrics on "
                                              "http://METRICS_HOST:PORT/metrics; off: not served; "
                                              "0 picks a free port; with workers, one endpoint "
                                              "for all of them", flat=OffOrPort,
                                        flat_default=DEFAULT_METRICS_PORT)
    metrics_endpoint: MetricsEndpointConfig = Field(default_factory=MetricsEndpointConfig)
    repository: RepositoryConfig = Field(default_factory=RepositoryConfig)
    # SO_REUSEPORT: one of `--workers N` processes sharing the ports (server/process/workers.py);
    # off otherwise, so a second server on a taken port fails to start.
    reuse_port: bool = False
    # Freeze the heap once up, out of the cyclic collector's way (server/process/heap.py). Off
    # for a server embedded in a process whose own heap should stay the collector's (tests).
    freeze_heap: bool = True

    @field_validator("model_repository")
    @classmethod
    def _a_directory(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"model_repository {str(path)!r} is not a directory")
        return path

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port {self.metrics_port} is the gRPC port; pick another")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            which = "gRPC" if self.http_port == self.port else "metrics"
            raise ValueError(f"http_port {self.http_port} is the {which} port; pick another")
        if self.cpp_grpc_port and self.cpp_grpc_port in (self.port, self.metrics_port,
                                                               self.http_port):
            raise ValueError(f"cpp_grpc_port {self.cpp_grpc_port} is taken by another of "
                             "the server's ports; pick another")
        if self.grpc_frontend == "cpp" and self.cpp_grpc_port is not None:
            raise ValueError("grpc_frontend cpp already serves the gRPC port through the C++ "
                             "front end; cpp_grpc_port serves it beside a grpc.aio port (drop "
                             "one of the two)")
        return self

    @property
    def stream_window(self) -> int:
        """Requests of one stream in flight at once: max_stream_in_flight, and no more than
        max_stream_share of the queue (at least 1)."""
        share = max(1, int(self.batcher.max_queue_size * self.max_stream_share))
        return min(self.max_stream_in_flight, share)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


# ---- the flat keys ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FlatKey:
    """One flat setting: its key (flag --max-batch-size, SNAPSERVE_MAX_BATCH_SIZE, file key
    max_batch_size) and the field of the tree it sets."""

    key: str
    path: tuple[str, ...]  # ('batcher', 'max_batch_size')
    field: FieldInfo
    unit: float
    off: Any
    per_model: bool
    annotation: Any  # the flat value's type
    default: Any  # the flat value's default; ... when required

    def to_field(self, value: Any) -> Any:
        """The field's value for this flat value (already of the flat type)."""
        if self.off is not None and value == self.off:
            return None
        if self.unit != 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = value * self.unit
            return int(value) if self.field.annotation is int and math.isfinite(value) else value
        return value

    def check(self, value: Any) -> Any:
        """The field's value for this flat value, validated by the field's own type and bounds;
        ConfigError saying what it must be (without the key: callers say where it was set)."""
        try:
            return _adapter(self.field).validate_python(self.to_field(value))
        except ValidationError as exc:
            item = exc.errors()[0]
            item["input"] = value  # shown as it was set: in ms, not in s
            raise ConfigError(error_text(item, self.field, self.unit)) from None


@functools.cache
def _adapter_of(annotation: Any, metadata: tuple[Any, ...]) -> TypeAdapter[Any]:
    return TypeAdapter(Annotated[(annotation, *metadata)] if metadata else annotation)


def _adapter(field: FieldInfo) -> TypeAdapter[Any]:
    """Validates one value as `field` does (type, strictness, bounds, before-validators)."""
    return _adapter_of(field.annotation, tuple(field.metadata))


_VALIDATORS = (AfterValidator, BeforeValidator, PlainValidator, WrapValidator)


def _flat_key(path: tuple[str, ...], field: FieldInfo) -> FlatKey | None:
    extra = field.json_schema_extra
    spec = extra.get("setting") if isinstance(extra, dict) else None
    if not isinstance(spec, dict):
        return None
    unit, off, flat = spec["unit"], spec["off"], spec["flat"]
    if flat is not None:
        annotation = flat
    elif off is not None:
        annotation = int
    else:  # the field's type and its own before-validators ('auto'), without its bounds
        validators = [m for m in field.metadata if isinstance(m, _VALIDATORS)]
        annotation = Annotated[(field.annotation, *validators)] if validators else field.annotation
    if spec["flat_default"] is not None:
        default = spec["flat_default"]
    elif field.is_required():
        default = ...
    elif unit != 1:
        default = field.default / unit
    else:
        default = field.default
    return FlatKey(spec["key"] or path[-1], path, field, unit, off, spec["per_model"], annotation,
                   default)


def _walk(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[FlatKey]:
    for name, field in model.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, ConfigModel):
            yield from _walk(nested, prefix + (name,))
        elif (flat := _flat_key(prefix + (name,), field)) is not None:
            yield flat


def flat_keys(model: type[BaseModel] = ServerConfig) -> dict[str, FlatKey]:
    """Key -> FlatKey for every setting in `model`'s tree, in field order."""
    return {flat.key: flat for flat in _walk(model)}
