"""Evaluation of a trained ensemble and its report: metrics.json's content and report.md.

Members are scored on the validation and test splits; the ensemble is the mean of the chosen
members' probabilities (never of their logits or weights), chosen on the validation split
(`selection.py`). Members' probabilities are [N, M, C]
([batch, members, classes], as in `snapserve.proto.scores`). The temperature is fitted on the
validation split AFTER pooling (fit T on log p̄: pool, then calibrate) and the test metrics are
given both ways. Ensemble accuracy/NLL "by size" grow the ensemble one member at a time, in
training order ("forward") and from the last member back ("backward", the paper's last-m).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from snapserve.proto.scores import ensemble_scores, mean_probabilities, mutual_information
from snapserve.trainer.adaptive import adaptive_markdown
from snapserve.trainer.metrics import (auroc, classification_metrics, fit_temperature, pairwise_disagreement,
                                       rejection_curve, reliability_bins, temperature_scaled)
from snapserve.trainer.selection import select_members

__all__ = ["UNCERTAINTY_SCORES", "evaluate_ensemble", "report_markdown", "split_report", "uncertainty_report"]

# The served scores put to work in every report: higher = less sure.
UNCERTAINTY_SCORES = ("mutual_information", "vote_disagreement", "predictive_entropy")


def uncertainty_report(member_probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                       ood_probs: np.ndarray | None = None) -> dict[str, Any]:
    """Do the served scores flag what they should? For each of UNCERTAINTY_SCORES: the AUROC of
    telling misclassified from correct examples, of telling `ood_probs`' inputs (members'
    probabilities on out-of-distribution inputs) from these, and the accuracy-vs-rejection
    curve with its thresholds.

    The scores are `snapserve.proto.scores.ensemble_scores`, the server's own math on the same
    float32 probabilities it computes them from, so a threshold read here refuses the same
    requests when applied to served answers.
    """
    served = ensemble_scores(member_probs, temperature)
    correct = served.top_class == labels
    report: dict[str, Any] = {
        "error_auroc": {k: auroc(getattr(served, k), ~correct) for k in UNCERTAINTY_SCORES},
        "rejection": {k: rejection_curve(getattr(served, k), correct) for k in UNCERTAINTY_SCORES},
    }
    if ood_probs is not None:
        shifted = ensemble_scores(ood_probs, temperature)
        is_ood = np.r_[np.zeros(len(labels), bool), np.ones(len(ood_probs), bool)]
        report["ood_auroc"] = {k: auroc(np.r_[getattr(served, k), getattr(shifted, k)], is_ood)
                               for k in UNCERTAINTY_SCORES}
    return report


def split_report(member_probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                 chosen: Sequence[int] | None = None, ood_probs: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of each member, of the ensemble of the `chosen` members (indices, repeats weigh
    more; all by default), calibrated with `temperature` and not, of the ensemble grown one
    member at a time, and what its uncertainty scores flag (`ood_probs`: the members on
    out-of-distribution inputs)."""
    count = member_probs.shape[1]
    chosen = list(range(count)) if chosen is None else list(chosen)
    picked = member_probs[:, chosen]
    members = [classification_metrics(member_probs[:, m], labels) for m in range(count)]
    mean = mean_probabilities(picked)
    calibrated = temperature_scaled(mean, temperature)
    distinct = sorted(set(chosen))
    disagreement = pairwise_disagreement(member_probs[:, distinct])
    every = pairwise_disagreement(member_probs)
    return {
        "members": members,
        "ensemble": classification_metrics(mean, labels),
        "ensemble_calibrated": classification_metrics(calibrated, labels),
        "members_mean": {k: float(np.mean([members[m][k] for m in chosen])) for k in members[0]},
        # Diversity: without it an ensemble is one model served M times. Among the distinct
        # chosen members, and among all collected (the premise: near-final yet different).
        "mean_pairwise_disagreement": _off_diagonal_mean(disagreement),
        "pairwise_disagreement": disagreement.tolist(),
        "collected_mean_pairwise_disagreement": _off_diagonal_mean(every),
        "mean_mutual_information": float(mutual_information(picked).mean(dtype=np.float64)),
        "ensemble_by_size": {
            "forward": [classification_metrics(mean_probabilities(member_probs[:, :m]), labels)
                        for m in range(1, count + 1)],
            "backward": [classification_metrics(mean_probabilities(member_probs[:, count - m:]), labels)
                         for m in range(1, count + 1)],
        },
        "reliability": {"uncalibrated": reliability_bins(mean, labels),
                        "calibrated": reliability_bins(calibrated, labels)},
        "uncertainty": uncertainty_report(picked, labels, temperature,
                                          None if ood_probs is None else ood_probs[:, chosen]),
    }


def _off_diagonal_mean(matrix: np.ndarray) -> float:
    size = len(matrix)
    return float(matrix[~np.eye(size, dtype=bool)].mean()) if size > 1 else 0.0


def evaluate_ensemble(val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                      test_labels: np.ndarray, *, selection: str = "all", k: int | None = None,
                      calibrate: bool = True, ood_probs: np.ndarray | None = None) -> dict[str, Any]:
    """{"selection", "temperature", "val", "test"}: the members chosen by `selection` (with `k`
    for last-k) on the validation split, then T fitted on their pooled validation probabilities;
    `ood_probs` (members on out-of-distribution inputs) goes into the test report. The test
    split is scored only after both are fixed."""
    choice = select_members(val_probs, val_labels, selection, k)
    pooled = mean_probabilities(val_probs[:, list(choice.members)])
    temperature = fit_temperature(pooled, val_labels) if calibrate else 1.0
    return {"selection": choice, "temperature": temperature,
            "val": split_report(val_probs, val_labels, temperature, choice.members),
            "test": split_report(test_probs, test_labels, temperature, choice.members, ood_probs)}


def _row(name: str, m: dict[str, float]) -> str:
    return f"| {name} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['brier']:.4f} | {m['ece']:.4f} |"


def report_markdown(manifest: dict[str, Any], report: dict[str, Any], plots: dict[str, str]) -> str:
    """report.md: what was trained, the test metrics, and the plots (relative links)."""
    test, training = report["test"], manifest["training"]
    lines = [
        f"# {manifest['name']}: {manifest['method']} on {training['dataset_name']}",
        "",
        f"{training['arch']}, {training['epochs']} epochs, lr {training['lr']}, seed {training['seed']}, "
        f"{len(manifest['members'])} exported member(s) of {len(test['members'])} collected; "
        f"training {training['train_seconds']:.1f} s on {training['device']}.",
        "",
        f"Temperature T = {report['temperature']:.4f}, fitted on the validation split after pooling "
        "(served probabilities are softmax(log p̄ / T)).",
        "",
        "| test split | accuracy | NLL | Brier | ECE (15 bins) |",
        "|---|---|---|---|---|",
        _row("ensemble, calibrated (served)", test["ensemble_calibrated"]),
        _row("ensemble, uncalibrated", test["ensemble"]),
        _row("members, mean", test["members_mean"]),
    ]
    selection = manifest.get("selection")
    served = selection["collected"] if selection is not None else list(range(len(test["members"])))
    for i, m in enumerate(test["members"]):
        times = served.count(i)
        lines.append(_row(f"member {i} ({f'served x{times}' if times else 'not served'})", m))
    if selection is not None:
        val = selection["validation"]
        lines += ["", f"Member selection `{selection['rule']}`"
                  + (f" (k = {selection['k']})" if selection.get("k") else "")
                  + f" on the validation split: collected members {selection['collected']} served "
                  f"(repeats weigh more); validation NLL {val['nll']:.4f}, accuracy {val['accuracy']:.4f} "
                  f"(all {selection['collected_count']} members: {val['all_members_nll']:.4f}, "
                  f"{val['all_members_accuracy']:.4f})."]
    if report.get("adaptive") is not None:
        lines += adaptive_markdown(report["adaptive"])
    lines += ["", f"Mean pairwise disagreement {test['mean_pairwise_disagreement']:.4f} among the served "
              f"members ({test['collected_mean_pairwise_disagreement']:.4f} among all collected), mean mutual "
              f"information {test['mean_mutual_information']:.4f} nats.", ""]
    lines += _uncertainty_markdown(test["uncertainty"], report.get("ood"))
    titles = {"lr": "Learning rate and members", "training": "Training loss and test error",
              "members": "Ensemble size", "reliability": "Reliability",
              "rejection": "Accuracy when the most uncertain are refused"}
    for key, file in plots.items():
        lines += [f"## {titles.get(key, key)}", "", f"![{key}]({file})", ""]
    return "\n".join(lines)


def _auroc_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _uncertainty_markdown(uncertainty: dict[str, Any], ood: str | None) -> list[str]:
    """The scores at work: AUROCs, and thresholds a client can apply to served scores."""
    has_ood = "ood_auroc" in uncertainty
    lines = ["## The scores at work (test split)", "",
             "AUROC of each served score for flagging the ensemble's misclassified test examples"
             + (f", and for telling out-of-distribution inputs ({ood}) from the test split" if has_ood else "")
             + " (0.5 = chance; a one-member ensemble's mutual information and vote disagreement are 0).", "",
             "| score | errors AUROC |" + (" OOD AUROC |" if has_ood else ""),
             "|---|---|" + ("---|" if has_ood else "")]
    for key in UNCERTAINTY_SCORES:
        row = f"| {key} | {_auroc_cell(uncertainty['error_auroc'][key])} |"
        if has_ood:
            row += f" {_auroc_cell(uncertainty['ood_auroc'][key])} |"
        lines.append(row)
    curve = uncertainty["rejection"]["predictive_entropy"]
    lines += ["", "Refusing requests whose served `predictive_entropy` exceeds a threshold:", "",
              "| refuse the most uncertain | threshold (refuse when above) | refused | accuracy on the rest |",
              "|---|---|---|---|"]
    lines += [f"| {f:.0%} | {t:.4g} | {r:.1%} | {a:.4f} |" for f, t, r, a in
              zip(curve["fraction"], curve["threshold"], curve["refused"], curve["accuracy"])]
    return lines + [""]
