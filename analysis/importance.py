"""Hyperparameter importance per group with optuna's fANOVA over the trials table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from analysis.constants import USABLE_STATUSES, ordered_groups

MIN_TRIALS = 3
"""Fewer usable trials than this and a group's importance is not computed."""
MAX_DEPTH = 8
"""Depth of fANOVA's trees (optuna's default, 64, costs about 10x more at 500 trials per
group; 8 levels still allow 256 leaves per tree over at most six parameters)."""


def distribution(spec: Mapping[str, Any], values: pd.Series):
    """The search-space distribution of one parameter: optuna's ``CategoricalDistribution``
    for a range of ``choices`` (widened by any value observed outside them), else a
    ``FloatDistribution``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if "choices" in spec:
        choices = list(spec["choices"])
        return CategoricalDistribution(choices + [v for v in plain(values.unique())
                                                  if v not in choices])

    # widened to cover observed values
    observed_low, observed_high = float(values.min()), float(values.max())
    low = float(spec.get("low", observed_low))
    high = float(spec.get("high", observed_high))
    step = spec.get("step")
    log = bool(spec.get("log", False))
    if observed_low < low or observed_high > high:
        low, high, step = min(low, observed_low), max(high, observed_high), None
    if log and low <= 0:
        log = False
    if step is not None:
        step = float(step)
        on_grid = ((values - low) / step - ((values - low) / step).round()).abs() < 1e-8
        if log or not on_grid.all():
            step = None
    return FloatDistribution(low, high, log=log, step=step)


def plain(values) -> list:
    """numpy scalars as Python values (what optuna's distributions compare against)."""
    return [v.item() if hasattr(v, "item") else v for v in values]


def group_importance(sub: pd.DataFrame, space: Mapping[str, Any], seed: int) -> dict[str, float]:
    """fANOVA importances of the parameters that vary among one group's trials."""
    params = [
        p for p in space
        if f"cfg_{p}" in sub and sub[f"cfg_{p}"].notna().all() and sub[f"cfg_{p}"].nunique() > 1
    ]
    if len(sub) < MIN_TRIALS or not params:
        return {}
    import optuna  # imported here: reading tables must work where optuna is absent
    from optuna.importance import FanovaImportanceEvaluator

    dists = {p: distribution(space[p] or {}, sub[f"cfg_{p}"] if "choices" in (space[p] or {})
                             else sub[f"cfg_{p}"].astype(float)) for p in params}
    study = optuna.create_study(direction="maximize")
    study.add_trials([
        optuna.trial.create_trial(
            params={p: (plain([row[f"cfg_{p}"]])[0] if "choices" in (space[p] or {})
                        else float(row[f"cfg_{p}"])) for p in params},
            distributions=dists,
            value=float(row["best_val_acc"]),
        )
        for _, row in sub.iterrows()
    ])
    evaluator = FanovaImportanceEvaluator(seed=seed, max_depth=MAX_DEPTH)
    return optuna.importance.get_param_importances(study, evaluator=evaluator, params=params)


def param_importance(
    trials: pd.DataFrame, space: Mapping[str, Any], seed: int = 0,
    group_spaces: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Rows (group, param, importance); importances of a group sum to 1.

    ``space`` maps each parameter to its range; ``group_spaces`` (``study.json``'s, where
    ranges differ per group) replaces it for the groups it names.

    Uses completed, ASHA-stopped and early-stopped trials with their ``best_val_acc``;
    groups with fewer than three such trials or no varying parameter are skipped.
    """
    columns = ["group", "param", "importance"]
    if trials.empty or not (space or group_spaces) or not {"group", "best_val_acc"} <= set(
            trials.columns):
        return pd.DataFrame(columns=columns)
    usable = trials[trials["best_val_acc"].notna()]
    if "status" in usable:
        usable = usable[usable["status"].isin(USABLE_STATUSES)]
    import optuna

    rows = []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        for group in ordered_groups(usable["group"]):
            ranges = (group_spaces or {}).get(group, space)
            found = group_importance(usable[usable["group"] == group], ranges, seed)
            rows += [{"group": group, "param": p, "importance": float(v)}
                     for p, v in found.items() if not math.isnan(v)]
    finally:
        optuna.logging.set_verbosity(verbosity)
    return pd.DataFrame(rows, columns=columns)
