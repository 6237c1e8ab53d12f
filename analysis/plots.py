"""Figures of a study, one PNG per function; an empty input gives no figure (None)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.constants import GROUPS, ordered_groups
from analysis.files import write_bytes
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
    return Path(write_bytes(Path(path), buffer.getvalue()))


TOP_K = 5
"""Trials drawn one by one per group (the best by validation accuracy); the rest are bands."""
BAND = (0.1, 0.5, 0.9)
"""Quantiles of validation accuracy drawn at each epoch: the 10-90% band and the median."""


def curves(epochs: pd.DataFrame) -> pd.DataFrame:
    """Latest-attempt epoch rows with a known accuracy, accuracy in percent."""
    if epochs.empty or not {"group", "trial_id", "epoch", "val_acc"} <= set(epochs.columns):
        return pd.DataFrame()
    rows = latest_attempt(epochs)
    rows = rows[rows["val_acc"].notna()].sort_values(["trial_id", "epoch"])
    return rows.assign(val_pct=rows["val_acc"].astype(float) * 100)


def curve_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Validation accuracy (percent) of one group: a row per trial, a column per epoch."""
    return rows.pivot_table(index="trial_id", columns="epoch", values="val_pct", aggfunc="last")


def draw_band(ax, matrix: pd.DataFrame, group: str) -> None:
    """Median and 10-90% band over the trials still running at each epoch."""
    values = matrix.to_numpy(dtype=float)
    running = np.isfinite(values).sum(axis=0) > 0
    epochs = matrix.columns.to_numpy()[running]
    with np.errstate(all="ignore"):
        low, mid, high = np.nanquantile(values[:, running], BAND, axis=0)
    ax.fill_between(epochs, low, high, color=color(group), alpha=0.2, lw=0)
    ax.plot(epochs, mid, color=color(group), lw=1.5)


def top_trials(matrix: pd.DataFrame, k: int = TOP_K) -> pd.DataFrame:
    """The ``k`` trials with the highest best validation accuracy."""
    return matrix.loc[matrix.max(axis=1).nlargest(k).index]


def plot_learning_curves(epochs: pd.DataFrame, path: str | Path) -> Path | None:
    """Validation accuracy vs epoch, one panel per group: the median and 10-90% band over
    the trials running at each epoch, and the top trials as lines (readable at any count)."""
    rows = curves(epochs)
    if rows.empty:
        return None
    groups = ordered_groups(rows["group"])
    fig = figure(3.2 * len(groups), 3.4)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        matrix = curve_matrix(rows[rows["group"] == group])
        draw_band(ax, matrix, group)
        for _, trial in top_trials(matrix).iterrows():
            ax.plot(trial.index, trial.to_numpy(), color="black", alpha=0.6, lw=0.8)
        ax.set_title(f"{group} ({len(matrix)} trials)")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][0].plot([], [], color="grey", lw=1.5, label="median (band: 10-90%)")
    axes[0][0].plot([], [], color="black", lw=0.8, label=f"top {TOP_K} trials")
    axes[0][0].legend(fontsize="x-small", loc="lower right")
    return save(fig, path)


def plot_asha(epochs: pd.DataFrame, trials: pd.DataFrame, path: str | Path) -> Path | None:
    """ASHA's stopping pattern: trials still running at each epoch per group (left), and
    where ASHA stopped trials, with the top trials' curves (right)."""
    rows = curves(epochs)
    if rows.empty:
        return None
    stopped: set[str] = set()
    if {"trial_id", "status"} <= set(trials.columns):
        stopped = set(trials.loc[trials["status"] == "asha_stopped", "trial_id"].astype(str))
    fig = figure(12, 4.5)
    left, right = fig.subplots(1, 2)
    for group in ordered_groups(rows["group"]):
        mine = rows[rows["group"] == group]
        running = mine.groupby("epoch")["trial_id"].nunique()
        left.step(running.index, running.to_numpy(), where="post", color=color(group),
                  label=group)
        matrix = curve_matrix(mine)
        for _, trial in top_trials(matrix, 3).iterrows():
            right.plot(trial.index, trial.to_numpy(), color=color(group), alpha=0.8, lw=1)
        last = mine.groupby("trial_id").tail(1)
        last = last[last["trial_id"].astype(str).isin(stopped)]
        right.scatter(last["epoch"], last["val_pct"], marker="x", s=12, color=color(group),
                      alpha=0.35, lw=0.8)
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_ylabel("trials still running")
    left.legend(fontsize="small")
    right.plot([], [], "x", color="black", label="stopped by ASHA (last epoch)")
    right.plot([], [], color="black", label="top 3 trials per group")
    right.set_xlabel("epoch")
    right.set_ylabel("validation accuracy (%)")
    right.legend(fontsize="small")
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
    """Bars of mean test accuracy with 95% CI per group; the paper's number as a marker where
    the comparison has a ``paper`` column (CIFAR-10 studies only).

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
