"""Report plots as small PNGs, drawn headless (matplotlib's Agg backend, no display needed).

    lr.png           the LR at every iteration, members (or SWA averaging points) marked
    training.png     training loss and test error per epoch
    members.png      ensemble accuracy and NLL as members are added (last-m and training order)
    reliability.png  reliability diagrams of the ensemble, before and after temperature scaling,
                     each bar labelled with the examples its bin holds
    rejection.png    accuracy on the kept examples when the most uncertain are refused, per score
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PLOT_FILES", "bin_counts", "plot_compare", "plot_cycle_length", "write_plots"]

PLOT_FILES = {"lr": "lr.png", "training": "training.png", "members": "members.png",
              "reliability": "reliability.png", "rejection": "rejection.png"}
_DPI = 80  # small files: these go into every model version


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def plot_lr(path: Path, lr: Callable[[int], float], total_steps: int, steps_per_epoch: int,
            member_steps: Sequence[int], exported_steps: Sequence[int], method: str) -> None:
    steps = range(1, total_steps + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot([s / steps_per_epoch for s in steps], [lr(s) for s in steps], lw=1.2, label="learning rate")
    label = "averaged weights" if method.startswith("swa") else "member"
    ax.scatter([s / steps_per_epoch for s in member_steps], [lr(s) for s in member_steps],
               color="tab:red", zorder=3, s=18, label=label)
    skipped = sorted(set(member_steps) - set(exported_steps))
    if skipped and not method.startswith("swa"):
        ax.scatter([s / steps_per_epoch for s in skipped], [lr(s) for s in skipped], facecolor="white",
                   edgecolor="tab:red", zorder=4, s=18, label="not served (selection)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{method}: learning rate per iteration")
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_training(path: Path, history: dict[str, list[float]]) -> None:
    epochs = range(1, len(history["loss"]) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(epochs, history["loss"], color="tab:blue", label="train loss")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (log)", color="tab:blue")
    if history.get("test_error"):
        right = ax.twinx()
        right.plot(epochs, history["test_error"], color="tab:orange", label="test error")
        right.set_ylabel("test error (current weights)", color="tab:orange")
    ax.set_title("training loss and test error per epoch")
    _save(fig, path)


def plot_members(path: Path, by_size: dict[str, list[dict[str, float]]]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for order, style in (("backward", "-o"), ("forward", "--s")):
        sizes = range(1, len(by_size[order]) + 1)
        name = "last m" if order == "backward" else "first m"
        left.plot(sizes, [m["accuracy"] for m in by_size[order]], style, ms=3, label=name)
        right.plot(sizes, [m["nll"] for m in by_size[order]], style, ms=3, label=name)
    left.set_ylabel("test accuracy")
    right.set_ylabel("test NLL (uncalibrated)")
    for ax in (left, right):
        ax.set_xlabel("members m")
        ax.legend(fontsize=8)
    fig.suptitle("ensemble of m members")
    _save(fig, path)


def bin_counts(bins: dict[str, list[float]]) -> list[tuple[float, float, str]]:
    """(x, y, text) of each non-empty bin's example count, written over its bar: a bar of 3
    examples and one of 3000 look alike without it."""
    edges, width = bins["edges"], bins["edges"][1] - bins["edges"][0]
    return [(edges[i] + width / 2, min(bins["accuracy"][i], 0.9) + 0.02, f"{int(count)}")
            for i, count in enumerate(bins["count"]) if count]


def plot_reliability(path: Path, reliability: dict[str, dict[str, list[float]]], temperature: float) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.4), sharey=True)
    for ax, key in zip(axes, ("uncalibrated", "calibrated")):
        bins = reliability[key]
        edges = bins["edges"]
        width = edges[1] - edges[0]
        filled = [i for i, c in enumerate(bins["count"]) if c]
        ax.bar([edges[i] for i in filled], [bins["accuracy"][i] for i in filled], width=width,
               align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        for x, y, text in bin_counts(bins):  # examples per bin
            ax.text(x, y, text, ha="center", va="bottom", fontsize=6, rotation=90)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_title(key if key == "uncalibrated" else f"calibrated (T={temperature:.2f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    _save(fig, path)


def plot_rejection(path: Path, rejection: dict[str, dict[str, list[float]]]) -> None:
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for score, curve in rejection.items():
        ax.plot([100 * r for r in curve["refused"]], curve["accuracy"], "-o", ms=3, label=score)
    ax.set_xlabel("refused (% of the test split, most uncertain first)")
    ax.set_ylabel("accuracy on the rest")
    ax.set_title("accuracy vs rejection")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_plots(folder: Path, *, lr: Callable[[int], float], total_steps: int, steps_per_epoch: int,
                member_steps: Sequence[int], exported_steps: Sequence[int], method: str,
                history: dict[str, list[float]], test_report: dict[str, Any], temperature: float) -> dict[str, str]:
    """Writes the plots into `folder`; returns {key: file name}."""
    plot_lr(folder / PLOT_FILES["lr"], lr, total_steps, steps_per_epoch, member_steps, exported_steps, method)
    plot_training(folder / PLOT_FILES["training"], history)
    plot_members(folder / PLOT_FILES["members"], test_report["ensemble_by_size"])
    plot_reliability(folder / PLOT_FILES["reliability"], test_report["reliability"], temperature)
    plot_rejection(folder / PLOT_FILES["rejection"], test_report["uncertainty"]["rejection"])
    return dict(PLOT_FILES)


def plot_compare(folder: Path, rows: list[dict[str, Any]], budget: int) -> dict[str, str]:
    """`trainer compare`'s figures: budget.png (test accuracy and NLL against the training
    budget in epochs, every method) and members.png (against the number of members, at
    `budget`); points are the mean over seeds, error bars ± one sample std."""
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for method in methods:
        budgets = sorted({r["budget"] for r in rows if r["method"] == method})
        for ax, key in zip(axes, ("accuracy", "nll")):
            values = [[r[key] for r in rows if r["method"] == method and r["budget"] == b] for b in budgets]
            ax.errorbar(budgets, [np.mean(v) for v in values],
                        yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values],
                        marker="o", ms=3, capsize=2, label=method)
    for ax, label in zip(axes, ("test accuracy", "test NLL")):
        ax.set_xlabel("budget (epochs; deep: per member, M x the cost)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("methods against the training budget (mean ± std over seeds: the seed spread;\n"
                 "the paired differences to single and their intervals are in table.md)", fontsize=9)
    _save(fig, folder / "budget.png")

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for method in methods:
        curves = [r for r in rows if r["method"] == method and r["budget"] == budget]
        if not curves or len(curves[0]["by_size_accuracy"]) < 2:
            continue
        size = min(len(r["by_size_accuracy"]) for r in curves)
        label = "snapshot, the last m" if method.startswith("snapshot (last") else method
        for ax, key in zip(axes, ("by_size_accuracy", "by_size_nll")):
            values = np.array([r[key][:size] for r in curves])
            ax.errorbar(range(1, size + 1), values.mean(0),
                        yerr=values.std(0, ddof=1) if len(values) > 1 else None,
                        marker="o", ms=3, capsize=2, label=label)
    for ax, label in zip(axes, ("test accuracy", "test NLL")):
        ax.set_xlabel("members m (the first m, in training order)")
        ax.set_ylabel(label)
    if axes[0].lines:  # none until a run with several members is in
        axes[0].legend(fontsize=7)
    fig.suptitle(f"ensembles by number of members, budget {budget} epochs (mean ± std over seeds)", fontsize=9)
    _save(fig, folder / "members.png")
    return {"budget": "budget.png", "members": "members.png"}


def plot_cycle_length(path: Path, points: list[dict[str, Any]]) -> bool:
    """When does a snapshot ensemble pay? Its paired Δ to single-step (accuracy, NLL) against
    the steps per cycle, one series per (lr, member-selection rule), error bars the paired 95%
    t-interval. Drawn only with two or more cycle lengths; returns whether it was."""
    if len({p["steps_per_cycle"] for p in points}) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
    series: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        rule = point["method"].rsplit("[", 1)[-1].rstrip("]")
        series.setdefault(f"lr0 {point['lr']}, {rule}", []).append(point)
    for i, (label, mine) in enumerate(sorted(series.items())):
        mine.sort(key=lambda p: p["steps_per_cycle"])
        shift = 1 + 0.025 * (i - len(series) / 2)  # series side by side at one cycle length
        for ax, key, scale in zip(axes, ("accuracy", "nll"), (100, 1)):
            x = [p["steps_per_cycle"] * shift for p in mine]
            y = [scale * p[key]["diff"] for p in mine]
            err = [[scale * (p[key]["diff"] - p[key]["low"]) for p in mine],
                   [scale * (p[key]["high"] - p[key]["diff"]) for p in mine]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=label)
    for ax, label in zip(axes, ("Δ test accuracy vs single-step (points)", "Δ test NLL vs single-step")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("steps per cycle (budget x steps per epoch / M)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("snapshot ensembles: paired Δ to single-step at equal budget (mean, 95% t-interval over seeds)",
                 fontsize=9)
    _save(fig, path)
    return True
