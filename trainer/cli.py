"""The `trainer` command (also `python -m trainer`).

    trainer train --method snapshot --dataset digits --arch cnn --epochs 40 --members 5 \
                  --lr 0.1 --seed 0 --out models --name digits

Progress goes to the log (stderr); the final summary is printed to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from trainer.config import TrainConfig
from trainer.data import BUILTIN_DATASETS
from trainer.errors import ConfigError, TrainerError
from trainer.methods import METHODS
from trainer.models import ARCHITECTURES
from trainer.train import run_training

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an ensemble and write a model version",
                              description="Train an ensemble and write it as a new model version.")
    p.add_argument("--out", required=True, help="model repository folder (created if missing)")
    p.add_argument("--name", default=None, help="model name in the repository (default: the dataset's name)")
    p.add_argument("--method", default=_DEFAULTS["method"], choices=sorted(METHODS),
                   help="snapshot: cosine cycles, a member per cycle; single: the one-model baseline "
                        "(default: %(default)s)")
    p.add_argument("--dataset", default=_DEFAULTS["dataset"],
                   help=f"built-in {sorted(BUILTIN_DATASETS)} or a .npz with x_train, y_train, x_test, "
                        "y_test [, x_val, y_val, classes] (default: %(default)s)")
    p.add_argument("--arch", default=_DEFAULTS["arch"], choices=sorted(ARCHITECTURES),
                   help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"],
                   help="the whole budget, all cycles together (default: %(default)s)")
    p.add_argument("--members", type=int, default=None,
                   help="ensemble members = cycles (default: 5 for snapshot, 1 for single)")
    p.add_argument("--lr", type=float, default=_DEFAULTS["lr"],
                   help="lr0, the LR at the start of each cycle (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=_DEFAULTS["momentum"], help="(default: %(default)s)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=_DEFAULTS["nesterov"],
                   help="Nesterov momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"], help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=_DEFAULTS["seed"],
                   help="training seed; the data split is fixed (default: %(default)s)")
    p.add_argument("--device", default=_DEFAULTS["device"],
                   help="auto, cpu, cuda, cuda:N or mps; auto = cuda if available (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: min(2, cores))")
    p.set_defaults(handler=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Train snapshot ensembles for snapserve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(subparsers)
    return parser


def _train(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    began = time.perf_counter()
    result = run_training(config)
    _print_summary(result.manifest, result.version_dir, time.perf_counter() - began)
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
    print(f"ensemble test accuracy {m['accuracy']:.4f}  nll {m['nll']:.4f}  ece {m['ece']:.4f}  "
          f"(members mean accuracy {m['members_mean_accuracy']:.4f})")


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("trainer").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    except TrainerError as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 1
