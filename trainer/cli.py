"""The `trainer` command (also `python -m snapserve.trainer`).

    trainer train --method snapshot --dataset digits --arch cnn --epochs 40 --members 5 \
                  --lr 0.1 --seed 0 --out models --name digits
    trainer compare --out-dir runs/compare      (trainer compare --quick ... for a minute-long check)
    torchrun --nproc_per_node 2 -m snapserve.trainer train ...   (DistributedDataParallel)

Progress goes to the log (stderr); the final summary is printed to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snapserve.proto.settings_file import SettingsFileError, read_settings_file
from snapserve.proto.version import package_version
from snapserve.trainer.config import (AMP_MODES, DEFAULT_SELECTION, METHOD_NAMES, SELECTION_RULES, SINGLE_SCHEDULES,
                                      TrainConfig)
from snapserve.trainer.datasets import BUILTIN_DATASETS
from snapserve.trainer.errors import ConfigError, TrainerError
from snapserve.trainer.importer import add_import_parser
from snapserve.trainer.models import ARCHITECTURES
from snapserve.trainer.checkpoint import load_checkpoint
from snapserve.trainer.api import train_version

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_BOOL = argparse.BooleanOptionalAction


def _add_model_and_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=_DEFAULTS["dataset"],
                   help=f"built-in {sorted(BUILTIN_DATASETS)} (mnist1d:train=N,val=N,test=N,label_noise=F: other sizes); a .npz with x_train, y_train, x_test, y_test "
                        "[, x_val, y_val, classes]; a CIFAR-10/100 python folder; or a folder of class "
                        "sub-folders of images (default: %(default)s)")
    p.add_argument("--arch", default=_DEFAULTS["arch"],
                   help=f"{sorted(ARCHITECTURES)} or module:factory, a function (input_shape, num_classes) "
                        "-> torch.nn.Module (default: %(default)s)")
    p.add_argument("--depth", type=int, default=None,
                   help="resnet 6n+2 (20, 32, 56, 110; default 20), preresnet (20, 32, 56, 110, 164; default "
                        "20), wrn 6n+4 (default 16)")
    p.add_argument("--width", type=int, default=None,
                   help="mlp hidden units (128), cnn/cnn1d channels (32), wrn widen factor (4)")
    p.add_argument("--augment", action=_BOOL, default=None,
                   help="random crop (4-pixel padding) + horizontal flip (default: on for CIFAR only)")


def _add_optimizer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr", type=float, default=None,
                   help="lr0: the initial LR, and each snapshot cycle's (default: 0.2 for snapshot, else 0.1)")
    p.add_argument("--momentum", type=float, default=_DEFAULTS["momentum"], help="(default: %(default)s)")
    p.add_argument("--nesterov", action=_BOOL, default=_DEFAULTS["nesterov"],
                   help="Nesterov momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"],
                   help="global batch size, split over DDP processes (default: %(default)s)")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fge (Garipov et al. 2018)")
    g.add_argument("--fge-start", type=float, default=_DEFAULTS["fge_start"],
                   help="fraction of the budget trained normally before the FGE cycles (default: %(default)s)")
    g.add_argument("--fge-cycle", type=int, default=_DEFAULTS["fge_cycle"],
                   help="epochs per cycle, even; a member at each mid-cycle minimum (default: %(default)s)")
    g.add_argument("--fge-lr1", type=float, default=None, help="alpha1, the LR at cycle boundaries (default: lr/2)")
    g.add_argument("--fge-lr2", type=float, default=None, help="alpha2, the LR at mid-cycle (default: lr/10)")
    g = p.add_argument_group("swa and swag (Izmailov et al. 2018, Maddox et al. 2019)")
    g.add_argument("--swa-start", type=float, default=_DEFAULTS["swa_start"],
                   help="fraction of the budget before averaging starts (default: %(default)s)")
    g.add_argument("--swa-lr", type=float, default=None, help="the constant SWA LR, or the cycle minimum (default: lr/2)")
    g.add_argument("--swa-cycle", type=int, default=_DEFAULTS["swa_cycle"],
                   help="epochs per cyclical-LR cycle, averaging at cycle ends; 0: constant LR, averaging "
                        "every epoch (default: %(default)s)")
    g.add_argument("--swa-lr-max", type=float, default=None, help="the cycle maximum of a cyclical SWA LR (default: lr)")
    g.add_argument("--swag-rank", type=int, default=_DEFAULTS["swag_rank"],
                   help="K, deviation columns kept by SWAG; swag-diag keeps none (default: %(default)s)")
    g.add_argument("--swag-scale", type=float, default=None,
                   help="scale of the SWAG covariance when sampling (default: 0.5 for swag, 1 for swag-diag)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adaptive-tolerance", type=float, default=_DEFAULTS["adaptive_tolerance"], metavar="POINTS",
                   help="adaptive member evaluation: validation accuracy points the calibrated thresholds "
                        "may lose against the full ensemble (default: %(default)s)")
    p.add_argument("--calibrate", action=_BOOL, default=_DEFAULTS["calibrate"],
                   help="fit the temperature on the validation split after pooling (default: %(default)s)")
    p.add_argument("--plots", action=_BOOL, default=_DEFAULTS["plots"],
                   help="PNG plots and report.md in the version's report/ (default: %(default)s)")
    p.add_argument("--device", default=_DEFAULTS["device"],
                   help="auto, cpu, cuda, cuda:N or mps; auto = cuda if available (default: %(default)s)")
    p.add_argument("--amp", default=_DEFAULTS["amp"], choices=AMP_MODES,
                   help="mixed precision: bf16, or fp16 with a GradScaler (default: %(default)s)")
    p.add_argument("--channels-last", action=_BOOL, default=None,
                   help="channels_last memory layout (default: on for CUDA with image inputs)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: min(2, cores))")


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an ensemble and write a model version",
                              description="Train an ensemble and write it as a new model version.")
    p.add_argument("--out", default=None,
                   help="model repository folder (created if missing); required, unless "
                        "--from-manifest gives it")
    p.add_argument("--name", default=None, help="model name in the repository (default: the dataset's name)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="settings file (YAML or TOML) whose keys are these options' names "
                        "(epochs: 150, swa_start: 0.75); a flag given here wins over it")
    p.add_argument("--from-manifest", type=Path, default=None, metavar="MANIFEST",
                   help="train again what made a version: its manifest.json's recorded settings "
                        "(and its repository and name, unless --out/--name); flags and --config "
                        "win over them")
    p.add_argument("--method", default=_DEFAULTS["method"], choices=sorted(METHOD_NAMES),
                   help="snapshot: cosine cycles, a member per cycle; fge: short linear cycles after "
                        "pre-training; swa: one averaged model; swag: members sampled around the SWA "
                        "average (low-rank plus diagonal Gaussian); swag-diag: the same with the "
                        "diagonal alone; single: the one-model baseline (default: %(default)s)")
    _add_model_and_data_options(p)
    p.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"],
                   help="the whole budget, every phase and cycle together (default: %(default)s)")
    p.add_argument("--members", type=int, default=None,
                   help="snapshot: cycles M (default 5); swag, swag-diag: samples S (default 10); single and swa: 1; "
                        "fge: one per cycle (set by the budget)")
    p.add_argument("--selection", default=None, choices=SELECTION_RULES,
                   help="which collected members to serve, chosen on the validation split: all; last-k (the "
                        "last --keep-last K); greedy (forward selection with replacement on validation NLL). "
                        "Default per method: " + ", ".join(f"{m} {r}" for m, (r, _) in DEFAULT_SELECTION.items()))
    p.add_argument("--keep-last", type=int, default=None, metavar="K",
                   help="snapshot/fge: serve the last K members (selection last-k)")
    p.add_argument("--single-schedule", default=_DEFAULTS["single_schedule"], choices=SINGLE_SCHEDULES,
                   help="single: step decay (0.1x at 50%% and 75%%, the SSE paper's), linear (constant, then "
                        "down to 1%% from 50%% to 90%%: the FGE/SWA reference's) or cosine (one cycle) "
                        "(default: %(default)s)")
    _add_optimizer_options(p)
    p.add_argument("--seed", type=int, default=_DEFAULTS["seed"],
                   help="training seed; the data split is fixed (default: %(default)s)")
    _add_method_options(p)
    p.add_argument("--from-checkpoint", default=None, metavar="PATH",
                   help="fge: start from this checkpoint (file or run folder): its weights, optimizer "
                        "state and epochs (which count in --epochs)")
    _add_run_options(p)
    p.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint folder (default: <out>/.runs/<name>-<method>-<hash of the settings>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint of the same settings, if there is one")
    p.set_defaults(handler=_train)


def _add_compare_parser(subparsers: argparse._SubParsersAction) -> None:
    from snapserve.trainer.compare import COMPARE_METHODS, PROFILES

    full = PROFILES["full"]
    p = subparsers.add_parser(
        "compare", help="train every method, paired by seed, and tabulate the differences to the baselines",
        description="Train each method with each seed (the same initial weights and data order for "
                    "every method) and tabulate test accuracy, NLL, ECE and the uncertainty scores' "
                    "AUROCs, with each method's per-seed difference to single-step (and to its own "
                    "paper's baseline) and its 95% paired t- and bootstrap intervals. Unset options take "
                    "the recorded regime's values (the full profile), or --quick's.")
    _add_model_and_data_options(p)
    p.add_argument("--quick", action="store_true",
                   help="a small profile that runs every method in about a minute (for tests)")
    p.add_argument("--budget", type=int, default=None,
                   help=f"epochs of the table, the same for every method (full: {full['budget']})")
    p.add_argument("--budgets", type=int, nargs="+", default=None,
                   help=f"budgets of the budget plot (full: {' '.join(map(str, full['budgets']))})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="(full: 0 1 2 3 4)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"{', '.join(COMPARE_METHODS)}, each with optional settings of its own: "
                        "snapshot:lr=0.2,members=3. single-step/-linear/-cosine: the SSE paper's step decay, "
                        "the FGE/SWA reference's linear decay, one cosine cycle; deep: M models, each the whole "
                        "budget (M x the cost); deep-1x: M models of budget/M epochs (full: all but deep)")
    p.add_argument("--deep-members", type=int, default=None, help=f"M of the deep ensembles (full: {full['deep_members']})")
    p.add_argument("--selections", nargs="+", default=None, choices=SELECTION_RULES,
                   help="member-selection rules scored for every method with several members, each a row "
                        f"(full: {' '.join(full['selections'])})")
    p.add_argument("--keep-last", type=int, nargs="+", default=None, metavar="K",
                   help=f"the k of the last-k rule, one row each (full: {' '.join(map(str, full['keep_last']))})")
    p.add_argument("--out-dir", required=True,
                   help="folder for table.md, runs.json, runs.csv (every per-seed value) and the plots")
    _add_optimizer_options(p)
    _add_method_options(p)
    _add_run_options(p)
    p.set_defaults(handler=_compare, plots=False, dataset=None, arch=None)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: a prefix of one flag must never be read as another.
    parser = argparse.ArgumentParser(prog="trainer", description="Train snapshot ensembles for snapserve.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _add_logging_options(parser, default=False)
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
    _add_train_parser(subparsers)
    _add_compare_parser(subparsers)
    add_import_parser(subparsers)
    for command in subparsers.choices.values():  # `trainer train -v` as well as `trainer -v train`
        _add_logging_options(command, default=argparse.SUPPRESS)
    return parser


def _add_logging_options(parser: argparse.ArgumentParser, default: Any) -> None:
    # On a subcommand the default is SUPPRESS, so not giving it there keeps the top level's value.
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="warnings and errors only")


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in _FIELDS}
    return TrainConfig(**{**values, **overrides})


def _flag_given(argv: Sequence[str], key: str) -> bool:
    """Whether the option for TrainConfig field `key` is on the command line (abbreviations are
    off, so a flag is always spelled out)."""
    flag = "--" + key.replace("_", "-")
    negated = "--no-" + key.replace("_", "-")
    return any(a == flag or a.startswith(flag + "=") or a == negated for a in argv)


def _settings_file(path: Path) -> dict[str, Any]:
    try:
        values = read_settings_file(path, f"--config {path}")
    except FileNotFoundError as exc:
        raise ConfigError(f"--config {path}: cannot be read: {exc.strerror or exc}") from None
    except SettingsFileError as exc:
        raise ConfigError(str(exc)) from None
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s) {unknown}; expected some of "
                          f"{sorted(_FIELDS)}")
    return values


def _manifest_settings(path: Path) -> dict[str, Any]:
    """What trained a version, from its manifest: the `training` section's TrainConfig fields, its
    repository (<repo>/<name>/<version>/manifest.json) and name. Where that run kept its
    checkpoints and whether it resumed are not taken: a new run is a new run."""
    try:
        manifest = json.loads(path.read_text())
        training = manifest["training"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--from-manifest {path}: not a model version's manifest.json ({exc})") from None
    values = {k: v for k, v in training.items() if k in _FIELDS and k not in ("checkpoint_dir", "resume")}
    values.setdefault("name", manifest.get("name"))
    values["out"] = str(path.resolve().parent.parent.parent)
    return values


def train_config(args: argparse.Namespace, argv: Sequence[str]) -> TrainConfig:
    """The TrainConfig of `trainer train` parsed from `argv` into `args`: the flags given, over
    --config, over --from-manifest, over the defaults."""
    layered: dict[str, Any] = {}
    if args.from_manifest is not None:
        layered.update(_manifest_settings(args.from_manifest))
    if args.config is not None:
        layered.update(_settings_file(args.config))
    given = {k: v for k, v in vars(args).items() if k in _FIELDS and (_flag_given(argv, k) or k not in layered)}
    values = {**layered, **given}
    if values.get("out") is None:
        raise ConfigError("--out is required (or --from-manifest, whose repository it takes)")
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> int:
    config = train_config(args, args.argv)
    began = time.perf_counter()
    try:
        result = train_version(config)
    except KeyboardInterrupt:  # Ctrl-C: where it stopped and how to go on, not a traceback
        print(_interrupted(config, args.argv), file=sys.stderr)
        return 130
    if result is not None:  # None on DDP processes other than 0
        _print_summary(result.manifest, result.version_dir, time.perf_counter() - began)
        print(f"report: {Path(result.version_dir) / 'report'}")
    return 0


def _interrupted(config: TrainConfig, argv: Sequence[str]) -> str:
    """What to say on Ctrl-C: the epoch of the last checkpoint, and the command that goes on."""
    checkpoint = config.run_dir() / "checkpoint.pt"
    if not checkpoint.is_file():
        return "interrupted before the first epoch ended; nothing to resume (no checkpoint)"
    try:
        epoch = load_checkpoint(config.run_dir())["epoch"]
    except (TrainerError, KeyError, OSError, RuntimeError):
        epoch = "?"
    again = shlex.join(["trainer", *argv, *([] if "--resume" in argv else ["--resume"])])
    return f"interrupted at epoch {epoch}; `{again}` goes on (checkpoint in {config.run_dir()})"


def _compare(args: argparse.Namespace) -> int:
    from snapserve.trainer.compare import run_compare

    run_compare(args, config_from_args)
    return 0


def _print_summary(manifest: dict[str, Any], version_dir: Any, seconds: float) -> None:
    members = manifest["members"]
    print(f"wrote {version_dir} ({manifest['method']}, {len(members)} members, {seconds:.1f} s)")
    print("member  epoch   step  test_acc  test_nll")
    for index, member in enumerate(members):
        metrics = member["metrics"]
        print(f"{index:6d}  {member['epoch']:5d}  {member['step']:5d}  "
              f"{metrics['accuracy']:8.4f}  {metrics['nll']:8.4f}")
    m = manifest["metrics"]
    print(f"ensemble test accuracy {m['accuracy']:.4f}  nll {m['nll_uncalibrated']:.4f}  "
          f"ece {m['ece_uncalibrated']:.4f}  (members mean accuracy {m['members_mean_accuracy']:.4f})")
    print(f"calibrated (T={manifest['temperature']:.3f}, as served): nll {m['nll']:.4f}  ece {m['ece']:.4f}")


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:  # DDP: process 0 speaks for the run
        level = max(level, logging.WARNING)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("snapserve.trainer").setLevel(level)


def _subcommand(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand `args` ran (`trainer train`), else `parser`."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        chosen = getattr(args, action.dest, None) if action.dest != argparse.SUPPRESS else None
        for name, sub in action.choices.items():
            if name == chosen or sub.get_default("handler") is getattr(args, "handler", None):
                return sub
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse's own error, with the nearest flag for a typo (--epoch: --epochs)
        flags = sorted({flag for action in _subcommand(parser, args)._actions
                        for flag in action.option_strings})
        hints = [f"{word} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
                 word.split("=")[0], flags, n=1)) else word for word in extra]
        parser.exit(2, f"trainer: error: unrecognized arguments: {' '.join(hints)}\n")
    args.argv = argv
    _configure_logging(args.verbose, args.quiet)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    except TrainerError as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 1
