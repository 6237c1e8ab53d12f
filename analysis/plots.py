"""Figures of a study, one PNG per function; an empty input gives no figure (None)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis._io import atomic_write_bytes
from analysis.constants import GROUPS, ordered_groups
from analysis.tables import latest_attempt


def color(group: str) -> str:
    """A fixed colour per group, so every figure uses the same one."""
    index = GROUPS.index(group) if group in GROUPS else len(GROUPS) + sum(map(ord, group))
    return f"C{index % 10}"


def figure(width: float, height: float) -> Figure:
    """A new figure on the Agg canvas (no pyplot, no global backend state)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` as PNG and write it atomically."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def curves(epochs: pd.DataFrame) -> pd.DataFrame:
    """Latest-attempt epoch rows with a known accuracy, accuracy in percent."""
    if epochs.empty or not {"group", "trial_id", "epoch", "val_acc"} <= set(epochs.columns):
        return pd.DataFrame()
    rows = latest_attempt(epochs)
    rows = rows[rows["val_acc"].notna()].sort_values(["trial_id", "epoch"])
    return rows.assign(val_pct=rows["val_acc"].astype(float) * 100)


def plot_learning_curves(epochs: pd.DataFrame, path: str | Path) -> Path | None:
    """Validation accuracy vs epoch: one panel per group, one thin line per trial."""
    rows = curves(epochs)
    if rows.empty:
        return None
    groups = ordered_groups(rows["group"])
    fig = figure(3.2 * len(groups), 3.2)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for _, trial in rows[rows["group"] == group].groupby("trial_id"):
            ax.plot(trial["epoch"], trial["val_pct"], color=color(group), alpha=0.5, lw=1)
        ax.set_title(group)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("validation accuracy (%)")
    return save(fig, path)


def plot_asha(epochs: pd.DataFrame, trials: pd.DataFrame, path: str | Path) -> Path | None:
    """Every trial's validation curve; the last epoch of ASHA-stopped trials is marked."""
    rows = curves(epochs)
    if rows.empty:
        return None
    stopped: set[str] = set()
    if {"trial_id", "status"} <= set(trials.columns):
        stopped = set(trials.loc[trials["status"] == "asha_stopped", "trial_id"].astype(str))
    fig = figure(7, 4.5)
    ax = fig.subplots()
    for group in ordered_groups(rows["group"]):
        for i, (trial_id, trial) in enumerate(rows[rows["group"] == group].groupby("trial_id")):
            ax.plot(trial["epoch"], trial["val_pct"], color=color(group), alpha=0.5, lw=1,
                    label=group if i == 0 else None)
            if str(trial_id) in stopped:
                ax.plot(trial["epoch"].iloc[-1], trial["val_pct"].iloc[-1], "x",
                        color=color(group), ms=7)
    ax.plot([], [], "x", color="black", label="stopped by ASHA")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize="small")
    return save(fig, path)


def plot_robustness(robustness: pd.DataFrame, path: str | Path) -> Path | None:
    """Mean accuracy vs corruption severity per group, over corruptions and seeds."""
    if robustness.empty or not {"group", "severity", "acc"} <= set(robustness.columns):
        return None
    rows = robustness[robustness["acc"].notna()]
    if rows.empty:
        return None
    fig = figure(6, 4)
    ax = fig.subplots()
    for group in ordered_groups(rows["group"]):
        mean = rows[rows["group"] == group].groupby("severity")["acc"].mean() * 100
        ax.plot(mean.index, mean.to_numpy(), "o-", color=color(group), label=group)
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_xticks(sorted(rows["severity"].unique()))
    ax.legend(fontsize="small")
    return save(fig, path)


def plot_test_accuracy(comparison: pd.DataFrame, path: str | Path) -> Path | None:
    """Bars of mean test accuracy with 95% CI per group; the paper's number as a marker.

    ``comparison`` is the output of :func:`analysis.stats.compare_groups`.
    """
    if comparison.empty or "mean" not in comparison or comparison["mean"].isna().all():
        return None
    table = comparison.reset_index(drop=True)
    x = np.arange(len(table))
    mean = table["mean"].to_numpy(dtype=float)
    below = np.nan_to_num(mean - table["ci_low"].to_numpy(dtype=float))
    above = np.nan_to_num(table["ci_high"].to_numpy(dtype=float) - mean)
    paper = table["paper"].to_numpy(dtype=float) if "paper" in table else np.full(len(x), np.nan)
    fig = figure(1.4 * len(table) + 2, 4)
    ax = fig.subplots()
    ax.bar(x, mean, yerr=[below, above], capsize=4,
           color=[color(g) for g in table["group"]], alpha=0.8, label="mean, 95% CI")
    if np.isfinite(paper).any():
        ax.plot(x + 0.3, paper, "D", color="black", label="paper (best validation)")
    ax.set_xticks(x, table["group"])
    floor = np.concatenate([mean - below, paper])
    ax.set_ylim(max(0.0, float(np.min(floor[np.isfinite(floor)])) - 5), None)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize="small")
    return save(fig, path)
