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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from snapserve.proto.settings_file import SettingsFileError, parse_settings_text, read_settings_file
from snapserve.server.config import (BatcherConfig, FlatKey, RepositoryConfig, RuntimeConfig,
                                     ServerConfig, did_you_mean, flat_keys)
from snapserve.server.errors import ConfigError, ModelSettingsError

__all__ = ["FOREIGN_FILES", "MODEL_KEYS", "SETTINGS_FILE", "ModelSettings", "EffectiveSettings",
           "foreign_settings_notice", "parse_model_settings", "read_model_settings", "settings_identity"]

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


# Triton's (config.pbtxt) and MLServer's (model-settings.json) keys -> what ours is.
FOREIGN_KEYS = {
    "max_queue_delay_microseconds": "max_queue_delay_ms (in milliseconds)",
    "dynamic_batching": "max_queue_delay_ms and max_queue_size (flat keys)",
    "instance_group": "instances (a count)",
    "max_batch_time": "max_queue_delay_ms (in milliseconds, not seconds)",
    "parallel_workers": "instances",
    "parameters": "flat keys (max_batch_size, instances, version_policy, versions ...)",
}


def _unknown_key_hint(key: str) -> str:
    if key in FOREIGN_KEYS:
        return f"{key!r} -> {FOREIGN_KEYS[key]}"
    return f"{key!r}{did_you_mean(key, [*MODEL_KEYS, VERSIONS])}"


def _checked(data: Mapping[str, Any], source: str) -> ModelSettings:
    """`data` as ModelSettings, each value checked by its field; ModelSettingsError names the key."""
    unknown = sorted(str(k) for k in data if k not in MODEL_KEYS and k != VERSIONS)
    if unknown:
        raise ModelSettingsError(f"{source}: unknown key(s) {', '.join(map(_unknown_key_hint, unknown))}; "
                                 f"expected some of {sorted([*MODEL_KEYS, VERSIONS])}")
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


# Other servers' per-model files: read only to say what snapserve reads instead.
FOREIGN_FILES = {"config.pbtxt": "Triton's", "model-settings.json": "MLServer's"}
_PBTXT_KEYS = (("max_batch_size", re.compile(r"\bmax_batch_size\s*:\s*(\d+)"), 1),
               ("max_queue_delay_ms", re.compile(r"\bmax_queue_delay_microseconds\s*:\s*(\d+)"), 1e-3),
               ("instances", re.compile(r"\binstance_group\s*[:{\[][^}]*?\bcount\s*:\s*(\d+)",
                                        re.S), 1))


def _pbtxt_equivalents(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, pattern, unit in _PBTXT_KEYS:
        match = pattern.search(text)
        if match:
            value = int(match.group(1)) * unit
            found[key] = int(value) if unit == 1 else round(value, 3)
    return found


def _mlserver_equivalents(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    found: dict[str, Any] = {}
    if isinstance(data.get("max_batch_size"), int) and data["max_batch_size"] > 0:
        found["max_batch_size"] = data["max_batch_size"]
    if isinstance(data.get("max_batch_time"), (int, float)) and data["max_batch_time"] > 0:
        found["max_queue_delay_ms"] = round(data["max_batch_time"] * 1000, 3)
    if isinstance(data.get("parallel_workers"), int) and data["parallel_workers"] > 0:
        found["instances"] = data["parallel_workers"]
    version = (data.get("parameters") or {}).get("version") if isinstance(data.get("parameters"), dict) else None
    if isinstance(version, (int, str)) and str(version).isdigit() and int(version) > 0:
        found.update(version_policy="specific", versions=[int(version)])
    return found


def foreign_settings_notice(model_dir: Path) -> str | None:
    """What to say about a Triton config.pbtxt or an MLServer model-settings.json in a model's
    folder (snapserve ignores them): the file it reads instead, and the equivalent keys where
    they can be read off. None when there is no such file."""
    notes = []
    for file_name, whose in FOREIGN_FILES.items():
        path = model_dir / file_name
        try:
            with path.open("rb") as handle:
                text = handle.read(_MAX_BYTES).decode("utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            continue
        found = _pbtxt_equivalents(text) if file_name == "config.pbtxt" else _mlserver_equivalents(text)
        equivalent = (f"; in {SETTINGS_FILE}: " + ", ".join(f"{k}: {v}" for k, v in found.items())
                      if found else "")
        notes.append(f"{file_name} ({whose}) is ignored: snapserve reads {SETTINGS_FILE} beside "
                     f"the version folders (docs/model-repository.md){equivalent}")
    return "; ".join(notes) or None
