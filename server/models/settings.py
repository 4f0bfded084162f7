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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from snapserve.proto.settings_file import SettingsFileError, parse_settings_text, read_settings_file
from snapserve.server.config import (BatcherConfig, FlatKey, RepositoryConfig, RuntimeConfig,
                                     ServerConfig, flat_keys)
from snapserve.server.errors import ConfigError, ModelSettingsError

__all__ = ["MODEL_KEYS", "SETTINGS_FILE", "ModelSettings", "EffectiveSettings", "parse_model_settings",
           "read_model_settings", "settings_identity"]

SETTINGS_FILE = "model-settings.yaml"
_MAX_BYTES = 64 * 1024  # a settings file is a few lines; anything larger is a mistake
# The server's settings a model may set for itself (`setting(..., per_model=True)` in
# server/config.py), spelt as in the server's settings file; and `versions`, its own pins.
MODEL_KEYS: dict[str, FlatKey] = {key: flat for key, flat in flat_keys(ServerConfig).items()
                                  if flat.per_model}
VERSIONS = "versions"


@dataclass(frozen=True)
class ModelSettings:
    """The keys a model's settings file set, as written; each value already passed its field's
    checks (alone: how it combines with the server's values is checked in `EffectiveSettings`)."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def given(self) -> dict[str, Any]:
        """The keys the file set, for logs and GetModel."""
        return dict(self.values)

    def changes(self, component: str) -> dict[str, Any]:
        """Field -> value for one component of the tree ('batcher', 'runtime', 'repository')."""
        return {MODEL_KEYS[key].path[-1]: MODEL_KEYS[key].check(value)
                for key, value in self.values.items()
                if key in MODEL_KEYS and MODEL_KEYS[key].path[0] == component}


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

        Validation is the configs' own, so a value a flag may not take, a settings file may not
        take either.
        """
        try:
            runtime = runtime.replace(**settings.changes("runtime"))
            batcher = batcher.replace(**settings.changes("batcher"))
            repository = _model_repository_config(name, settings, repository)
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


def _model_repository_config(name: str, s: ModelSettings, repository: RepositoryConfig) -> RepositoryConfig:
    policy, versions = s.changes("repository").get("version_policy"), s.values.get(VERSIONS)
    if policy is None:
        if versions is not None:
            raise ConfigError("versions needs version_policy: specific")
        return repository
    if policy != "specific" and versions is not None:
        raise ConfigError(f"versions needs version_policy: specific, not {policy!r}")
    pinned = {name: versions} if versions is not None else {}
    if policy == "specific" and not pinned:
        raise ConfigError("version_policy: specific needs versions: [...]")
    return repository.replace(version_policy=policy, pinned=pinned)


def _check_versions(value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ConfigError(f"must be a list of integers >= 1, got {value!r}")
    return tuple(sorted(set(value)))


def _checked(data: Mapping[str, Any], source: str) -> ModelSettings:
    """`data` as ModelSettings, each value checked by its field; ModelSettingsError names the key."""
    unknown = sorted(str(k) for k in data if k not in MODEL_KEYS and k != VERSIONS)
    if unknown:
        raise ModelSettingsError(f"{source}: unknown key(s) {unknown}; expected some of "
                                 f"{sorted([*MODEL_KEYS, VERSIONS])}")
    values = {}
    for key, value in data.items():
        try:
            if key == VERSIONS:
                value = _check_versions(value)
            else:
                MODEL_KEYS[key].check(value)  # kept as written: `given` shows what the file says
            values[key] = value
        except ConfigError as exc:
            raise ModelSettingsError(f"{source}: {key} {exc}") from None
    return ModelSettings(values)


def parse_model_settings(text: str, source: str) -> ModelSettings:
    """The settings in `text` (YAML; JSON is YAML too); ModelSettingsError names what is wrong."""
    try:
        return _checked(parse_settings_text(text, source), source)
    except SettingsFileError as exc:
        raise ModelSettingsError(str(exc)) from None


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
        data = read_settings_file(path, path.name, max_bytes=_MAX_BYTES)
    except FileNotFoundError:
        return ModelSettings()
    except SettingsFileError as exc:
        raise ModelSettingsError(str(exc)) from None
    return _checked(data, path.name)
