"""`ensemble-server` (also `python -m snapserve.server`): serve a model repository over gRPC and HTTP."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic.fields import FieldInfo

from snapserve.proto.version import package_version
from snapserve.server.app import start_server
from snapserve.server.config import ServerConfig
from snapserve.server.errors import ConfigError
from snapserve.server.observability.logs import configure_logging
from snapserve.server.settings import (ENV_PREFIX, ServerSettings, env_name, flag_name, load_settings,
                                       printable_settings)
from snapserve.server.process.workers import notify_ready, run_workers, worker_config, worker_index

logger = logging.getLogger(__name__)

_PRECEDENCE = ("Every setting is a flag, a SNAPSERVE_* variable and a key of the --config file "
               "(YAML or TOML, keys as the flags without dashes: max_batch_size: 16). A flag wins "
               "over its variable, which wins over the file, which wins over the default.")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags, one per ServerSettings field (its description is the help). Flags have no
    defaults here: only what was given reaches load_settings, so the variables and the file
    can fill in the rest."""
    parser = argparse.ArgumentParser(
        prog="ensemble-server",
        description="Serve snapshot ensembles over gRPC (snapserve.v1, KServe v2) and REST (KServe v2).",
        epilog=_PRECEDENCE, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    # allow_abbrev=False: a prefix such as --version must not be read as --version-policy.
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"settings file, YAML (.yaml) or TOML (.toml) [env {ENV_PREFIX}CONFIG]")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective settings (YAML) and exit; needs no repository")
    for key, field in ServerSettings.model_fields.items():
        _add_flag(parser, key, field)
    parser.add_argument("--no-metrics", dest="metrics_port", action="store_const", const="off",
                        help="serve no metrics endpoint (as --metrics-port off)")
    return parser


# Other servers' spellings of a flag, and the line that points to ours.
_FOREIGN_FLAGS = {
    "--model-store": "--model-store is Triton's flag; snapserve takes --model-repository DIR",
    "--model-repository-path": "snapserve takes --model-repository DIR",
    "--models": "snapserve takes --model-repository DIR",
}


def unknown_arguments_hint(extra: Sequence[str], flags: Sequence[str] = ()) -> str | None:
    """What to write instead of arguments argparse does not know, where we can tell: another
    server's flag (Triton's --model-store), a folder given without a flag (as `mlserver start
    models`), or the nearest of `flags` to a typo."""
    for word in extra:
        flag = word.split("=", 1)[0]
        if flag in _FOREIGN_FLAGS:
            return _FOREIGN_FLAGS[flag]
        if flag.startswith("--") and (close := difflib.get_close_matches(flag, flags, n=1)):
            return f"did you mean {close[0]}?"
        if not word.startswith("-"):
            return (f"{word!r}: the repository is a flag, not a positional argument: "
                    f"ensemble-server --model-repository {word}")
    return None


def _add_flag(parser: argparse.ArgumentParser, key: str, field: FieldInfo) -> None:
    kind = field.annotation
    if typing.get_origin(kind) is typing.Annotated:  # its validators run in the settings model
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    default = "required" if field.is_required() else field.default
    shown = "off" if default in ((), None) else default
    text = f"{field.description} (default: {shown}) [env {env_name(key)}]"
    options: dict[str, Any] = {"help": text}
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        options["choices"] = typing.get_args(kind)
    elif typing.get_origin(kind) is tuple:  # words: --pin A --pin B; numbers: --cuda-graph-batch-sizes 1,2,4
        words = typing.get_args(kind)[:1] == (str,)
        options.update(action="append", metavar="VALUE") if words else options.update(type=str)
    elif kind is int:
        options["type"] = _int_or_auto
    else:
        options["type"] = kind
    parser.add_argument(flag_name(key), dest=key, **options)


def _int_or_auto(text: str) -> int | str:
    """An integer flag's value; 'auto' and 'off' pass through for the settings that take them
    (others refuse them there, with the key named)."""
    if text.strip().lower() in ("auto", "off"):
        return text.strip().lower()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                ) -> tuple[ServerSettings, ServerConfig]:
    """The settings and the ServerConfig for these arguments; ConfigError names what is wrong.
    `environ` defaults to os.environ."""
    given = vars(build_parser().parse_args(argv))
    env = os.environ if environ is None else environ
    config_file = given.pop("config", None) or (Path(env[f"{ENV_PREFIX}CONFIG"])
                                                if env.get(f"{ENV_PREFIX}CONFIG") else None)
    given.pop("print_config", None)
    settings = load_settings(given, config_file, env)
    return settings, settings.to_server_config()


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop: the drain window, then the grace period. A
    second signal stops at once (RunningServer.hurry)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    running = None

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
        elif running is not None:
            logger.warning("second signal: stopping at once, cancelling what is in flight")
            running.hurry()

    for sig in (signal.SIGINT, signal.SIGTERM):  # before loading, so a signal then also exits 0
        loop.add_signal_handler(sig, on_signal)
    running = await start_server(config)
    notify_ready(running.metrics_port)  # the parent of --workers waits for every worker's word
    try:
        await stop.wait()
        logger.info("stopping (drain window %.1fs, grace %.1fs)", config.drain_window_s,
                    config.grace_s)
    finally:
        await running.stop(config.grace_s, config.drain_window_s)


def _print_config(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> None:
    """The effective settings as YAML; `auto` where a value is decided at load. Needs no
    repository (model_repository: null when none is set)."""
    given = vars(build_parser().parse_args(argv))
    env = os.environ if environ is None else environ
    config_file = given.pop("config", None) or (Path(env[f"{ENV_PREFIX}CONFIG"])
                                                if env.get(f"{ENV_PREFIX}CONFIG") else None)
    given.pop("print_config", None)
    settings = load_settings(given, config_file, env, to_serve=False)
    print(yaml.safe_dump(printable_settings(settings), sort_keys=False), end="")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # --help and --version end here
    if extra:
        hint = unknown_arguments_hint(extra, [f for a in parser._actions for f in a.option_strings])
        parser.exit(2, f"{parser.prog}: error: unrecognized arguments: {' '.join(extra)}"
                       f"{'; ' + hint if hint else ''}\n")
    try:
        if getattr(args, "print_config", False):
            _print_config(argv)
            return 0
        settings, config = load_config(argv)
    except ConfigError as exc:  # a message naming the key; the usage would bury it
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    configure_logging(settings.log_level, settings.log_format, settings.log_requests)
    index = worker_index()
    if settings.workers > 1 and index is None:  # the parent: it serves nothing itself
        return run_workers(sys.argv[1:] if argv is None else argv, config, settings.workers)
    if index is not None:
        config = worker_config(config, index, settings.workers)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # found at start-up: device, port
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
