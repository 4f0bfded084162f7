"""`trainer compare`: every method against the papers' baselines, paired by seed, with intervals.

    trainer compare --out-dir runs/compare            # the recorded regime (see PROFILES)
    trainer compare --quick --out-dir runs/compare    # the same code path in about a minute
    trainer compare --methods single-step snapshot snapshot:lr=0.2,members=3 --out-dir runs/sweep

A method is a name with optional settings of its own (`snapshot:lr=0.2,members=3`). For each
budget and seed, every method trains once through the one loop (`train.py`, nothing exported);
the members are scored on the validation, test and out-of-distribution inputs with the report's
own functions (`report.py`), once per member-selection rule (`selection.py`, on the validation
split), so `snapshot [greedy]` and `snapshot [all]` are one training run.

The baselines are each paper's own (ALGORITHMS.md section 9): `single-step` (the SSE paper's
step decay; every Δ of the first table is taken against it), `single-linear` (the FGE/SWA
reference schedule over the whole budget: FGE's pre-training is this schedule, so FGE's run is
the same weights up to its start) and `single-cosine` (one cosine cycle over the budget, SSE's
single-cycle baseline: snapshot with M = 1). `fge (first member)` is FGE's own first member, so
what FGE's schedule bought and what its ensembling bought show apart. Deep ensembles are M
`single-step` runs with seeds s, s+1000, ...: `deep` trains each for the whole budget (M times the
cost: the papers' upper bound), `deep-1x` each for budget/M epochs (the same cost as every other
row). SWA, SWAG and SWAG-Diag share one training run: their schedule and the weights they average
are the same; only the members drawn from the averages differ.

Statistics: seed s means the same initial weights and the same data order for every method, so
each difference to a baseline is taken per seed. Its 95% interval is the paired t-interval
(mean ± t(0.975, n-1) s/sqrt(n)); the percentile bootstrap over seeds stands beside it, and with
5 seeds it is too narrow (it cannot see beyond the 5 values). A difference is called significant
only where the t-interval excludes 0, and only with at least MIN_SEEDS seeds.

Everything is written after every run (`runs.json`, `runs.csv`, `table.md`, the plots), so an
interrupted comparison leaves every finished (method, seed) behind.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

__all__ = ["BASELINE", "COMPARE_METHODS", "PROFILES", "MethodSpec", "bootstrap_interval", "format_table",
           "parse_method", "plot_cycles", "run_compare", "t_interval"]

logger = logging.getLogger(__name__)

BASELINE = "single-step"  # every difference of the first table is to it (the SSE paper's baseline)
COMPARE_METHODS = ("single-step", "single-linear", "single-cosine", "snapshot", "fge", "swa", "swag", "swag-diag",
                   "deep", "deep-1x")
_SINGLE_SCHEDULES = {"single-step": "step", "single-linear": "linear", "single-cosine": "cosine"}
_ALIASES = {"single": "single-step"}
_SWA_FAMILY = ("swa", "swag", "swag-diag")
_MULTI = ("snapshot", "fge", "swag", "swag-diag")  # methods with several members to select from
_DEEP_SEED_STRIDE = 1000  # deep ensemble member i of seed s trains with seed s + 1000 i
_OOD_EXAMPLES = 2000  # out-of-distribution inputs scored per ensemble (an AUROC needs no more)
# Below this many paired seeds an interval says little: the table shows it but calls nothing
# significant.
MIN_SEEDS = 5
_SPEC_KEYS = {"lr": float, "members": int}

# The settings `trainer compare` runs when no flag says otherwise. "full" is the regime recorded
# in benchmarks/RESULTS.md, chosen by measurement (docs/trainer.md, "Comparing methods"):
# MNIST-1D with 4,000 training examples, a 10,000-example test split, a cnn1d of 28k parameters.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"dataset": "mnist1d:train=4000,val=500,test=10000", "arch": "cnn1d", "width": 64,
             "budget": 80, "budgets": [80], "seeds": [0, 1, 2, 3, 4], "deep_members": 5,
             "keep_last": [2, 3], "selections": ["all", "last-k", "greedy"],
             "methods": [m for m in COMPARE_METHODS if m != "deep"], "threads": 1},
    "quick": {"dataset": "mnist1d:train=300,val=200,test=1000", "arch": "cnn1d", "width": 8,
              "budget": 10, "budgets": [10], "seeds": [0, 1], "deep_members": 2,
              "keep_last": [3], "selections": ["all", "last-k", "greedy"],
              "methods": list(COMPARE_METHODS), "threads": 1},
}
# threads 1: models this small gain little from a second thread, and on a busy machine two
# OpenMP threads spin waiting for each other, which can make a run many times slower.

# The second table: each method against its own paper's baseline (row prefix, baselines).
PAPER_BASELINES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("snapshot", ("single-step", "single-cosine")),
    ("fge", ("single-linear", "fge (first member)")),
    ("swa", ("single-linear",)),
    ("swag", ("single-linear",)),
    ("deep-1x", ("single-step",)),
)

# (column, key of a run's row, digits, lower is better); the table's metrics.
METRICS = (
    ("accuracy", "accuracy", 4, False),
    ("NLL", "nll", 4, True),
    ("ECE", "ece", 4, True),
    ("NLL, T-scaled", "nll_calibrated", 4, True),
)
# Scores that are 0 everywhere with one distinct member: their columns stay empty there.
_MEMBER_SCORES = ("mutual_information", "vote_disagreement")
SCORE_COLUMNS = (
    ("errors AUROC: MI", "error_auroc_mutual_information"),
    ("errors AUROC: votes", "error_auroc_vote_disagreement"),
    ("errors AUROC: entropy", "error_auroc_predictive_entropy"),
    ("OOD AUROC: MI", "ood_auroc_mutual_information"),
    ("OOD AUROC: entropy", "ood_auroc_predictive_entropy"),
    ("acc., 5% refused (entropy) [refused]", "accuracy_refuse_5_predictive_entropy"),
    ("acc., 5% refused (MI) [refused]", "accuracy_refuse_5_mutual_information"),
)


@dataclass(frozen=True)
class MethodSpec:
    """`name[:key=value,...]`: a compare method and its own settings (lr, members)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.options) if self.options else "")

    def overrides(self) -> dict[str, Any]:
        return dict(self.options)


def parse_method(text: str) -> MethodSpec:
    """`snapshot:lr=0.2,members=3` -> MethodSpec; the message names a bad key or value."""
    name, _, rest = text.partition(":")
    name = _ALIASES.get(name, name)
    if name not in COMPARE_METHODS:
        raise ConfigError(f"compare method {text!r}: the name must be one of {COMPARE_METHODS}")
    options = []
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in _SPEC_KEYS:
            raise ConfigError(f"compare method {text!r}: unknown setting {key!r}; use {sorted(_SPEC_KEYS)}")
        try:
            options.append((key, _SPEC_KEYS[key](value)))
        except ValueError:
            raise ConfigError(f"compare method {text!r}: {key} must be a number, got {value!r}") from None
    return MethodSpec(name, tuple(options))


@dataclass(frozen=True)
class Probabilities:
    """One ensemble's members on the evaluation inputs, [N, M, C] each."""

    val: np.ndarray
    test: np.ndarray
    ood: np.ndarray
    train_seconds: float
    steps_per_epoch: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # per-run facts for the row (steps per cycle)

    def stacked(self, *others: Probabilities) -> Probabilities:
        """This ensemble's members followed by the others' (a deep ensemble)."""
        parts = (self, *others)
        return Probabilities(*(np.concatenate([getattr(p, k) for p in parts], axis=1) for k in ("val", "test", "ood")),
                             train_seconds=sum(p.train_seconds for p in parts), steps_per_epoch=self.steps_per_epoch)

    def first(self) -> Probabilities:
        """The first member alone."""
        return Probabilities(self.val[:, :1], self.test[:, :1], self.ood[:, :1], self.train_seconds,
                             self.steps_per_epoch)


def bootstrap_interval(values: Sequence[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of `values` (per-seed differences)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The paired t-interval of the mean of `values`: mean ± t(1-α/2, n-1) · s / sqrt(n)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * float(values.std(ddof=1)) / math.sqrt(len(values))
    mean = float(values.mean())
    return mean - half, mean + half


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
        self._runs: dict[tuple[MethodSpec, int, int], Probabilities] = {}
        self.rows: list[dict[str, Any]] = []

    def config(self, spec: MethodSpec, epochs: int, seed: int) -> TrainConfig:
        overrides = spec.overrides()
        if spec.name in _SINGLE_SCHEDULES:
            overrides.update(method="single", single_schedule=_SINGLE_SCHEDULES[spec.name])
        elif spec.name in ("deep", "deep-1x"):
            overrides.update(method="single")
            overrides.pop("members", None)  # deep: M is --deep-members
        else:
            overrides.setdefault("method", "swag" if spec.name in _SWA_FAMILY else spec.name)
        return self.make_config(self.args, out=str(self.out_dir), epochs=epochs, seed=seed, keep_last=None,
                                selection=None, plots=False, **overrides)

    def _train(self, config: TrainConfig) -> tuple[TrainedEnsemble, list[torch.nn.Module]]:
        seed_everything(config.seed)
        ensemble = train_ensemble(config, self.dataset, self.device, record_epochs=False)
        return ensemble, ensemble.models

    def _probabilities(self, models: list[torch.nn.Module], ensemble: TrainedEnsemble) -> Probabilities:
        probs = {k: member_probabilities(models, self.dataset, x, self.device) for k, x in self.inputs.items()}
        return Probabilities(**probs, train_seconds=ensemble.train_seconds, steps_per_epoch=ensemble.steps_per_epoch)

    def trained(self, spec: MethodSpec, seed: int, epochs: int) -> Probabilities:
        """One training run's member probabilities, trained once per (spec, seed, epochs)."""
        key = (spec, seed, epochs)
        if key not in self._runs:
            config = self.config(spec, epochs, seed)
            ensemble, models = self._train(config)
            probs = self._probabilities(models, ensemble)
            probs.info["lr"] = config.lr
            if config.method == "snapshot":
                full = epochs // (config.members or 1) * ensemble.steps_per_epoch
                probs.info["steps_per_cycle"] = full
            self._runs[key] = probs
        return self._runs[key]

    def deep(self, spec: MethodSpec, seed: int, epochs: int) -> Probabilities:
        single = MethodSpec("single-step", tuple(o for o in spec.options if o[0] != "members"))
        members = [self.trained(single, seed + _DEEP_SEED_STRIDE * i, epochs) for i in range(self.args.deep_members)]
        return members[0].stacked(*members[1:])

    def swa_family(self, spec: MethodSpec, seed: int, budget: int) -> dict[str, Probabilities]:
        """swa, swag and swag-diag from one SWAG run (the same schedule and averaged weights)."""
        config = self.config(MethodSpec("swag", spec.options), budget, seed)
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
                                          member_models(config, self.dataset, members, self.device), ensemble)
                for name, members in drawn.items()}

    def run(self) -> None:
        specs = [parse_method(m) for m in self.args.methods]
        budgets = [self.args.budget] + [b for b in sorted(set(self.args.budgets), reverse=True) if b != self.args.budget]
        for budget in budgets:
            for seed in self.args.seeds:
                family: dict[str, Probabilities] = {}
                for spec in specs:
                    began = time.perf_counter()
                    if spec.name == "deep":
                        probs = self.deep(spec, seed, budget)
                    elif spec.name == "deep-1x":
                        probs = self.deep(spec, seed, budget // self.args.deep_members)
                    elif spec.name in _SWA_FAMILY:
                        if spec.name not in family:
                            family = self.swa_family(spec, seed, budget)
                        probs = family[spec.name]
                    else:
                        probs = self.trained(spec, seed, budget)
                    seconds = time.perf_counter() - began
                    self.record_all(spec, seed, budget, probs, seconds)

    def record_all(self, spec: MethodSpec, seed: int, budget: int, probs: Probabilities, seconds: float) -> None:
        """One row per member-selection rule for methods with several members, else one row."""
        if spec.name not in _MULTI:
            self.record(spec.label, seed, budget, probs, seconds)
            return
        for rule in self.args.selections:
            for k in (self.args.keep_last if rule == "last-k" else [None]):
                if k is not None and k >= probs.test.shape[1]:
                    continue  # last-k of at most k members is `all`
                name = f"{spec.label} [{'last-' + str(k) if k else rule}]"
                self.record(name, seed, budget, probs, seconds, rule, k)
                seconds = 0.0  # the training is counted once, on the first row
        if spec.name == "fge":
            self.record(f"{spec.label} (first member)", seed, budget, probs.first(), 0.0)

    def record(self, name: str, seed: int, budget: int, probs: Probabilities, seconds: float,
               rule: str = "all", k: int | None = None) -> None:
        row = run_row(probs, self.dataset, rule, k)
        row.update(method=name, seed=seed, budget=budget, wall_seconds=round(seconds, 2))
        self.rows.append(row)
        logger.info("compare: budget %d seed %d %-28s accuracy %.4f  nll %.4f  members %s  %.0f s",
                    budget, seed, name, row["accuracy"], row["nll"], row["chosen"], seconds)
        write_outputs(self.out_dir, self.rows, self.title(), self.args.budget)

    def title(self) -> str:
        a = self.args
        return (f"{a.dataset}, {a.arch} (width {a.width}), budget {a.budget} epochs, seeds "
                f"{' '.join(map(str, a.seeds))}, lr {a.lr or 'per method (snapshot 0.2, else 0.1)'}, batch "
                f"{a.batch_size}, deep ensembles of "
                f"{a.deep_members}; test split ({len(self.dataset.test)} examples); OOD: {OOD_DESCRIPTION} "
                f"({len(self.inputs['ood'])})")


def run_row(probs: Probabilities, dataset: Dataset, rule: str = "all", k: int | None = None) -> dict[str, Any]:
    """The per-seed numbers of one ensemble: the table's metrics, the scores at work (with the
    fraction each threshold refused), the members chosen on the validation split, every
    collected member's accuracy and their disagreement (the papers' premise), and the ensemble
    by size."""
    evaluation = evaluate_ensemble(probs.val, dataset.val.y, probs.test, dataset.test.y, selection=rule, k=k,
                                   ood_probs=probs.ood)
    test, choice = evaluation["test"], evaluation["selection"]
    row: dict[str, Any] = {
        "members": len(choice.members),
        "distinct_members": len(choice.distinct),
        "rule": rule, "k": k, "chosen": list(choice.members), "collected": choice.collected,
        "val_nll": choice.val_nll,
        **{key: test["ensemble"][key] for key in ("accuracy", "nll", "ece", "brier")},
        "nll_calibrated": test["ensemble_calibrated"]["nll"],
        "ece_calibrated": test["ensemble_calibrated"]["ece"],
        "temperature": evaluation["temperature"],
        "members_mean_accuracy": test["members_mean"]["accuracy"],
        "mean_pairwise_disagreement": test["mean_pairwise_disagreement"],
        "collected_pairwise_disagreement": test["collected_mean_pairwise_disagreement"],
        "members_accuracy": [m["accuracy"] for m in test["members"]],
        "train_seconds": round(probs.train_seconds, 2),
        **probs.info,
    }
    uncertainty = test["uncertainty"]
    one = len(choice.distinct) == 1  # MI and votes are 0 everywhere: their columns stay empty
    for kind in ("error_auroc", "ood_auroc"):
        row.update({f"{kind}_{score}": None if one and score in _MEMBER_SCORES else value
                    for score, value in uncertainty[kind].items()})
    for score, curve in uncertainty["rejection"].items():
        empty = one and score in _MEMBER_SCORES
        for fraction, accuracy, refused in zip(curve["fraction"], curve["accuracy"], curve["refused"]):
            row[f"accuracy_refuse_{round(100 * fraction)}_{score}"] = None if empty else accuracy
            row[f"refused_{round(100 * fraction)}_{score}"] = None if empty else refused
    row["by_size_accuracy"] = [m["accuracy"] for m in test["ensemble_by_size"]["forward"]]
    row["by_size_nll"] = [m["nll"] for m in test["ensemble_by_size"]["forward"]]
    return row


def paired(rows: list[dict[str, Any]], method: str, key: str, budget: int,
           baseline: str = BASELINE) -> dict[str, Any]:
    """Mean and sample std of `key` over seeds, and its per-seed difference to `baseline` with
    the t and bootstrap intervals (over the seeds both have)."""
    mine = {r["seed"]: r[key] for r in rows if r["method"] == method and r["budget"] == budget
            and r.get(key) is not None}
    base = {r["seed"]: r[key] for r in rows if r["method"] == baseline and r["budget"] == budget
            and r.get(key) is not None}
    values = list(mine.values())
    out: dict[str, Any] = {"n": len(values), "mean": float(np.mean(values)) if values else float("nan"),
                           "std": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")}
    diffs = [mine[s] - base[s] for s in sorted(mine) if s in base]
    if method != baseline and len(diffs) > 1:
        low, high = t_interval(diffs)
        boot_low, boot_high = bootstrap_interval(diffs)
        out.update(diff=float(np.mean(diffs)), low=low, high=high, boot_low=boot_low, boot_high=boot_high,
                   seeds=len(diffs), significant=bool(len(diffs) >= MIN_SEEDS and (low > 0 or high < 0)))
    return out


def _diff_cell(stats: dict[str, Any], digits: int, lower_better: bool) -> str:
    if "diff" not in stats:
        return "-"
    mark = ""
    if stats["significant"]:
        better = stats["diff"] < 0 if lower_better else stats["diff"] > 0
        mark = " **better**" if better else " **worse**"
    f = f"+.{digits}f"
    return (f"{stats['diff']:{f}} [{stats['low']:{f}}, {stats['high']:{f}}] "
            f"(boot. [{stats['boot_low']:{f}}, {stats['boot_high']:{f}}]){mark}")


def _members_cell(rows: list[dict[str, Any]], method: str, budget: int) -> str:
    mine = [r for r in rows if r["method"] == method and r["budget"] == budget]
    counts = sorted({(r["members"], r["distinct_members"]) for r in mine})
    return "/".join(str(m) if m == d else f"{m} ({d} distinct)" for m, d in counts)


def format_table(rows: list[dict[str, Any]], budget: int) -> str:
    """The markdown tables at `budget`: metrics with paired differences to single-step; each
    method against its own paper's baselines; the uncertainty scores at work (mean ± sample std
    over seeds, with the fraction refused); every member's accuracy and their disagreement."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["budget"] == budget))
    header = ["method", "members", "seeds"]
    for name, *_ in METRICS:
        header += [name, f"Δ {name} vs {BASELINE} [95% t] (bootstrap)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        first = paired(rows, method, "accuracy", budget)
        cells = [method, _members_cell(rows, method, budget), str(first["n"])]
        for _, key, digits, lower in METRICS:
            stats = paired(rows, method, key, budget)
            cells += [_mean_std(stats, digits), _diff_cell(stats, digits, lower)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_paper_table(rows, methods, budget), "", *_scores_table(rows, methods, budget),
              "", *_members_table(rows, methods, budget)]
    return "\n".join(lines)


def _paper_table(rows: list[dict[str, Any]], methods: list[str], budget: int) -> list[str]:
    lines = ["Each method against its own paper's baseline (same seeds):", "",
             "| method | baseline | Δ accuracy [95% t] (bootstrap) | Δ NLL [95% t] (bootstrap) |", "|---|---|---|---|"]
    for method in methods:
        for prefix, baselines in PAPER_BASELINES:
            if method.split(" ")[0].split(":")[0] != prefix or "(first member)" in method:
                continue
            for baseline in baselines:
                if baseline not in methods or baseline == method:
                    continue
                acc, nll = (paired(rows, method, key, budget, baseline) for key in ("accuracy", "nll"))
                lines.append(f"| {method} | {baseline} | {_diff_cell(acc, 4, False)} | {_diff_cell(nll, 4, True)} |")
    return lines


def _scores_table(rows: list[dict[str, Any]], methods: list[str], budget: int) -> list[str]:
    lines = ["| method | " + " | ".join(c for c, _ in SCORE_COLUMNS) + " |", "|---|" + "---|" * len(SCORE_COLUMNS)]
    for method in methods:
        cells = [method]
        for _, key in SCORE_COLUMNS:
            cell = _mean_std(paired(rows, method, key, budget), 3)
            if key.startswith("accuracy_refuse_") and cell != "-":
                refused = paired(rows, method, key.replace("accuracy_refuse_", "refused_"), budget)
                cell += f" [{refused['mean']:.1%}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _members_table(rows: list[dict[str, Any]], methods: list[str], budget: int) -> list[str]:
    """The premise of a snapshot ensemble: every member near the final model, yet different."""
    lines = ["Every collected member's test accuracy (mean over seeds, training order) and the mean pairwise "
             "disagreement among all collected members:", "",
             "| method | members' accuracy | pairwise disagreement | chosen on validation (seed 0) |", "|---|---|---|---|"]
    seen: set[str] = set()
    for method in methods:
        mine = [r for r in rows if r["method"] == method and r["budget"] == budget]
        base = method.split(" [")[0]
        if not mine or mine[0]["collected"] < 2 or "(first member)" in method:
            continue
        size = min(len(r["members_accuracy"]) for r in mine)
        accuracy = np.mean([r["members_accuracy"][:size] for r in mine], axis=0)
        shown = ", ".join(f"{a:.4f}" for a in accuracy) if base not in seen else "(as above)"
        seen.add(base)
        disagreement = np.mean([r["collected_pairwise_disagreement"] for r in mine])
        chosen = next((r["chosen"] for r in mine if r["seed"] == min(x["seed"] for x in mine)), [])
        lines.append(f"| {method} | {shown} | {disagreement:.4f} | {chosen} |")
    return lines


def _mean_std(stats: dict[str, Any], digits: int) -> str:
    if not stats["n"]:
        return "-"
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], title: str, budget: int) -> None:
    """runs.json (every per-seed value), runs.csv (the scalar ones), table.md and the plots."""
    from snapserve.trainer.plots import plot_compare, plot_cycle_length

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "runs.json").write_text(json.dumps({"title": title, "runs": rows}, indent=1) + "\n")
    scalar = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], list)))
    with (out_dir / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = (f"{title}\n\nMean ± sample std over seeds; Δ: mean per-seed difference to {BASELINE} (same seed: same "
             f"initial weights and data order) with its 95% paired t-interval and, in brackets after it, the "
             f"percentile-bootstrap interval; **better**/**worse** only where the t-interval excludes 0 (and never "
             f"with fewer than {MIN_SEEDS} seeds). `[rule]`: the members served, chosen on the validation split "
             f"(all, last-k, greedy). MI and vote columns are empty where one distinct member is served.\n\n"
             f"{format_table(rows, budget)}\n")
    (out_dir / "table.md").write_text(table)
    plot_compare(out_dir, rows, budget)
    plot_cycle_length(out_dir / "cycles.png", cycle_points(rows, budget))


def cycle_points(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Snapshot's paired Δ to single-step (accuracy, NLL) per snapshot variant and rule, with
    its steps per cycle: the data of cycles.png."""
    points = []
    for method in dict.fromkeys(r["method"] for r in rows if r["budget"] == budget):
        mine = [r for r in rows if r["method"] == method and r["budget"] == budget and "steps_per_cycle" in r]
        if not mine or not method.startswith("snapshot"):
            continue
        stats = {key: paired(rows, method, key, budget) for key in ("accuracy", "nll")}
        if all("diff" in s for s in stats.values()):
            points.append({"method": method, "steps_per_cycle": mine[0]["steps_per_cycle"],
                           "lr": mine[0].get("lr"), "rule": mine[0]["rule"], **stats})
    return points


def plot_cycles(run_files: Sequence[str | Path], out: str | Path, budget: int) -> list[dict[str, Any]]:
    """cycles.png over several comparisons' runs.json (the main table and the snapshot sweeps):
    their rows together, each (method, seed, budget) once (runs are deterministic per seed on
    one machine, so the baselines they share are the same numbers). Returns the points.

        python -c "from snapserve.trainer.compare import plot_cycles; plot_cycles(['a/runs.json', 'b/runs.json'], 'cycles.png', 80)"
    """
    from snapserve.trainer.plots import plot_cycle_length

    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    for file in run_files:
        data = json.loads(Path(file).read_text())
        # A row without its lr takes its method's own (`snapshot:lr=0.2`), else the comparison's --lr.
        given = re.search(r", lr ([0-9.]+),", data["title"])
        for row in data["runs"]:
            if row.get("lr") is None:
                own = re.search(r"lr=([0-9.]+)", row["method"])
                row["lr"] = float(own.group(1)) if own else float(given.group(1)) if given else None
            rows.setdefault((row["method"], row["seed"], row["budget"]), row)
    points = cycle_points(list(rows.values()), budget)
    plot_cycle_length(Path(out), points)
    return points


def resolve_profile(args: argparse.Namespace) -> argparse.Namespace:
    """Fills every compare setting left unset from the profile (--quick, else full)."""
    profile = PROFILES["quick" if args.quick else "full"]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.budget not in args.budgets:
        args.budgets = [*args.budgets, args.budget]
    if any(k < 1 for k in args.keep_last):
        raise ConfigError(f"keep_last must be >= 1, got {args.keep_last}")
    if args.deep_members < 1:
        raise ConfigError(f"deep_members must be >= 1, got {args.deep_members}")
    specs = [parse_method(m) for m in args.methods]  # refuses a bad name or setting before training
    if any(s.name == "deep-1x" for s in specs) and min(args.budgets) < args.deep_members:
        raise ConfigError(f"deep-1x trains {args.deep_members} models of budget/{args.deep_members} epochs: "
                          f"every budget must be >= deep_members, got {min(args.budgets)}")
    if MethodSpec(BASELINE) not in specs:
        specs = [MethodSpec(BASELINE), *specs]  # the baseline every difference is taken against
    args.methods = [s.label for s in specs]
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
