"""Per-model settings: `<repository>/<model>/model-settings.yaml`, beside the version folders.

What Triton's config.pbtxt and MLServer's model-settings.json are for: one model served with other
batching, threading, graph or version policy than the server's defaults, without a restart.

    max_batch_size: 16          # examples per inference call, and per request
    max_queue_delay_ms: 1.0     # longest wait for a batch to fill
    max_queue_size: 128         # requests waiting before RESOURCE_EXHAUSTED
    instances: 2                # runtime instances: batches computed at once (auto: decide at load)
    intra_op_threads: 1         # ONNX Runtime threads per session (auto: decide at load)
    graph: fused                # auto | fused | members
    precision: fp32             # fp32 | fp16
    version_policy: specific    # latest | all | specific
    versions: [2, 3]            # the versions to serve, with `specific`

Every key is optional; a missing one keeps the server's value. The file is read when the model is
loaded and on every repository poll; a changed file reloads the model's versions with the new
values, the way a new version is switched to (no request fails). A file that does not parse, has an
unknown key or a bad value is refused with the key named, and the model keeps the settings it had
(a model that has none yet is not loaded until the file is fixed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.cores import AUTO
from snapserve.server.engine.runtime import RuntimeConfig
from snapserve.server.errors import ConfigError, ModelSettingsError
from snapserve.server.models.policy import RepositoryConfig

__all__ = ["SETTINGS_FILE", "ModelSettings", "EffectiveSettings", "read_model_settings", "settings_identity"]

SETTINGS_FILE = "model-settings.yaml"
_MAX_BYTES = 64 * 1024  # a settings file is a few lines; anything larger is a mistake


@dataclass(frozen=True)
class ModelSettings:
    """The keys a model's settings file may set; None: the server's value."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None
    instances: int | None = None
    intra_op_threads: int | None = None
    graph: str | None = None
    precision: str | None = None
    version_policy: str | None = None
    versions: tuple[int, ...] | None = None

    def given(self) -> dict[str, Any]:
        """The keys the file set, for logs and GetModel."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class EffectiveSettings:
    """What one model is served with: the server's configs with its settings file applied."""

    runtime: RuntimeConfig
    batcher: BatcherConfig
    repository: RepositoryConfig
    file_settings: ModelSettings = ModelSettings()

    @classmethod
    def apply(cls, name: str, settings: ModelSettings, runtime: RuntimeConfig,
              batcher: BatcherConfig, repository: RepositoryConfig) -> EffectiveSettings:
        """The server's configs overridden by `settings`; ModelSettingsError names a bad key.

        Validation is the configs' own (their __post_init__), so a value a flag may not take,
        a settings file may not take either.
        """
        s = settings
        try:
            runtime = _replace(runtime, instances=s.instances, intra_op_threads=s.intra_op_threads,
                               graph=s.graph, precision=s.precision)
            delay = None if s.max_queue_delay_ms is None else s.max_queue_delay_ms / 1000
            batcher = _replace(batcher, max_batch_size=s.max_batch_size, max_queue_delay_s=delay,
                               max_queue_size=s.max_queue_size)
            repository = _model_repository_config(name, s, repository)
        except ConfigError as exc:
            raise ModelSettingsError(f"{SETTINGS_FILE}: {exc}") from None
        return cls(runtime, batcher, repository, settings)

    def describe(self) -> dict[str, str]:
        """The effective values, as strings, for GetModel and KServe ModelConfig parameters."""
        values = {
            "max_batch_size": self.batcher.max_batch_size,
            "max_queue_delay_ms": self.batcher.max_queue_delay_s * 1000,
            "max_queue_size": self.batcher.max_queue_size,
            "instances": self.runtime.instances,
            "intra_op_threads": self.runtime.intra_op_threads,
            "graph_setting": self.runtime.graph,
            "precision": self.runtime.precision,
            "version_policy": self.repository.version_policy,
        }
        values["settings_file"] = ",".join(sorted(self.file_settings.given())) or "none"
        return {k: str(v) for k, v in values.items()}


def _replace(config: Any, **changes: Any) -> Any:
    given = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


def _model_repository_config(name: str, s: ModelSettings, repository: RepositoryConfig) -> RepositoryConfig:
    if s.version_policy is None:
        if s.versions is not None:
            raise ConfigError("versions needs version_policy: specific")
        return repository
    if s.version_policy != "specific" and s.versions is not None:
        raise ConfigError(f"versions needs version_policy: specific, not {s.version_policy!r}")
    pinned = {name: s.versions} if s.versions is not None else {}
    if s.version_policy == "specific" and not pinned:
        raise ConfigError("version_policy: specific needs versions: [...]")
    return dataclasses.replace(repository, version_policy=s.version_policy, pinned=pinned)


_TYPES: dict[str, tuple[type, ...]] = {
    "max_batch_size": (int,), "max_queue_delay_ms": (int, float), "max_queue_size": (int,),
    "instances": (int, str), "intra_op_threads": (int, str), "graph": (str,), "precision": (str,),
    "version_policy": (str,), "versions": (list,),
}


def _check_value(key: str, value: Any) -> Any:
    kinds = _TYPES[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ModelSettingsError(f"{key} must be {expected}, got {value!r}")
    if key == "versions":
        if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise ModelSettingsError(f"versions must be a list of integers >= 1, got {value!r}")
        return tuple(sorted(set(value)))
    if key == "max_queue_delay_ms":
        return float(value)
    if key in ("instances", "intra_op_threads") and isinstance(value, str):
        if value != "auto":
            raise ModelSettingsError(f"{key} must be int or 'auto', got {value!r}")
        return AUTO
    return value


def parse_model_settings(text: str, source: str) -> ModelSettings:
    """The settings in `text` (YAML; JSON is YAML too); ModelSettingsError names what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelSettingsError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return ModelSettings()
    if not isinstance(data, Mapping):
        raise ModelSettingsError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _TYPES)
    if unknown:
        raise ModelSettingsError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(_TYPES)}")
    try:
        return ModelSettings(**{k: _check_value(k, v) for k, v in data.items()})
    except ModelSettingsError as exc:
        raise ModelSettingsError(f"{source}: {exc}") from None


def settings_identity(model_dir: Path) -> tuple[int, ...] | None:
    """Changes when the settings file is written; None when there is none."""
    try:
        stat = (model_dir / SETTINGS_FILE).stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def read_model_settings(model_dir: Path) -> ModelSettings:
    """The model's settings file, or no settings when it has none."""
    path = model_dir / SETTINGS_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return ModelSettings()
    except OSError as exc:
        raise ModelSettingsError(f"{path.name}: cannot be read: {exc}") from None
    if len(raw) > _MAX_BYTES:
        raise ModelSettingsError(f"{path.name}: larger than {_MAX_BYTES} bytes; a settings file is "
                                 "a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelSettingsError(f"{path.name}: not UTF-8 text") from None
    return parse_model_settings(text, path.name)
