"""Statistics over the result tables: group comparison, Holm correction, best configs, health."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.constants import CFG_COLUMNS, PAPER_ACC, TERMS, USABLE_STATUSES, ordered_groups
from analysis.tables import latest_attempt

COMPARISON_COLUMNS: list[str] = [
    "group", "n", "mean", "std", "ci_low", "ci_high",
    "diff_vs_baseline", "p_vs_baseline", "p_vs_baseline_holm",
    "diff_vs_kd", "p_vs_kd", "p_vs_kd_holm",
    "corrupt_acc_mean", "params", "latency_ms_bs1", "paper",
]
"""Columns of :func:`compare_groups`; accuracies and differences are in percent."""

REFERENCES: tuple[str, ...] = ("baseline", "kd")


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjustment; NaN entries are left out of the family."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std (ddof=1) and the two-sided t confidence interval of ``values``."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def paired(acc: pd.DataFrame, group: str, reference: str) -> tuple[float, float]:
    """Mean paired difference (group − reference) and ``ttest_rel`` p over shared seeds."""
    if group == reference or reference not in acc.columns or group not in acc.columns:
        return math.nan, math.nan
    both = acc[[group, reference]].dropna()
    if both.empty:
        return math.nan, math.nan
    diff = float((both[group] - both[reference]).mean())
    if len(both) < 2:
        return diff, math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        p = float(sps.ttest_rel(both[group], both[reference]).pvalue)
    return diff, p


def column_mean(frame: pd.DataFrame, column: str) -> float:
    """Mean of a column, NaN when it is missing or empty."""
    if column not in frame:
        return math.nan
    return float(pd.to_numeric(frame[column], errors="coerce").mean())


def compare_groups(runs: pd.DataFrame, paper: Mapping[str, float] = PAPER_ACC) -> pd.DataFrame:
    """One row per group of reproduced runs: test accuracy over seeds, paired tests, paper.

    Differences are the mean paired difference over seeds present in both groups; p-values
    come from a paired t-test across those seeds (NaN below 2 pairs or against itself);
    the ``*_holm`` columns are Holm-adjusted over every p-value in the table together.
    """
    if runs.empty or "test_acc" not in runs:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    runs = runs.assign(acc=pd.to_numeric(runs["test_acc"], errors="coerce") * 100)
    acc = runs.pivot_table(index="seed", columns="group", values="acc", aggfunc="mean")
    rows = []
    for group in ordered_groups(runs["group"]):
        sub = runs[runs["group"] == group]
        mean, std, low, high = mean_ci(sub["acc"].dropna())
        row = {"group": group, "n": int(sub["acc"].notna().sum()), "mean": mean, "std": std,
               "ci_low": low, "ci_high": high}
        for ref in REFERENCES:
            row[f"diff_vs_{ref}"], row[f"p_vs_{ref}"] = paired(acc, group, ref)
        row["corrupt_acc_mean"] = column_mean(sub, "corrupt_acc_mean") * 100
        row["params"] = column_mean(sub, "params")
        row["latency_ms_bs1"] = column_mean(sub, "latency_ms_bs1")
        row["paper"] = float(paper.get(group, math.nan))
        rows.append(row)
    table = pd.DataFrame(rows)
    p_columns = [f"p_vs_{ref}" for ref in REFERENCES]
    adjusted = holm(table[p_columns].to_numpy().ravel()).reshape(len(table), len(p_columns))
    for i, column in enumerate(p_columns):
        table[f"{column}_holm"] = adjusted[:, i]
    return table[COMPARISON_COLUMNS]


def best_configs(trials: pd.DataFrame) -> pd.DataFrame:
    """Best trial per group by validation accuracy among full-budget trials.

    Full budget: ``epochs_run`` equals the group's maximum ``epochs_run``. Failed and
    diverged trials are left out. No test metric is ever used for selection.
    """
    columns = ["group", "trial_id", "status", "best_val_acc", "best_epoch", "epochs_run",
               "seed", *CFG_COLUMNS]
    needed = {"group", "epochs_run", "best_val_acc"}
    if trials.empty or not needed <= set(trials.columns):
        return pd.DataFrame(columns=columns)
    ok = trials[trials["best_val_acc"].notna()].reset_index(drop=True)
    if "status" in ok:
        ok = ok[ok["status"].isin(USABLE_STATUSES)]
    picks = []
    for group in ordered_groups(ok["group"]):
        sub = ok[ok["group"] == group]
        full = sub[sub["epochs_run"] == sub["epochs_run"].max()]
        picks.append(full["best_val_acc"].astype(float).idxmax())
    best = ok.loc[picks].reset_index(drop=True)
    return best[[c for c in columns if c in best.columns]]


def health_check(epochs: pd.DataFrame, threshold: float = 0.01) -> pd.DataFrame:
    """Mean gradient share of each active loss term (weight > 0) per group.

    A term is flagged when its mean share is below ``threshold`` (or was never measured):
    such a term does not reach the student.
    """
    columns = ["group", "term", "mean_share", "n", "flagged"]
    if epochs.empty or "group" not in epochs:
        return pd.DataFrame(columns=columns)
    epochs = latest_attempt(epochs)
    rows = []
    for group in ordered_groups(epochs["group"]):
        sub = epochs[epochs["group"] == group]
        for term in TERMS:
            weight, share = f"cfg_w_{term}", f"gshare_{term}"
            if weight not in sub:
                continue
            active = sub[pd.to_numeric(sub[weight], errors="coerce") > 0]
            if active.empty:
                continue
            values = pd.to_numeric(active.get(share, pd.Series(dtype=float)), errors="coerce")
            mean = float(values.mean())
            rows.append({"group": group, "term": term, "mean_share": mean,
                         "n": int(values.notna().sum()),
                         "flagged": bool(math.isnan(mean) or mean < threshold)})
    return pd.DataFrame(rows, columns=columns)
