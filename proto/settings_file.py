"""Settings files: YAML (.yaml, .yml; JSON is YAML too) or TOML (.toml) read into a mapping.

The one reader behind the server's `--config` file, each model's `model-settings.yaml` and the
trainer's `--config` file: one size bound, one set of messages. A key may be spelt as its flag
(max-batch-size) or as its field (max_batch_size); the mapping holds the field spelling.
Imports only yaml and tomllib, so both the server and the trainer may use it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["MAX_SETTINGS_BYTES", "SettingsFileError", "parse_settings_text", "read_settings_file"]

# A settings file is a few dozen lines; a larger one is a mistake, not something to parse.
MAX_SETTINGS_BYTES = 1024 * 1024


class SettingsFileError(ValueError):
    """A settings file cannot be read, does not parse, or is not a mapping; the message names it."""


def parse_settings_text(text: str, source: str, toml: bool = False) -> dict[str, Any]:
    """The mapping in `text` (TOML when `toml`, else YAML); `source` names it in messages."""
    try:
        data = tomllib.loads(text) if toml else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise SettingsFileError(f"{source}: not valid {'TOML' if toml else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SettingsFileError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def read_settings_file(path: Path, source: str | None = None,
                       max_bytes: int = MAX_SETTINGS_BYTES) -> dict[str, Any]:
    """The settings in the file at `path`, YAML or TOML by its suffix; `source` names it in
    messages (default: the path). FileNotFoundError passes through for callers to whom a
    missing file means no settings; every other failure is a SettingsFileError."""
    source = str(path) if source is None else source
    try:
        with Path(path).open("rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SettingsFileError(f"{source}: cannot be read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise SettingsFileError(f"{source}: larger than {max_bytes} bytes; a settings file is a "
                                "few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsFileError(f"{source}: not UTF-8 text") from None
    return parse_settings_text(text, source, toml=Path(path).suffix == ".toml")
