"""`trainer compare`: every method against the single model, paired by seed, with intervals.

    trainer compare --out-dir runs/compare            # the recorded regime (see PROFILES)
    trainer compare --quick --out-dir runs/compare    # the same code path in about a minute

For each budget and seed, every method trains once through the one loop (`train.py`, nothing
exported); the members are scored on the validation, test and out-of-distribution inputs with
the report's own functions (`report.py`). Deep ensembles are M `single` runs with seeds
s, s+1000, ..., s+1000(M-1): `deep` trains each for the whole budget (M times the cost: the
papers' upper bound), `deep-1x` each for budget/M epochs (the same cost as every other row).
Member 0 of `deep` at seed s IS the single model of seed s, and single runs are cached by
(seed, epochs), so nothing trains twice. SWA, SWAG and SWAG-Diag share one training run: their
schedule and the weights they average are the same; only the members drawn from the averages
differ.

Statistics: seed s means the same initial weights and the same data order for every method, so
each method's difference to `single` is taken per seed, and its 95% interval is a percentile
bootstrap over seeds of the mean paired difference. A difference is called significant only
where that interval excludes 0, and only with at least 5 seeds. With 5 seeds a bootstrap interval is, if anything, too narrow
(it cannot see beyond the 5 values), so a marginal call deserves more seeds.

Everything is written after every run (`runs.json`, `runs.csv`, `table.md`, the plots), so an
interrupted comparison leaves every finished (method, seed) behind.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapserve.trainer.collectors import AveragingCollector, Member
from snapserve.trainer.config import SWAG_SCALES, TrainConfig
from snapserve.trainer.datasets import OOD_DESCRIPTION, Dataset, load_dataset
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.publish import member_probabilities
from snapserve.trainer.report import evaluate_ensemble
from snapserve.trainer.train import TrainedEnsemble, member_models, resolve_device, seed_everything, train_ensemble

__all__ = ["COMPARE_METHODS", "PROFILES", "bootstrap_interval", "format_table", "run_compare"]

logger = logging.getLogger(__name__)

COMPARE_METHODS = ("single", "snapshot", "fge", "swa", "swag", "swag-diag", "deep", "deep-1x")
_SWA_FAMILY = ("swa", "swag", "swag-diag")
_DEEP_SEED_STRIDE = 1000  # deep ensemble member i of seed s trains with seed s + 1000 i
_OOD_EXAMPLES = 2000  # out-of-distribution inputs scored per ensemble (an AUROC needs no more)
# Below this many paired seeds a bootstrap interval says little (two values resample to three
# means): the table shows the interval but calls nothing significant.
MIN_SEEDS = 5

# The settings `trainer compare` runs when no flag says otherwise. "full" is the regime recorded
# in benchmarks/RESULTS.md, chosen by measurement (docs/trainer.md): MNIST-1D with 1,000 training
# examples, a 10,000-example test split, and a cnn1d of 106k parameters that overfits them.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"dataset": "mnist1d:train=1000,val=500,test=10000", "arch": "cnn1d", "width": 128,
             "budget": 100, "budgets": [20, 50, 100], "seeds": [0, 1, 2, 3, 4], "deep_members": 5,
             "keep_last": 3, "methods": list(COMPARE_METHODS), "threads": 1},
    "quick": {"dataset": "mnist1d:train=300,val=200,test=1000", "arch": "cnn1d", "width": 8,
              "budget": 10, "budgets": [10], "seeds": [0, 1], "deep_members": 2,
              "keep_last": 3, "methods": list(COMPARE_METHODS), "threads": 1},
}
# threads 1: models this small gain little from a second thread, and on a busy machine two
# OpenMP threads spin waiting for each other, which can make a run many times slower.

# (column, key of a run's row, digits, lower is better); the table's metrics.
METRICS = (
    ("accuracy", "accuracy", 4, False),
    ("NLL", "nll", 4, True),
    ("ECE", "ece", 4, True),
    ("NLL, T-scaled", "nll_calibrated", 4, True),
)
SCORE_COLUMNS = (
    ("errors AUROC: MI", "error_auroc_mutual_information"),
    ("errors AUROC: votes", "error_auroc_vote_disagreement"),
    ("errors AUROC: entropy", "error_auroc_predictive_entropy"),
    ("OOD AUROC: MI", "ood_auroc_mutual_information"),
    ("OOD AUROC: entropy", "ood_auroc_predictive_entropy"),
    ("acc., 5% refused (entropy)", "accuracy_refuse_5_predictive_entropy"),
    ("acc., 5% refused (MI)", "accuracy_refuse_5_mutual_information"),
)


@dataclass(frozen=True)
class Probabilities:
    """One ensemble's members on the evaluation inputs, [N, M, C] each."""

    val: np.ndarray
    test: np.ndarray
    ood: np.ndarray
    train_seconds: float

    def stacked(self, *others: Probabilities) -> Probabilities:
        """This ensemble's members followed by the others' (a deep ensemble)."""
        parts = (self, *others)
        return Probabilities(*(np.concatenate([getattr(p, k) for p in parts], axis=1) for k in ("val", "test", "ood")),
                             train_seconds=sum(p.train_seconds for p in parts))


def bootstrap_interval(values: Sequence[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of `values` (per-seed differences)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


class Comparison:
    """Trains, evaluates and records the runs of one `trainer compare`."""

    def __init__(self, args: argparse.Namespace, make_config: Callable[..., TrainConfig]) -> None:
        self.args = args
        self.make_config = make_config
        self.out_dir = Path(args.out_dir)
        self.dataset = load_dataset(args.dataset)
        self.device = resolve_device(args.device)
        self.inputs = {"val": self.dataset.val.x, "test": self.dataset.test.x,
                       "ood": self.dataset.ood_inputs()[:_OOD_EXAMPLES]}
        self._singles: dict[tuple[int, int], Probabilities] = {}
        self.rows: list[dict[str, Any]] = []

    def config(self, method: str, epochs: int, seed: int) -> TrainConfig:
        keep = self.args.keep_last if method == "snapshot" else None
        return self.make_config(self.args, out=str(self.out_dir), method=method, epochs=epochs, seed=seed,
                                keep_last=keep, plots=False)

    def _train(self, config: TrainConfig) -> tuple[TrainedEnsemble, list[torch.nn.Module]]:
        seed_everything(config.seed)
        ensemble = train_ensemble(config, self.dataset, self.device, record_epochs=False)
        return ensemble, ensemble.models

    def _probabilities(self, models: list[torch.nn.Module], train_seconds: float) -> Probabilities:
        probs = {k: member_probabilities(models, self.dataset, x, self.device) for k, x in self.inputs.items()}
        return Probabilities(**probs, train_seconds=train_seconds)

    def single(self, seed: int, epochs: int) -> Probabilities:
        """A single model's probabilities, trained once per (seed, epochs)."""
        if (seed, epochs) not in self._singles:
            ensemble, models = self._train(self.config("single", epochs, seed))
            self._singles[seed, epochs] = self._probabilities(models, ensemble.train_seconds)
        return self._singles[seed, epochs]

    def deep(self, seed: int, epochs: int) -> Probabilities:
        members = [self.single(seed + _DEEP_SEED_STRIDE * i, epochs) for i in range(self.args.deep_members)]
        return members[0].stacked(*members[1:])

    def swa_family(self, seed: int, budget: int) -> dict[str, Probabilities]:
        """swa, swag and swag-diag from one SWAG run (the same schedule and averaged weights)."""
        config = self.config("swag", budget, seed)
        ensemble, models = self._train(config)
        collector = ensemble.method.collector
        assert isinstance(collector, AveragingCollector)
        template = models[0]  # loaded with each member's weights in turn, then restored
        drawn: dict[str, list[Member]] = {
            "swag": ensemble.members,
            "swa": collector.average(template),
            "swag-diag": collector.draw(template, len(ensemble.members), SWAG_SCALES["swag-diag"], low_rank=False),
        }
        return {name: self._probabilities(models if name == "swag" else
                                          member_models(config, self.dataset, members, self.device),
                                          ensemble.train_seconds)
                for name, members in drawn.items()}

    def method(self, name: str, seed: int, budget: int) -> Probabilities:
        ensemble, models = self._train(self.config(name, budget, seed))
        return self._probabilities(models, ensemble.train_seconds)

    def run(self) -> None:
        methods = self.args.methods
        budgets = [self.args.budget] + [b for b in sorted(set(self.args.budgets), reverse=True) if b != self.args.budget]
        for budget in budgets:
            for seed in self.args.seeds:
                done: dict[str, Probabilities] = {}
                for name in methods:
                    began = time.perf_counter()
                    if name == "single":
                        done[name] = self.single(seed, budget)
                    elif name == "deep":
                        done[name] = self.deep(seed, budget)
                    elif name == "deep-1x":
                        done[name] = self.deep(seed, budget // self.args.deep_members)
                    elif name in _SWA_FAMILY:
                        if name not in done:
                            done.update({k: v for k, v in self.swa_family(seed, budget).items() if k in methods})
                    else:
                        done[name] = self.method(name, seed, budget)
                    self.record(name, seed, budget, done[name], time.perf_counter() - began)
                    if name == "snapshot" and self.args.keep_last:
                        self.record(f"snapshot (last {self.args.keep_last})", seed, budget, done[name], 0.0,
                                    exported=self.args.keep_last)

    def record(self, name: str, seed: int, budget: int, probs: Probabilities, seconds: float,
               exported: int | None = None) -> None:
        row = run_row(probs, self.dataset, exported)
        row.update(method=name, seed=seed, budget=budget, wall_seconds=round(seconds, 2))
        self.rows.append(row)
        logger.info("compare: budget %d seed %d %-22s accuracy %.4f  nll %.4f  errors AUROC (MI) %s  %.0f s",
                    budget, seed, name, row["accuracy"], row["nll"], row["error_auroc_mutual_information"], seconds)
        write_outputs(self.out_dir, self.rows, self.title(), self.args.budget)

    def title(self) -> str:
        a = self.args
        return (f"{a.dataset}, {a.arch} (width {a.width}), budget {a.budget} epochs, seeds "
                f"{' '.join(map(str, a.seeds))}, lr {a.lr}, batch {a.batch_size}, deep ensembles of "
                f"{a.deep_members}; test split ({len(self.dataset.test)} examples); OOD: {OOD_DESCRIPTION} "
                f"({len(self.inputs['ood'])})")


def run_row(probs: Probabilities, dataset: Dataset, exported: int | None = None) -> dict[str, Any]:
    """The per-seed numbers of one ensemble: the table's metrics, the scores at work, the
    ensemble by size, and the members' mean accuracy."""
    count = exported or probs.test.shape[1]
    evaluation = evaluate_ensemble(probs.val, dataset.val.y, probs.test, dataset.test.y, exported=count,
                                   ood_probs=probs.ood)
    test = evaluation["test"]
    row: dict[str, Any] = {
        "members": count,
        **{k: test["ensemble"][k] for k in ("accuracy", "nll", "ece", "brier")},
        "nll_calibrated": test["ensemble_calibrated"]["nll"],
        "ece_calibrated": test["ensemble_calibrated"]["ece"],
        "temperature": evaluation["temperature"],
        "members_mean_accuracy": test["members_mean"]["accuracy"],
        "mean_pairwise_disagreement": test["mean_pairwise_disagreement"],
        "train_seconds": round(probs.train_seconds, 2),
    }
    uncertainty = test["uncertainty"]
    for kind in ("error_auroc", "ood_auroc"):
        row.update({f"{kind}_{score}": value for score, value in uncertainty[kind].items()})
    for score, curve in uncertainty["rejection"].items():
        for fraction, accuracy in zip(curve["fraction"], curve["accuracy"]):
            row[f"accuracy_refuse_{round(100 * fraction)}_{score}"] = accuracy
    order = "backward" if exported else "forward"  # last m for snapshot (last m); else training order
    row["by_size_accuracy"] = [m["accuracy"] for m in test["ensemble_by_size"][order]]
    row["by_size_nll"] = [m["nll"] for m in test["ensemble_by_size"][order]]
    return row


def paired(rows: list[dict[str, Any]], method: str, key: str, budget: int) -> dict[str, Any]:
    """Mean and sample std of `key` over seeds, and its per-seed difference to single with the
    bootstrap interval (over the seeds both have)."""
    mine = {r["seed"]: r[key] for r in rows if r["method"] == method and r["budget"] == budget and r[key] is not None}
    base = {r["seed"]: r[key] for r in rows if r["method"] == "single" and r["budget"] == budget}
    values = list(mine.values())
    out: dict[str, Any] = {"n": len(values), "mean": float(np.mean(values)) if values else float("nan"),
                           "std": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")}
    diffs = [mine[s] - base[s] for s in sorted(mine) if s in base]
    if method != "single" and len(diffs) > 1:
        low, high = bootstrap_interval(diffs)
        out.update(diff=float(np.mean(diffs)), low=low, high=high, seeds=len(diffs),
                   significant=bool(len(diffs) >= MIN_SEEDS and (low > 0 or high < 0)))
    return out


def _diff_cell(stats: dict[str, Any], digits: int, lower_better: bool) -> str:
    if "diff" not in stats:
        return "-"
    mark = ""
    if stats["significant"]:
        better = stats["diff"] < 0 if lower_better else stats["diff"] > 0
        mark = " **better**" if better else " **worse**"
    return f"{stats['diff']:+.{digits}f} [{stats['low']:+.{digits}f}, {stats['high']:+.{digits}f}]{mark}"


def format_table(rows: list[dict[str, Any]], budget: int) -> str:
    """Two markdown tables at `budget`: metrics with paired differences to single, and the
    uncertainty scores at work (mean ± sample std over seeds)."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["budget"] == budget))
    header = ["method", "members", "seeds"]
    for name, *_ in METRICS:
        header += [name, f"Δ {name} vs single [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        members = sorted({r["members"] for r in rows if r["method"] == method and r["budget"] == budget})
        first = paired(rows, method, "accuracy", budget)
        cells = [method, "/".join(map(str, members)), str(first["n"])]
        for _, key, digits, lower in METRICS:
            stats = paired(rows, method, key, budget)
            cells += [_mean_std(stats, digits), _diff_cell(stats, digits, lower)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | " + " | ".join(c for c, _ in SCORE_COLUMNS) + " |",
              "|---|" + "---|" * len(SCORE_COLUMNS)]
    for method in methods:
        cells = [method]
        for _, key in SCORE_COLUMNS:
            cells.append(_mean_std(paired(rows, method, key, budget), 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(stats: dict[str, Any], digits: int) -> str:
    if not stats["n"]:
        return "-"
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], title: str, budget: int) -> None:
    """runs.json (every per-seed value), runs.csv (the scalar ones), table.md and the plots."""
    from snapserve.trainer.plots import plot_compare

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "runs.json").write_text(json.dumps({"title": title, "runs": rows}, indent=1) + "\n")
    scalar = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    with (out_dir / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = (f"{title}\n\nMean ± sample std over seeds; Δ: mean per-seed difference to single (same seed: same "
             f"initial weights and data order) with its 95% bootstrap interval; **better**/**worse** only where "
             f"the interval excludes 0 (and never with fewer than {MIN_SEEDS} seeds).\n\n{format_table(rows, budget)}\n")
    (out_dir / "table.md").write_text(table)
    plot_compare(out_dir, rows, budget)


def resolve_profile(args: argparse.Namespace) -> argparse.Namespace:
    """Fills every compare setting left unset from the profile (--quick, else full)."""
    profile = PROFILES["quick" if args.quick else "full"]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.budget not in args.budgets:
        args.budgets = [*args.budgets, args.budget]
    if args.keep_last is not None and args.keep_last < 1:
        raise ConfigError(f"keep_last must be >= 1, got {args.keep_last}")
    if args.deep_members < 1:
        raise ConfigError(f"deep_members must be >= 1, got {args.deep_members}")
    if "deep-1x" in args.methods and min(args.budgets) < args.deep_members:
        raise ConfigError(f"deep-1x trains {args.deep_members} models of budget/{args.deep_members} epochs: "
                          f"every budget must be >= deep_members, got {min(args.budgets)}")
    if "single" not in args.methods:
        args.methods = ["single", *args.methods]  # the baseline every difference is taken against
    return args


def run_compare(args: argparse.Namespace, make_config: Callable[..., TrainConfig]) -> str:
    """Runs the comparison; prints and returns the table."""
    args = resolve_profile(args)
    torch.set_num_threads(args.threads)
    comparison = Comparison(args, make_config)
    comparison.run()
    table = (comparison.out_dir / "table.md").read_text()
    print(table)
    return table
