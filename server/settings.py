"""Where the server's settings come from: flags, SNAPSERVE_* variables and a `--config` file.

The settings are the flat keys of the model tree in server/config.py (`max_batch_size`,
`max_queue_delay_ms`, ...): `ServerSettings` is generated from its fields, so a setting is
written once, in its component's model. The CLI's flags are made from ServerSettings' fields
(`--max-batch-size`), pydantic-settings reads the `SNAPSERVE_*` variables, and `--config` names a
YAML or TOML file with the same keys. Precedence: flags > environment > file > defaults, all
validated once, at start-up, by the tree's own fields, with messages that name the key and where
it can be set. `to_server_config` then maps the flat keys onto the tree.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, ValidationError, create_model
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict

from snapserve.proto.settings_file import SettingsFileError, read_settings_file
from snapserve.server.config import (ConfigModel, FlatKey, OffOrPort, ServerConfig, count, did_you_mean,
                                     error_text, flat_keys, parse_pins, setting, takes_auto)
from snapserve.server.errors import ConfigError

__all__ = ["ENV_PREFIX", "ProcessConfig", "ServerSettings", "env_name", "flag_name",
           "load_settings", "parse_pins", "printable_settings", "read_config_file"]

ENV_PREFIX = "SNAPSERVE_"


class ProcessConfig(ConfigModel):
    """The settings of the `ensemble-server` process itself, beside what `start_server` takes."""

    workers: int = count(1, "server processes sharing the gRPC and REST ports (SO_REUSEPORT), each "
                            "with its own sessions; metrics_port serves their sum "
                            "(docs/performance.md)", high=1024)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = setting("INFO", "log level")
    log_format: Literal["text", "json"] = setting(
        "text", "json: one object per line with request_id, model, version, status, latency_ms")
    log_requests: bool = setting(False, "an access line for every answered request, not only "
                                        "failed ones", strict=True)


SERVER_KEYS = flat_keys(ServerConfig)
PROCESS_KEYS = flat_keys(ProcessConfig)
KEYS: dict[str, FlatKey] = {**SERVER_KEYS, **PROCESS_KEYS}


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _where(key: str) -> str:
    if key not in KEYS:
        return f"{key!r} (no such setting)"
    return f"{key} ({flag_name(key)}, {env_name(key)} or '{key}' in the config file)"


def printable_settings(settings: Any) -> dict[str, Any]:
    """The settings as --print-config shows them: JSON types, `auto` for a value decided at load
    (an `auto` setting holds 0 until then), `off` for a port not served."""
    values = settings.model_dump(mode="json")
    for key, flat in KEYS.items():
        if values.get(key) == 0 and takes_auto(flat.field):
            values[key] = "auto"
        elif values.get(key) is None and flat.annotation is OffOrPort:
            values[key] = "off"
    return values


def _flat_field(flat: FlatKey) -> tuple[Any, Any]:
    """The flat setting's (type, Field) for ServerSettings: its type without bounds (the tree's
    field checks those), and a tuple spelt '1,2,4' in a variable, not JSON."""
    annotation = flat.annotation
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    if typing.get_origin(base) is tuple:
        annotation = Annotated[annotation, NoDecode]
    return annotation, Field(flat.default, description=flat.field.description)


class _SettingsBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True,
                                      env_ignore_empty=True, validate_default=True)

    def to_server_config(self) -> ServerConfig:
        """The ServerConfig these settings describe; ConfigError names the key."""
        return _tree(self, SERVER_KEYS, ServerConfig)

    def to_process_config(self) -> ProcessConfig:
        return _tree(self, PROCESS_KEYS, ProcessConfig)


ServerSettings = create_model(  # type: ignore[call-overload]
    "ServerSettings", __base__=_SettingsBase, __module__=__name__,
    __doc__="Every setting of `ensemble-server`, flat. A field's description is its flag's help.",
    **{key: _flat_field(flat) for key, flat in KEYS.items()})


def _tree(settings: Any, keys: Mapping[str, FlatKey], model: type[ConfigModel]) -> Any:
    """`model` from the flat settings: each value checked by its field, then nested by its path."""
    values: dict[str, Any] = {}
    errors = []
    for key, flat in keys.items():
        try:
            value = flat.check(getattr(settings, key))
        except ConfigError as exc:
            errors.append(f"{_where(key)}: {exc}")
            continue
        *parents, name = flat.path
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    if errors:
        raise ConfigError("; ".join(errors))
    return model(**values)


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a YAML (.yaml, .yml) or TOML (.toml) file: a mapping of setting keys."""
    try:
        return read_settings_file(path, f"config file {path}")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror or exc}") from None
    except SettingsFileError as exc:
        raise ConfigError(str(exc)) from None


def _describe(error: ValidationError, config_file: Path | None) -> str:
    lines = []
    for item in error.errors():
        key = str(item["loc"][0]) if item["loc"] else "?"
        if item["type"] == "extra_forbidden":
            lines.append(f"{key!r} in {config_file or 'the settings'} is not a setting"
                         f"{did_you_mean(key, KEYS)}; expected one of: {', '.join(KEYS)}")
        elif item["type"] == "missing":
            lines.append(f"{_where(key)} is required")
        else:
            field = ServerSettings.model_fields.get(key)
            lines.append(f"{_where(key)}: {error_text(item, field)}")
    return "; ".join(lines)


# --print-config shows the settings without serving, so without the one required setting too.
_UnservedSettings = create_model(  # type: ignore[call-overload]
    "UnservedSettings", __base__=ServerSettings, __module__=__name__,
    model_repository=(Path | None, Field(None, description=KEYS["model_repository"].field.description)))


def load_settings(flags: Mapping[str, Any], config_file: Path | None = None,
                  environ: Mapping[str, str] | None = None, *, to_serve: bool = True) -> Any:
    """Settings (a ServerSettings) from the flags given, then the environment (`environ`, default
    os.environ), then `config_file`, then the defaults. ConfigError names every bad key.
    `to_serve=False` (--print-config): model_repository may be missing (None)."""
    file_values = read_config_file(config_file) if config_file is not None else {}

    class _Sources(ServerSettings if to_serve else _UnservedSettings):  # type: ignore[misc, valid-type]
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
    settings = (ServerSettings if to_serve else _UnservedSettings).model_construct(**settings.model_dump())
    settings.to_process_config()  # its bounds (workers >= 1), checked with the rest at start-up
    return settings


class _MappingEnvSource(InitSettingsSource):
    """The SNAPSERVE_* entries of a given mapping instead of os.environ (tests, --print-config)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        values = {}
        for key in settings_cls.model_fields:
            raw = environ.get(env_name(key), "")
            if raw:  # empty: as if unset, as for the real environment
                values[key] = raw
        super().__init__(settings_cls, values)
