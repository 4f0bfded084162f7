"""Member selection: greedy picks what it must on a constructed case, the rules never look at the
test split, and a version serves (and reports) what was chosen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from snapserve.trainer.config import TrainConfig
from snapserve.trainer.errors import ConfigError
from snapserve.trainer.report import evaluate_ensemble
from snapserve.trainer.selection import select_members
from tests.support.training import train_cli


def two_class_probs(correct: list[list[float]]) -> np.ndarray:
    """[N, M, 2] from each member's probability of the true class (class 0) per example."""
    p = np.asarray(correct, dtype=np.float64).T  # [N, M]
    return np.stack([p, 1 - p], axis=-1)


def test_greedy_adds_with_replacement_and_stops_when_nothing_improves() -> None:
    # A is the best member alone; B is right where A is unsure; C is uninformative. The best
    # mixture weighs A about 2:1 (w = 0.67), which forward selection reaches as [A, B, A]:
    # NLL 0.4838 (A) -> 0.4504 (A+B) -> 0.4391 (2A+B); then 3A+B 0.4416, A+B 0.4504, 2A+B+C
    # 0.4955 are all worse, so it stops.
    probs = two_class_probs([[0.95, 0.4], [0.3, 0.9], [0.5, 0.5]])
    labels = np.zeros(2, dtype=np.int64)
    choice = select_members(probs, labels, "greedy")
    assert choice.members == (0, 1, 0)
    assert choice.distinct == (0, 1) and choice.served_positions() == [0, 0, 1]
    assert choice.val_nll == pytest.approx(-(np.log(0.95 * 2 / 3 + 0.3 / 3) + np.log(0.4 * 2 / 3 + 0.9 / 3)) / 2)
    assert choice.val_nll < choice.all_val_nll
    manifest = choice.to_manifest()
    assert manifest["members"] == [0, 0, 1] and manifest["collected"] == [0, 0, 1]
    assert manifest["order"] == [0, 1, 0]  # as greedy added them
    assert manifest["rule"] == "greedy" and manifest["collected_count"] == 3


def test_greedy_keeps_one_member_when_averaging_only_hurts() -> None:
    probs = two_class_probs([[0.6, 0.6], [0.99, 0.2], [0.2, 0.99]])
    assert select_members(probs, np.zeros(2, dtype=np.int64), "greedy").members == (0,)


def test_all_and_last_k() -> None:
    probs = two_class_probs([[0.6, 0.6]] * 5)
    labels = np.zeros(2, dtype=np.int64)
    assert select_members(probs, labels, "all").members == (0, 1, 2, 3, 4)
    choice = select_members(probs, labels, "last-k", k=2)
    assert choice.members == (3, 4) and choice.served_positions() == [0, 1] and choice.k == 2
    with pytest.raises(ConfigError, match="k >= 1"):
        select_members(probs, labels, "last-k")


def test_the_choice_and_temperature_never_depend_on_the_test_split() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    logits = rng.normal(size=(300, 6, 10)) * 2  # members that err apart, each right more often than not
    logits[np.arange(300), :, labels] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    val, test = probs[:150], probs[150:]
    runs = [evaluate_ensemble(val, labels[:150], test, poisoned, selection="greedy")
            for poisoned in (labels[150:], (labels[150:] + 1) % 10, np.zeros(150, dtype=np.int64))]
    assert len(set(runs[0]["selection"].members)) > 1  # a non-trivial choice
    for run in runs[1:]:
        assert run["selection"] == runs[0]["selection"] and run["temperature"] == runs[0]["temperature"]
    assert runs[1]["test"]["ensemble"]["accuracy"] != runs[0]["test"]["ensemble"]["accuracy"]


def test_keep_last_means_last_k_and_nothing_else() -> None:
    config = TrainConfig(out="repo", method="snapshot", keep_last=2)
    assert (config.selection, config.keep_last) == ("last-k", 2)
    assert TrainConfig(out="repo", method="snapshot", selection="greedy").keep_last is None
    with pytest.raises(ConfigError, match="last-k"):
        TrainConfig(out="repo", method="snapshot", selection="greedy", keep_last=2)
    with pytest.raises(ConfigError, match="last-k"):
        TrainConfig(out="repo", method="snapshot", selection="last-k")


def test_snapshot_defaults_to_lr0_0_2_and_every_method_to_all_members() -> None:
    assert TrainConfig(out="repo").lr == 0.2 and TrainConfig(out="repo", lr=0.1).lr == 0.1
    assert {TrainConfig(out="repo", method=m).lr for m in ("fge", "swa", "swag", "single")} == {0.1}
    assert TrainConfig(out="repo", method="fge").fge_lrs() == (0.05, 0.01)  # the README's, from 0.1
    assert {TrainConfig(out="repo", method=m).selection for m in ("snapshot", "fge", "swag")} == {"all"}


def test_a_version_exports_the_distinct_chosen_members_and_lists_the_repeats(tmp_path: Path) -> None:
    manifest = train_cli(tmp_path, "--dataset", "digits", "--arch", "mlp", "--width", "16", "--epochs", "4",
                         "--members", "4", "--selection", "greedy", "--seed", "0", "--name", "picked")
    selection = manifest["selection"]
    collected = selection["collected"]
    assert selection["rule"] == "greedy" and selection["collected_count"] == 4
    assert [m["index"] for m in manifest["members"]] == sorted(set(collected))
    assert [manifest["members"][i]["index"] for i in selection["members"]] == collected
    version = tmp_path / "picked" / "1"
    report = json.loads((version / "report" / "metrics.json").read_text())
    assert report["selection"] == selection and len(report["test"]["members"]) == 4
    assert selection["validation"]["nll"] <= selection["validation"]["all_members_nll"] + 1e-12
