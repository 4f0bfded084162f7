"""Report plots as small PNGs, drawn headless (matplotlib's Agg backend, no display needed).

    lr.png           the LR at every iteration, members (or SWA averaging points) marked
    training.png     training loss and test error per epoch
    members.png      ensemble accuracy and NLL as members are added (last-m and training order)
    reliability.png  reliability diagrams of the ensemble, before and after temperature scaling
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PLOT_FILES", "write_plots"]

PLOT_FILES = {"lr": "lr.png", "training": "training.png", "members": "members.png",
              "reliability": "reliability.png"}
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
    label = "averaged weights" if method in ("swa", "swag") else "member"
    ax.scatter([s / steps_per_epoch for s in member_steps], [lr(s) for s in member_steps],
               color="tab:red", zorder=3, s=18, label=label)
    skipped = sorted(set(member_steps) - set(exported_steps))
    if skipped and method not in ("swa", "swag"):
        ax.scatter([s / steps_per_epoch for s in skipped], [lr(s) for s in skipped], facecolor="white",
                   edgecolor="tab:red", zorder=4, s=18, label="not exported (keep-last)")
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


def plot_reliability(path: Path, reliability: dict[str, dict[str, list[float]]], temperature: float) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.4), sharey=True)
    for ax, key in zip(axes, ("uncalibrated", "calibrated")):
        bins = reliability[key]
        edges = bins["edges"]
        width = edges[1] - edges[0]
        filled = [i for i, c in enumerate(bins["count"]) if c]
        ax.bar([edges[i] for i in filled], [bins["accuracy"][i] for i in filled], width=width,
               align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_title(key if key == "uncalibrated" else f"calibrated (T={temperature:.2f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    _save(fig, path)


def write_plots(folder: Path, *, lr: Callable[[int], float], total_steps: int, steps_per_epoch: int,
                member_steps: Sequence[int], exported_steps: Sequence[int], method: str,
                history: dict[str, list[float]], test_report: dict[str, Any], temperature: float) -> dict[str, str]:
    """Writes the four plots into `folder`; returns {key: file name}."""
    plot_lr(folder / PLOT_FILES["lr"], lr, total_steps, steps_per_epoch, member_steps, exported_steps, method)
    plot_training(folder / PLOT_FILES["training"], history)
    plot_members(folder / PLOT_FILES["members"], test_report["ensemble_by_size"])
    plot_reliability(folder / PLOT_FILES["reliability"], test_report["reliability"], temperature)
    return dict(PLOT_FILES)
