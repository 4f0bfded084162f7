"""`trainer compare`: every method at the same epoch budget, over seeds, in one table.

    trainer compare --dataset mnist1d --arch cnn1d --budget 60 --seeds 0 1 2 --out-file table.md

Each (method, seed) is an ordinary `trainer train` run (its own model version, written to
--out or a temporary repository that is removed afterwards). The table reports the mean ± the
sample standard deviation over seeds of the test metrics the manifest records: accuracy, NLL and
ECE before and after temperature scaling (fitted on the validation split, never on test), the
members' mean accuracy, and the training time (the loop alone, without evaluation or export).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from snapserve.trainer.config import TrainConfig
from snapserve.trainer.run import run_training

__all__ = ["COLUMNS", "format_table", "run_compare"]

logger = logging.getLogger(__name__)

# (header, manifest field, digits); "train_seconds" comes from the manifest's training summary.
COLUMNS = (
    ("accuracy", "accuracy", 4),
    ("NLL", "nll_uncalibrated", 4),
    ("NLL, T-scaled", "nll", 4),
    ("ECE", "ece_uncalibrated", 4),
    ("ECE, T-scaled", "ece", 4),
    ("members' mean acc.", "members_mean_accuracy", 4),
    ("train time (s)", "train_seconds", 1),
)


def _cell(values: Sequence[float], digits: int) -> str:
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per method, mean ± sample std over its runs."""
    header = ["method", "members", *[c[0] for c in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in results.items():
        members = sorted({r["members"] for r in runs})
        row = [method, "/".join(map(str, members))]
        row += [_cell([r[field] for r in runs], digits) for _, field, digits in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _row(manifest: dict[str, Any]) -> dict[str, Any]:
    metrics = manifest["metrics"]
    return {**{field: metrics[field] for _, field, _ in COLUMNS if field in metrics},
            "train_seconds": manifest["training"]["train_seconds"], "members": len(manifest["members"])}


def run_compare(args: argparse.Namespace, make_config: Callable[..., TrainConfig]) -> str:
    """Trains args.methods x args.seeds at args.budget epochs; prints and returns the table."""
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="trainer-compare-"))
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for method in args.methods:
            for seed in args.seeds:
                base = make_config(args, out=str(out), method=method, epochs=args.budget, seed=seed)
                config = make_config(args, out=str(out), method=method, epochs=args.budget, seed=seed,
                                     name=f"{base.name}-{method}")
                result = run_training(config)
                assert result is not None, "trainer compare runs in one process"
                row = _row(result.manifest)
                results.setdefault(method, []).append(row)
                logger.info("compare: %s seed %d: accuracy %.4f  nll %.4f  ece %.4f  %.1f s", method, seed,
                            row["accuracy"], row["nll_uncalibrated"], row["ece_uncalibrated"], row["train_seconds"])
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    first = make_config(args, out=str(out), method=args.methods[0], epochs=args.budget, seed=args.seeds[0])
    title = (f"{first.dataset}, {first.arch}, budget {args.budget} epochs, seeds {' '.join(map(str, args.seeds))}, "
             f"lr {first.lr}, batch {first.batch_size}; mean ± sample std over seeds, test split")
    table = f"{title}\n\n{format_table(results)}\n"
    print(table)
    if args.out_file:
        Path(args.out_file).write_text(table)
    return table
