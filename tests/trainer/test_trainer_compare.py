"""`trainer compare`: every method paired by seed with the baselines, t- and bootstrap intervals,
a row per member-selection rule, per-seed files and plots; --quick runs the real thing small."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from snapserve.trainer.cli import main
from snapserve.trainer.compare import PROFILES, bootstrap_interval, format_table, parse_method, t_interval
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.datasets import load_dataset
from snapserve.trainer.publish import member_probabilities
from snapserve.trainer.metrics import accuracy
from snapserve.trainer.train import seed_everything, train_ensemble


def test_bootstrap_interval_of_paired_differences() -> None:
    assert bootstrap_interval([0.01] * 5) == pytest.approx((0.01, 0.01))
    low, high = bootstrap_interval([0.01, 0.02, 0.015, 0.012, 0.018])
    assert 0.01 <= low < 0.015 < high <= 0.02  # all positive: the interval excludes 0
    low, high = bootstrap_interval([0.02, -0.01, 0.015, -0.02, 0.005])
    assert low < 0 < high
    assert bootstrap_interval([1.0, 2.0, 4.0]) == bootstrap_interval([1.0, 2.0, 4.0])  # seeded


def test_t_interval_is_wider_than_the_bootstrap_over_five_seeds() -> None:
    diffs = [0.01, 0.02, 0.015, 0.012, 0.018]
    low, high = t_interval(diffs)
    # mean 0.015, s = 0.0041231, t(0.975, 4) = 2.7764: half-width 2.7764 * 0.0041231 / sqrt(5)
    assert (low, high) == pytest.approx((0.015 - 0.0051195, 0.015 + 0.0051195), abs=1e-6)
    boot_low, boot_high = bootstrap_interval(diffs)
    assert low < boot_low and boot_high < high


def test_a_method_takes_settings_of_its_own() -> None:
    spec = parse_method("snapshot:lr=0.2,members=3")
    assert spec.name == "snapshot" and spec.overrides() == {"lr": 0.2, "members": 3}
    assert spec.label == "snapshot:lr=0.2,members=3"
    assert parse_method("single").label == "single-step"  # the old name of the same baseline
    with pytest.raises(ConfigError, match="unknown setting 'momentum'"):
        parse_method("snapshot:momentum=0.5")
    with pytest.raises(ConfigError, match="must be one of"):
        parse_method("snapshots")


def rows(method: str, accuracies: list[float], nll: float = 0.5) -> list[dict]:
    return [{"method": method, "seed": s, "budget": 10, "members": 1, "distinct_members": 1, "collected": 1,
             "accuracy": a, "nll": nll, "ece": 0.01,
             "nll_calibrated": nll, **{k: 0.5 for k in ("error_auroc_mutual_information",
                                                         "error_auroc_vote_disagreement",
                                                         "error_auroc_predictive_entropy",
                                                         "ood_auroc_mutual_information",
                                                         "ood_auroc_predictive_entropy",
                                                         "accuracy_refuse_5_predictive_entropy",
                                                         "accuracy_refuse_5_mutual_information")}}
            for s, a in enumerate(accuracies)]


def test_significant_only_where_the_paired_interval_excludes_zero_over_five_seeds() -> None:
    base = [0.80, 0.85, 0.90, 0.82, 0.88]  # a seed spread far larger than the effects
    table = format_table(rows("single-step", base) + rows("steady", [a + 0.004 for a in base], nll=0.4)
                         + rows("mixed", [a + d for a, d in zip(base, (0.01, -0.01, 0.005, -0.004, 0.0))])
                         + rows("two", [0.81, 0.86], nll=0.4)[:2], budget=10)
    first = table.split("\n\n")[0]  # the metrics table (the second one holds the scores)
    lines = {line.split("|")[1].strip(): line for line in first.splitlines() if line.startswith("| ")}
    # +0.4 points on every seed: significant although the means are well inside one std
    assert "+0.0040 [+0.0040, +0.0040] (boot. [+0.0040, +0.0040]) **better**" in lines["steady"]
    assert "-0.1000 [-0.1000, -0.1000] (boot. [-0.1000, -0.1000]) **better**" in lines["steady"]  # NLL: lower
    assert "**" not in lines["mixed"].split("|")[5]  # the accuracy difference's t-interval spans 0
    assert "**" not in lines["two"]  # two seeds: an interval, but no verdict
    assert lines["single-step"].split("|")[5].strip() == "-"


def test_significance_follows_the_t_interval_where_the_bootstrap_would_call_it() -> None:
    base = [0.80, 0.85, 0.90, 0.82, 0.88]
    # Differences whose bootstrap interval excludes 0 while the t-interval does not.
    diffs = (0.012, 0.001, 0.010, -0.002, 0.011)
    assert bootstrap_interval(diffs)[0] > 0 > t_interval(diffs)[0]
    table = format_table(rows("single-step", base) + rows("close", [a + d for a, d in zip(base, diffs)]), budget=10)
    close = next(line for line in table.splitlines() if line.startswith("| close |"))
    assert "**" not in close.split("|")[5]


@pytest.mark.scripts
def test_quick_compare_pairs_every_method_with_the_baselines(tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["-q", "compare", "--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    quick = PROFILES["quick"]
    table = (tmp_path / "table.md").read_text()
    assert table.strip() in out.getvalue() and f"budget {quick['budget']} epochs" in table
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    methods = {r["method"] for r in runs}
    assert {"single-step", "single-linear", "single-cosine", "snapshot [all]", "snapshot [last-3]",
            "snapshot [greedy]", "fge (first member)", "swa", "swag [greedy]", "deep", "deep-1x"} <= methods
    for method in methods:  # every method once per seed: paired values, written per seed
        assert sorted(r["seed"] for r in runs if r["method"] == method) == quick["seeds"]
    with (tmp_path / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(runs)
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in ("budget.png", "members.png"))
    assert "| snapshot [greedy] | single-cosine |" in table and "| fge [all] | fge (first member) |" in table
    by = {(r["method"], r["seed"]): r for r in runs}
    for seed in quick["seeds"]:
        deep, single = by["deep", seed], by["single-step", seed]
        assert deep["members"] == quick["deep_members"] and deep["train_seconds"] > single["train_seconds"]
        assert deep["by_size_accuracy"][0] == single["accuracy"]  # member 0 is the single model of the seed
        assert by["deep-1x", seed]["members"] == quick["deep_members"]
        assert by["swag [all]", seed]["members"] == by["swag-diag [all]", seed]["members"] == 10
        assert by["snapshot [last-3]", seed]["chosen"] == [2, 3, 4]
        assert by["snapshot [all]", seed]["members_accuracy"] == by["snapshot [greedy]", seed]["members_accuracy"]
        for kind in ("error_auroc", "ood_auroc"):
            assert 0 <= by["swag [all]", seed][f"{kind}_mutual_information"] <= 1
            assert single[f"{kind}_mutual_information"] is None  # one member: MI is 0 everywhere, left empty
        assert 0 < by["swag [all]", seed]["refused_5_mutual_information"] <= 0.05 + 1e-9
    # swa comes from the SWAG run's average: exactly what a run of method swa trains
    dataset = load_dataset(quick["dataset"])
    config = TrainConfig(out=str(tmp_path), method="swa", dataset=quick["dataset"], arch=quick["arch"],
                         width=quick["width"], epochs=quick["budget"], seed=0, threads=1)
    seed_everything(0)
    ensemble = train_ensemble(config, dataset, torch.device("cpu"), record_epochs=False)
    probs = member_probabilities(ensemble.models, dataset, dataset.test.x, torch.device("cpu"))
    assert accuracy(probs[:, 0], dataset.test.y) == by["swa", 0]["accuracy"]
    assert np.isfinite([r["nll"] for r in runs]).all()
