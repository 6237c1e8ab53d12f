"""Statistics over the result tables: group comparison, Holm correction, best configs, health."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.constants import CFG_COLUMNS, PAPER_ACC, TERMS, USABLE_STATUSES, ordered_groups
from analysis.tables import latest_attempt

COMPARISON_COLUMNS: list[str] = [
    "group", "n", "mean", "std", "ci_low", "ci_high",
    "diff_vs_baseline", "p_vs_baseline", "p_vs_baseline_holm",
    "diff_vs_kd", "p_vs_kd", "p_vs_kd_holm",
    "corrupt_acc_mean", "params", "paper",
]
"""Columns of :func:`compare_groups`; accuracies and differences are in percent.

No latency column: every group trains the same student architecture, so latency is a
property of the architecture, not of a group (``speed.json``, measured per architecture,
and the report's "Size and speed (per architecture)" section)."""

REFERENCES: tuple[str, ...] = ("baseline", "kd")

TEST_COLUMNS: list[str] = ["group", "reference", "pairs", "diff", "p", "p_holm", "no_p"]
"""Columns of :func:`paired_tests`: one row per distinct paired test."""
FEW_PAIRS, ZERO_VARIANCE = "fewer than 2 pairs", "zero variance"
"""Values of ``no_p``: why a paired test has no p-value (empty when it has one)."""
ZERO_VARIANCE_RTOL = 1e-9
"""Paired differences count as having zero variance when their sample std is at most
``ZERO_VARIANCE_RTOL * max(1, |mean|)`` (in the differences' own unit, percentage points)."""


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


def paired(acc: pd.DataFrame, group: str, reference: str) -> tuple[float, float, int, str]:
    """(mean paired difference group − reference, ``ttest_rel`` p, pairs, why no p).

    Over the seeds present in both columns of ``acc`` (a seed x group table). The p-value
    is NaN, with the reason in the last element, where the test is undefined: fewer than 2
    pairs (``FEW_PAIRS``), or paired differences with zero variance (``ZERO_VARIANCE``:
    t = mean / 0 has no distribution, and scipy would return p ≈ 0 with a "catastrophic
    cancellation" warning). Differences of percentages are equal only up to rounding
    (52.4 − 44.0 and 60.8 − 52.4 differ by about 1e-14), so zero variance means a sample
    std of at most ``ZERO_VARIANCE_RTOL * max(1, |mean|)`` (1e-9 of the mean difference,
    at least 1e-9 points); paired differences that really differ do so by at least one test
    image, 100 / N points (0.01 on 10,000 test images), far above it. The reason is empty
    where p is defined (and for a group against itself or a missing column: diff and p are
    then NaN).
    """
    if group == reference or reference not in acc.columns or group not in acc.columns:
        return math.nan, math.nan, 0, ""
    both = acc[[group, reference]].dropna()
    d = (both[group] - both[reference]).to_numpy(dtype=float)
    if d.size == 0:
        return math.nan, math.nan, 0, FEW_PAIRS
    diff = float(d.mean())
    if d.size < 2:
        return diff, math.nan, 1, FEW_PAIRS
    if float(d.std(ddof=1)) <= ZERO_VARIANCE_RTOL * max(1.0, abs(diff)):
        return diff, math.nan, int(d.size), ZERO_VARIANCE
    with np.errstate(divide="ignore", invalid="ignore"):
        p = float(sps.ttest_rel(both[group], both[reference]).pvalue)
    return diff, p, int(d.size), ""


def column_mean(frame: pd.DataFrame, column: str) -> float:
    """Mean of a column, NaN when it is missing or empty."""
    if column not in frame:
        return math.nan
    return float(pd.to_numeric(frame[column], errors="coerce").mean())


def accuracy_by_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy in percent, one row per seed and one column per group with runs."""
    acc = pd.to_numeric(runs["test_acc"], errors="coerce") * 100
    return runs.assign(acc=acc).pivot_table(index="seed", columns="group", values="acc",
                                            aggfunc="mean")


def paired_tests(runs: pd.DataFrame, groups: Sequence[str] = ()) -> pd.DataFrame:
    """Every distinct paired test of the comparison, once, with its Holm-adjusted p.

    One row per unordered pair of a reference (``baseline``, ``kd``) and another group with
    runs: ``group`` − ``reference`` over their shared seeds (:func:`paired`). ``baseline``
    vs ``kd`` is one test, listed once as ``kd`` − ``baseline``. ``p_holm`` adjusts over
    the tests that have a p-value (``no_p`` empty); a test without one (fewer than 2 pairs,
    zero variance) is not in the family.
    """
    if runs.empty or "test_acc" not in runs:
        return pd.DataFrame(columns=TEST_COLUMNS)
    acc = accuracy_by_seed(runs)
    names = [g for g in ordered_groups([*groups, *runs["group"]]) if g in acc.columns]
    rows, seen = [], set()
    for reference in REFERENCES:
        for group in names:
            pair = frozenset((group, reference))
            if reference not in acc.columns or group == reference or pair in seen:
                continue
            seen.add(pair)
            diff, p, pairs, why = paired(acc, group, reference)
            rows.append({"group": group, "reference": reference, "pairs": pairs, "diff": diff,
                         "p": p, "no_p": why})
    tests = pd.DataFrame(rows, columns=[c for c in TEST_COLUMNS if c != "p_holm"])
    tests.insert(TEST_COLUMNS.index("p_holm"), "p_holm", holm(tests["p"].to_numpy(float)))
    return tests


def compare_groups(runs: pd.DataFrame, paper: Mapping[str, float] | None = PAPER_ACC,
                   groups: Sequence[str] = ()) -> pd.DataFrame:
    """One row per group of reproduced runs: test accuracy over seeds, paired tests, paper.

    ``paper`` None leaves the ``paper`` column out (a study not on CIFAR-10:
    :func:`analysis.constants.paper_numbers`).

    Groups in ``groups`` without runs get a row with ``n`` = 0 (when any run exists at
    all), so that no group vanishes from the comparison.

    Differences are the mean paired difference over seeds present in both groups; p-values
    come from a paired t-test across those seeds (:func:`paired`: NaN below 2 pairs, for
    paired differences with zero variance, or against itself). The ``*_holm`` columns are
    Holm-adjusted over the distinct tests of :func:`paired_tests`: each test once, so
    ``baseline``'s ``p_vs_kd`` and ``kd``'s ``p_vs_baseline`` (one test) show the same
    adjusted p, and a test without a p-value is not in the family. ``params`` is the mean
    parameter count of the group's runs (the same architecture in every group); latency is
    not a column (:data:`COMPARISON_COLUMNS`).
    """
    columns = [c for c in COMPARISON_COLUMNS if paper is not None or c != "paper"]
    if runs.empty or "test_acc" not in runs:
        return pd.DataFrame(columns=columns)
    runs = runs.assign(acc=pd.to_numeric(runs["test_acc"], errors="coerce") * 100)
    tests = {(t.group, t.reference): t for t in paired_tests(runs, groups).itertuples()}
    rows = []
    for group in ordered_groups([*groups, *runs["group"]]):
        sub = runs[runs["group"] == group]
        mean, std, low, high = mean_ci(sub["acc"].dropna())
        row = {"group": group, "n": int(sub["acc"].notna().sum()), "mean": mean, "std": std,
               "ci_low": low, "ci_high": high}
        for ref in REFERENCES:
            test, sign = tests.get((group, ref)), 1.0
            if test is None and (ref, group) in tests:
                test, sign = tests[(ref, group)], -1.0
            row[f"diff_vs_{ref}"] = sign * test.diff if test is not None else math.nan
            row[f"p_vs_{ref}"] = test.p if test is not None else math.nan
            row[f"p_vs_{ref}_holm"] = test.p_holm if test is not None else math.nan
        row["corrupt_acc_mean"] = column_mean(sub, "corrupt_acc_mean") * 100
        row["params"] = column_mean(sub, "params")
        if paper is not None:
            row["paper"] = float(paper.get(group, math.nan))
        rows.append(row)
    return pd.DataFrame(rows)[columns]


def teacher_gap(comparison: pd.DataFrame, teacher_test_acc: float) -> pd.DataFrame:
    """Each group's mean test accuracy against the teacher's (``teacher_test_acc`` in [0, 1]).

    ``gap_to_teacher`` is teacher minus group (points); ``gap_closed`` is the group's mean
    paired gain over the baseline as a fraction of the teacher-baseline gap (a point estimate:
    its uncertainty is that of ``diff_vs_baseline`` in the comparison table).
    """
    teacher = teacher_test_acc * 100
    rows = comparison[comparison["n"] > 0][["group", "n", "mean", "ci_low", "ci_high",
                                            "diff_vs_baseline"]].copy()
    base = rows.loc[rows["group"] == "baseline", "mean"]
    base_gap = teacher - float(base.iloc[0]) if len(base) else math.nan
    rows["gap_to_teacher"] = teacher - rows["mean"]
    rows["gap_closed"] = rows["diff_vs_baseline"] / base_gap if base_gap > 0 else math.nan
    return rows.reset_index(drop=True)


BEST_COLUMNS: list[str] = ["group", "trial_id", "status", "best_val_acc", "best_epoch",
                           "epochs_run", "seed", *CFG_COLUMNS]
"""Columns of :func:`best_configs`."""
OUTCOME_COLUMNS: list[str] = ["group", "basis", *BEST_COLUMNS[1:], "trials", "full_budget",
                              "failed", "diverged", "first_error"]
"""Columns of :func:`group_outcomes`."""
FULL, LONGEST, NONE = "full budget", "LONGEST ONLY", "NO USABLE TRIAL"
"""Values of ``basis``: where a group's pick comes from."""


def full_budget(trials: pd.DataFrame, max_epochs: int | None = None) -> pd.Series:
    """Which usable trials are full-budget trials: they ran ``max_epochs`` epochs, or
    stopped on their own validation-loss patience (``early_stopped``).

    Early stopping is part of the training protocol, so an ``early_stopped`` trial's
    ``best_val_acc`` is the outcome of the full protocol for its configuration, exactly
    what ``reproduce`` runs; a trial cut short by ASHA (``asha_stopped``) is not.

    ``max_epochs`` is the study's budget (``study.json``); None takes the longest
    ``epochs_run`` of the whole table, never a per-group maximum.
    """
    usable = trials["best_val_acc"].notna()
    if "status" in trials:
        usable &= trials["status"].isin(USABLE_STATUSES)
    runs = pd.to_numeric(trials["epochs_run"], errors="coerce")
    budget = runs[usable].max() if max_epochs is None else max_epochs
    full = runs >= budget
    if "status" in trials:
        full |= trials["status"] == "early_stopped"
    return usable & full


def group_outcomes(trials: pd.DataFrame, max_epochs: int | None = None,
                   groups: Sequence[str] = ()) -> pd.DataFrame:
    """One row per group (``groups`` plus every group in ``trials``), none left out.

    ``basis`` says where the pick comes from: ``full budget`` (best validation accuracy among
    full-budget trials, :func:`full_budget`); ``LONGEST ONLY`` (no trial ran the full
    budget: the best of the longest-running usable trials, shown for information, not a
    tuned result); ``NO USABLE TRIAL`` (every trial failed or diverged, or none ran: no
    pick). Counts of trials, full-budget, failed and diverged trials and the first error
    (by timestamp) come with every row. No test metric is ever used.
    """
    has = trials.columns if not trials.empty else []
    names = ordered_groups([*groups, *(trials["group"] if "group" in has else [])])
    if not {"group", "epochs_run", "best_val_acc"} <= set(has):
        return pd.DataFrame([{"group": g, "basis": NONE, "trials": 0} for g in names],
                            columns=OUTCOME_COLUMNS)
    trials = trials.reset_index(drop=True)
    full = full_budget(trials, max_epochs)
    usable = full_budget(trials, 0)  # every usable trial
    status = trials["status"] if "status" in trials else pd.Series("", index=trials.index)
    rows = []
    for group in names:
        mine = trials["group"] == group
        row: dict = {"group": group, "trials": int(mine.sum()),
                     "full_budget": int((mine & full).sum()),
                     "failed": int((mine & (status == "failed")).sum()),
                     "diverged": int((mine & (status == "diverged")).sum())}
        row["first_error"] = first_error(trials[mine & status.isin(("failed", "diverged"))])
        pool, row["basis"] = mine & full, FULL
        if not pool.any():
            runs = trials["epochs_run"].where(mine & usable)
            pool, row["basis"] = (mine & usable & (runs == runs.max()), LONGEST)
        if not pool.any():
            row["basis"] = NONE
        else:
            pick = trials.loc[pool, "best_val_acc"].astype(float).idxmax()
            row |= {c: trials.at[pick, c] for c in BEST_COLUMNS[1:] if c in trials}
        rows.append(row)
    return pd.DataFrame(rows, columns=OUTCOME_COLUMNS)


def first_error(trials: pd.DataFrame) -> str | None:
    """The earliest (by ``timestamp``) non-empty ``error`` of ``trials``, else None."""
    if "error" not in trials:
        return None
    if "timestamp" in trials:
        trials = trials.sort_values("timestamp", kind="stable")
    errors = trials["error"].fillna("").astype(str)
    errors = errors[errors.str.len() > 0]
    return str(errors.iloc[0]) if len(errors) else None


def best_configs(trials: pd.DataFrame, max_epochs: int | None = None) -> pd.DataFrame:
    """Best trial per group by validation accuracy among trials that ran the full budget.

    Full budget: :func:`full_budget` with the study's ``max_epochs`` (pass it; None takes
    the longest ``epochs_run`` in the table). A group without such a trial has no row:
    there is nothing tuned to reproduce. Failed and diverged trials never count; no test
    metric is ever used for selection.
    """
    outcomes = group_outcomes(trials, max_epochs)
    best = outcomes[outcomes["basis"] == FULL].reset_index(drop=True)
    best = best[[c for c in BEST_COLUMNS if c in trials.columns or c == "group"]]
    return best.astype({c: trials[c].dtype for c in best.columns if c in trials})


def group_term_epochs(epochs: pd.DataFrame, terms: Sequence[str]
                      ) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(group, term, that group's epochs of its latest attempts) for every term whose weight
    column exists, groups in the usual order."""
    if epochs.empty or "group" not in epochs:
        return
    epochs = latest_attempt(epochs)
    for group in ordered_groups(epochs["group"]):
        sub = epochs[epochs["group"] == group]
        for term in terms:
            if f"cfg_w_{term}" in sub:
                yield group, term, sub


def health_check(epochs: pd.DataFrame, threshold: float = 0.01) -> pd.DataFrame:
    """Mean gradient share of each active loss term (weight > 0) per group.

    A term is flagged when its mean share is below ``threshold`` (or was never measured):
    such a term does not reach the student.
    """
    columns = ["group", "term", "mean_share", "n", "flagged"]
    rows = []
    for group, term, sub in group_term_epochs(epochs, TERMS):
        weight, share = f"cfg_w_{term}", f"gshare_{term}"
        active = sub[pd.to_numeric(sub[weight], errors="coerce") > 0]
        if active.empty:
            continue
        values = pd.to_numeric(active.get(share, pd.Series(dtype=float)), errors="coerce")
        mean = float(values.mean())
        rows.append({"group": group, "term": term, "mean_share": mean,
                     "n": int(values.notna().sum()),
                     "flagged": bool(math.isnan(mean) or mean < threshold)})
    return pd.DataFrame(rows, columns=columns)


SHARE_COLUMNS: list[str] = ["group", "term", "trials", "weight_min", "weight_max",
                            "share_at_min", "share_at_max", "share_median", "spearman"]
"""Columns of :func:`share_by_weight`."""


def share_by_weight(epochs: pd.DataFrame) -> pd.DataFrame:
    """How a term's gradient share follows its weight across a group's trials.

    One row per group and distillation term whose weight varied over the group's trials:
    each trial's mean share (``gshare_<term>`` over its epochs) at the trial with the lowest
    and the highest weight, the median over trials, and the Spearman correlation between
    weight and share. A share that stays near 0 (or near 1) across the whole range says the
    range is too low (or too high) to matter.
    """
    rows = []
    for group, term, sub in group_term_epochs(epochs, TERMS[1:]):  # CE anchors, not tuned
        weight, share = f"cfg_w_{term}", f"gshare_{term}"
        if share not in sub:
            continue
        per_trial = (sub.assign(w=pd.to_numeric(sub[weight], errors="coerce"),
                                s=pd.to_numeric(sub[share], errors="coerce"))
                     .groupby("trial_id")[["w", "s"]].mean().dropna())
        per_trial = per_trial[per_trial["w"] > 0].sort_values("w")
        if len(per_trial) < 2 or per_trial["w"].nunique() < 2:
            continue
        varies = per_trial["s"].nunique() > 1
        rho = sps.spearmanr(per_trial["w"], per_trial["s"]).statistic if varies else math.nan
        rows.append({"group": group, "term": term, "trials": len(per_trial),
                     "weight_min": per_trial["w"].iloc[0],
                     "weight_max": per_trial["w"].iloc[-1],
                     "share_at_min": per_trial["s"].iloc[0],
                     "share_at_max": per_trial["s"].iloc[-1],
                     "share_median": float(per_trial["s"].median()),
                     "spearman": float(rho)})
    return pd.DataFrame(rows, columns=SHARE_COLUMNS)


def range_positions(best: pd.DataFrame, trials: pd.DataFrame,
                    space: Mapping[str, Mapping[str, object]],
                    group_spaces: Mapping[str, Mapping[str, Mapping[str, object]]] | None = None,
                    ) -> pd.DataFrame:
    """Where each group's best value of each tuned parameter sits in its search range.

    A parameter is tuned in a group when its value varies over the group's trials.
    ``position`` is 0 at the range's low edge and 1 at its high edge (in log space for log
    ranges); ``edge`` marks a value within 5% of an edge, where the best value may lie
    outside the range.
    """
    columns = ["group", "param", "value", "low", "high", "position", "edge"]
    rows = []
    for row in best.to_dict("records"):
        mine = trials[trials["group"] == row["group"]]
        for param, spec in (group_spaces or {}).get(row["group"], space).items():
            column = f"cfg_{param}"
            if "choices" in spec or column not in mine or mine[column].nunique() < 2:
                continue  # a categorical range has no edges
            value, low, high = (float(v) for v in (row[column], spec["low"], spec["high"]))
            scale = math.log if spec.get("log") else float
            position = (scale(value) - scale(low)) / (scale(high) - scale(low))
            edge = "low" if position < 0.05 else "high" if position > 0.95 else ""
            rows.append({"group": row["group"], "param": param, "value": value, "low": low,
                         "high": high, "position": position, "edge": edge})
    return pd.DataFrame(rows, columns=columns)


PROPOSERS: tuple[str, ...] = ("warm start", "random", "tpe", "qmc", "cmaes", "gp")
"""Who may propose a trial (the ``trials`` table's ``proposer``), in the order shown."""


def proposal_counts(trials: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per group, how many of its trials each proposer made (``random``: a random startup
    draw or the random sampler; ``warm start``: an earlier study's best). Groups without a
    recorded proposer (the baseline's seeds, tables written before the column) are left out."""
    if trials.empty or "proposer" not in trials:
        return {}
    known = trials[trials["proposer"].notna() & (trials["proposer"].astype(str) != "")]
    out = {}
    for group in ordered_groups(known["group"]):
        counts = known.loc[known["group"] == group, "proposer"].astype(str).value_counts()
        order = [p for p in PROPOSERS if p in counts] + sorted(set(counts.index) - set(PROPOSERS))
        out[group] = {p: int(counts[p]) for p in order}
    return out


def proposal_words(counts: Mapping[str, int]) -> str:
    """``2 random, 6 tpe``."""
    return ", ".join(f"{n} {p}" for p, n in counts.items())
