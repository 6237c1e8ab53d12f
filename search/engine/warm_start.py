"""Warm start: an earlier study's best configurations are the first proposals of a new one.

For each tuned group, the earlier study's full-budget trials of that group
(``analysis.stats.full_budget``, by its own ``max_epochs``) ranked by ``best_val_acc``; the
best ``min(n_startup, samples)`` of them are enqueued in the group's Optuna study
(``study.enqueue_trial``, user attribute ``proposer = "warm start"``) once, when that study is
created, so a resume never enqueues them again. A value outside this study's range is
clipped to it (onto its step grid; ``plan_lines`` says so, once per group); a parameter the
earlier group searched that this group does not, or a categorical value outside this
study's choices, is refused in one line. A parameter this group searches and the earlier one
did not is drawn by the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from search.store import files as fsutil
from search.store.sink import read_table
from search.study import StudyConfig, read_study_json, typed
from search.study.space import ParamRange, group_space, space_from


@dataclass(frozen=True)
class Proposals:
    """One group's warm start: the configurations to enqueue and the trials they come from."""

    group: str
    params: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # the earlier study's trial ids
    clipped: list[str] = field(default_factory=list)  # "T 20 -> 16 (trial t1)"


def earlier_study(config: StudyConfig) -> tuple[dict[str, Any], pd.DataFrame]:
    """(``study.json``, ``trials`` table) of the warm-start study; ``ValueError`` if missing."""
    storage = config.warm_start_storage or config.storage
    doc = read_study_json(storage, config.warm_start)
    if doc is None:
        raise ValueError(f"warm_start: no study {config.warm_start!r} in {storage}")
    return doc, read_table(fsutil.join(storage, config.warm_start), "trials")


def fit_value(name: str, value: Any, r: ParamRange) -> Any:
    """``value`` inside range ``r``: clipped to [low, high] and onto its step grid; a
    categorical value must be one of the choices (``ValueError`` otherwise)."""
    if r.categorical:
        choices = [typed(name, c) for c in r.choices]
        if typed(name, value) not in choices:
            raise ValueError(f"{value!r} is not among this study's choices {choices}")
        return typed(name, value)
    v = min(max(float(value), r.low), r.high)
    if r.step:
        v = min(r.low + round((v - r.low) / r.step) * r.step, r.high)
    return typed(name, v)


def proposals(config: StudyConfig, group: str, doc: dict[str, Any],
              trials: pd.DataFrame) -> Proposals:
    """The warm start of ``group`` from the earlier study (``doc``, ``trials``)."""
    from analysis.stats import full_budget

    out = Proposals(group)
    mine = trials[trials["group"] == group] if len(trials) else trials
    if mine.empty:
        return out
    mine = mine[full_budget(mine, doc.get("max_epochs"))]
    best = mine.sort_values("best_val_acc", ascending=False, kind="stable")
    before = group_space(space_from(doc.get("space") or {}), group)
    now = config.group_space(group)
    name = config.warm_start
    for p in before:
        if p not in now:
            raise ValueError(f"warm_start: {p} was searched in group {group!r} of study "
                             f"{name!r} but is not in this study's space of {group!r}")
    for row in best.head(min(config.n_startup, config.samples)).to_dict("records"):
        params = {}
        for p in before:
            value = row.get(f"cfg_{p}")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue  # not recorded there: the sampler draws it
            try:
                params[p] = fit_value(p, value, now[p])
            except ValueError as exc:
                raise ValueError(f"warm_start: {p} of trial {row['trial_id']} in study "
                                 f"{name!r}: {exc}") from None
            if params[p] != typed(p, value):
                out.clipped.append(f"{p} {value:g} -> {params[p]:g} ({row['trial_id']})")
        out.params.append(params)
        out.sources.append(str(row["trial_id"]))
    return out


def plan(config: StudyConfig) -> dict[str, Proposals]:
    """Every tuned group's warm start (empty without ``warm_start``); refusals raise."""
    if not config.warm_start:
        return {}
    doc, trials = earlier_study(config)
    return {g: proposals(config, g, doc, trials) for g in config.groups if g != "baseline"}


def plan_lines(config: StudyConfig) -> list[str]:
    """One console line per tuned group: what its warm start enqueues, and what was clipped."""
    lines = []
    for group, p in plan(config).items():
        if not p.params:
            lines.append(f"warm start {group}: study {config.warm_start!r} has no full-budget "
                         f"{group} trial; {group} starts without one")
            continue
        line = (f"warm start {group}: the {len(p.params)} best of study {config.warm_start!r} "
                f"first ({', '.join(p.sources)})")
        if p.clipped:
            line += f"; clipped to this study's space: {', '.join(p.clipped)}"
        lines.append(line)
    return lines


def enqueue_warm_start(config: StudyConfig, group: str, study) -> int:
    """Enqueue ``group``'s warm start in its new Optuna ``study`` (once: the study records it
    in its user attribute ``warm_start``); returns how many configurations were enqueued."""
    if not config.warm_start or "warm_start" in study.user_attrs or group == "baseline":
        return 0
    doc, trials = earlier_study(config)
    p = proposals(config, group, doc, trials)
    for params, source in zip(p.params, p.sources, strict=True):
        study.enqueue_trial(params, user_attrs={"proposer": "warm start",
                                                "warm_start_trial": source})
    study.set_user_attr("warm_start", {"study": config.warm_start, "trials": p.sources})
    return len(p.params)
