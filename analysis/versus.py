"""One study against another: the same groups' test accuracy, paired tests and tuned settings.

For a study run again with other settings (a tuned search after a random one, another
sampler, more trials), "what replicated and what changed". The two studies' reproduce runs
are independent samples (different searches, teachers and configurations), so accuracies
are compared with Welch's unequal-variance t-test, not paired by seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.constants import ordered_groups
from analysis.stats import (
    FULL,
    ZERO_VARIANCE_RTOL,
    group_outcomes,
    holm,
    mean_ci,
    paired_tests,
)

STUDY_COLUMNS: list[str] = [
    "group", "n_ref", "mean_ref", "ci_low_ref", "ci_high_ref", "n", "mean", "ci_low",
    "ci_high", "diff", "diff_ci_low", "diff_ci_high", "p_welch", "p_welch_holm",
]
"""Columns of :func:`compare_studies`; ``*_ref`` is the reference study, the rest this one."""

REPLICATION_COLUMNS: list[str] = ["group", "reference", "diff_ref", "p_holm_ref", "diff",
                                  "p_holm", "verdict"]
"""Columns of :func:`replication`."""
ALPHA = 0.05
"""Significance level of :func:`replication`'s verdicts (on Holm-adjusted p-values)."""
REPLICATED, NOT_REPLICATED, REVERSED, NEW, NEITHER, UNDEFINED = (
    "replicated", "not replicated", "reversed", "new", "neither", "undefined")
"""Values of ``verdict``."""


def welch(reference: np.ndarray, this: np.ndarray, level: float = 0.95
          ) -> tuple[float, float, float, float]:
    """(mean difference this − reference, its Welch t interval, Welch's p).

    The interval and p are NaN with fewer than 2 values on either side or when both
    samples have zero variance (the t statistic then has no distribution).
    """
    if reference.size == 0 or this.size == 0:
        return (math.nan,) * 4
    diff = float(this.mean() - reference.mean())
    flat = ZERO_VARIANCE_RTOL * max(1.0, abs(diff))  # as for paired tests (analysis.stats)
    if reference.size < 2 or this.size < 2 or max(reference.std(), this.std()) <= flat:
        return diff, math.nan, math.nan, math.nan
    result = sps.ttest_ind(this, reference, equal_var=False)
    interval = result.confidence_interval(level)
    return diff, float(interval.low), float(interval.high), float(result.pvalue)


def compare_studies(reference_runs: pd.DataFrame, runs: pd.DataFrame,
                    groups: Sequence[str] = ()) -> pd.DataFrame:
    """Per group with runs in both studies: each study's mean test accuracy (percent) and
    95% t interval, and this study minus the reference with Welch's interval and p-value,
    Holm-adjusted over the groups that have one."""
    def accuracies(table: pd.DataFrame, group: str) -> np.ndarray:
        if table.empty or "test_acc" not in table:
            return np.empty(0)
        acc = pd.to_numeric(table.loc[table["group"] == group, "test_acc"], errors="coerce")
        return acc.dropna().to_numpy(dtype=float) * 100

    names = ordered_groups([*groups, *reference_runs.get("group", []), *runs.get("group", [])])
    rows = []
    for group in names:
        ref, this = accuracies(reference_runs, group), accuracies(runs, group)
        if ref.size == 0 or this.size == 0:
            continue
        row = {"group": group, "n_ref": ref.size}
        row["mean_ref"], _, row["ci_low_ref"], row["ci_high_ref"] = mean_ci(ref)
        row["n"] = this.size
        row["mean"], _, row["ci_low"], row["ci_high"] = mean_ci(this)
        row["diff"], row["diff_ci_low"], row["diff_ci_high"], row["p_welch"] = welch(ref, this)
        rows.append(row)
    table = pd.DataFrame(rows, columns=[c for c in STUDY_COLUMNS if c != "p_welch_holm"])
    table["p_welch_holm"] = holm(table["p_welch"].to_numpy(float))
    return table[STUDY_COLUMNS]


def verdict(diff_ref: float, p_ref: float, diff: float, p: float, alpha: float = ALPHA) -> str:
    """Whether a paired test's finding in the reference study held in this one."""
    if math.isnan(p_ref) or math.isnan(p):
        return UNDEFINED
    ref_found, found = p_ref < alpha, p < alpha
    if ref_found and found:
        return REPLICATED if np.sign(diff_ref) == np.sign(diff) else REVERSED
    if ref_found:
        return NOT_REPLICATED
    return NEW if found else NEITHER


def replication(reference_runs: pd.DataFrame, runs: pd.DataFrame,
                groups: Sequence[str] = ()) -> pd.DataFrame:
    """Each within-study paired test (:func:`analysis.stats.paired_tests`) in both studies,
    side by side, with a verdict at ``ALPHA`` on the Holm-adjusted p-values: ``replicated``
    (significant in both, same sign), ``reversed`` (both, opposite signs), ``not replicated``
    (only in the reference), ``new`` (only in this study), ``neither``, or ``undefined``
    (a test without a p-value in either study)."""
    keys = ["group", "reference"]
    ref = paired_tests(reference_runs, groups)[[*keys, "diff", "p_holm"]]
    this = paired_tests(runs, groups)[[*keys, "diff", "p_holm"]]
    both = ref.merge(this, on=keys, suffixes=("_ref", ""))
    both["verdict"] = [verdict(*values) for values in
                       both[["diff_ref", "p_holm_ref", "diff", "p_holm"]].to_numpy(float)]
    return both[REPLICATION_COLUMNS]


def tuned_settings(reference_trials: pd.DataFrame, reference_epochs: int | None,
                   trials: pd.DataFrame, max_epochs: int | None,
                   names: tuple[str, str]) -> pd.DataFrame:
    """Each group's selected configuration (the full-budget picks of
    :func:`analysis.stats.group_outcomes`) in both studies, with how many trials it was
    chosen from: one row per group and study (``study``: ``names`` = (reference, this))."""
    picks = [group_outcomes(table, epochs).assign(study=name) for table, epochs, name in
             ((reference_trials, reference_epochs, names[0]), (trials, max_epochs, names[1]))]
    both = pd.concat([p[p["basis"] == FULL] for p in picks], ignore_index=True)
    both = both.drop(columns=["basis", "status", "failed", "diverged", "first_error"])
    # reference rows come first in ``both``: a stable sort by group keeps them first
    order = {g: i for i, g in enumerate(ordered_groups(both["group"]))}
    both = both.sort_values("group", key=lambda g: g.map(order), kind="stable")
    columns = ["group", "study", *[c for c in both.columns if c not in ("group", "study")]]
    return both[columns].reset_index(drop=True)
