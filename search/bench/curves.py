"""The bank of learning curves and the surrogate that answers any configuration from it.

A bank (``results/curves``, made by ``results/curves/make_bank.sh``) is one or more studies
of one space, every trial trained its full budget with no early stopping
(``scheduler = "none"``): a space-filling design of configurations, some of them trained
again with other training seeds. ``load_bank`` reads one group of it as arrays: each
configuration's position in the group's normalised space (0 to 1 per parameter, log ranges
in log space), its validation-accuracy curve (the mean over its seeds), the seed residual
curves of the repeated configurations, and the measured seconds per epoch.

The surrogate predicts the whole validation-accuracy curve of any position: inverse-distance
weighted ``k`` nearest banked curves (``knn``; ``k = 1`` is the nearest configuration) or a
thin-plate-spline radial basis function with smoothing (``rbf``, scipy's
``RBFInterpolator``). ``choose_surrogate`` takes the candidate with the smallest
leave-one-out error on the final epoch and reports every candidate's error beside it.
A replayed trial's curve is the surrogate's prediction plus one measured seed residual
curve (``noise_curve``), so the replay sees the noise a real search sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search.study.space import ParamRange, group_space, space_from

SURROGATES: tuple[tuple[str, float], ...] = (
    ("knn", 1), ("knn", 3), ("knn", 5), ("knn", 8),
    ("rbf", 0.01), ("rbf", 0.1), ("rbf", 1.0), ("rbf", 10.0),
)
"""The surrogate candidates ``choose_surrogate`` cross-validates: (kind, k or smoothing)."""


@dataclass(frozen=True, eq=False)
class Bank:
    """One group's banked curves (module docstring)."""

    group: str
    space: dict[str, ParamRange]
    max_epochs: int
    config: dict[str, Any]  # the design study's study.json
    params: pd.DataFrame  # one row per configuration: its parameter values
    positions: np.ndarray  # (configurations, parameters) in [0, 1]
    curves: np.ndarray  # (configurations, epochs): mean validation accuracy over seeds
    seeds: np.ndarray  # (configurations,): how many seeds each curve averages
    residuals: np.ndarray  # (curves, epochs): seed residuals of repeated configurations
    epoch_seconds: np.ndarray  # per trial: mean seconds of one epoch
    trials: int  # trainings read

    @property
    def noise_std(self) -> np.ndarray:
        """Seed standard deviation of the validation accuracy per epoch (NaN without
        repeated configurations)."""
        if len(self.residuals) < 2:
            return np.full(self.max_epochs, math.nan)
        return np.sqrt((self.residuals ** 2).mean(axis=0))


def positions(space: Mapping[str, ParamRange], params: pd.DataFrame | Mapping[str, Any]
              ) -> np.ndarray:
    """Where ``params`` (a frame of ``cfg``-less parameter columns, or one configuration)
    lie in ``space``: 0 at each range's low end, 1 at its high end (log ranges in log)."""
    frame = params if isinstance(params, pd.DataFrame) else pd.DataFrame([dict(params)])
    out = []
    for name, r in space.items():
        if r.categorical:
            choices = [str(c) for c in r.choices]
            out.append(frame[name].astype(str).map(choices.index).to_numpy(float)
                       / max(len(choices) - 1, 1))
            continue
        scale = np.log if r.log else np.asarray
        value = scale(frame[name].to_numpy(float))
        out.append((value - scale(r.low)) / (scale(r.high) - scale(r.low)))
    return np.stack(out, axis=1)


def bank_studies(root: str | Path) -> list[Path]:
    """The study folders of a bank (each has a ``study.json``), the design study first: the
    one without a ``warm_start``."""
    import json

    found = sorted(p.parent for p in Path(root).glob("*/study.json"))
    if not found:
        raise ValueError(f"bank: no study under {root} (make one with "
                         "results/curves/make_bank.sh)")
    return sorted(found, key=lambda p: bool(json.loads((p / "study.json").read_text())
                                            .get("warm_start")))


def load_bank(root: str | Path, group: str) -> Bank:
    """Group ``group`` of the bank at ``root`` (module docstring); ``ValueError`` if absent."""
    from analysis.tables import latest_attempt, load_study

    studies = [load_study(p) for p in bank_studies(root)]
    design = studies[0].config
    if group not in design.get("groups", []):
        raise ValueError(f"bank: group {group!r} is not in {root} "
                         f"(it has {', '.join(design.get('groups', []))})")
    space = group_space(space_from((design.get("group_spaces") or {}).get(group)
                                   or design.get("space") or {}), group)
    max_epochs = int(design["max_epochs"])
    names = list(space)
    runs, seconds = [], []
    for study in studies:
        trials = study.trials[(study.trials["group"] == group)
                              & (study.trials["status"] == "completed")]
        epochs = latest_attempt(study.epochs)
        epochs = epochs[epochs["trial_id"].isin(trials["trial_id"])]
        curve = epochs.pivot_table(index="trial_id", columns="epoch", values="val_acc")
        curve = curve.reindex(columns=range(1, max_epochs + 1)).dropna()
        seconds.extend(epochs.groupby("trial_id")["epoch_seconds"].mean().tolist())
        for row in trials[trials["trial_id"].isin(curve.index)].to_dict("records"):
            runs.append({"key": tuple(round(float(row[f"cfg_{p}"]), 9) for p in names),
                         **{p: row[f"cfg_{p}"] for p in names},
                         "curve": curve.loc[row["trial_id"]].to_numpy(float)})
    if not runs:
        raise ValueError(f"bank: no full-budget {group} trial under {root}")
    by_config = pd.DataFrame(runs).groupby("key", sort=False)
    params = by_config[names].first().reset_index(drop=True)
    curves, counts, residuals = [], [], []
    for _, rows in by_config:
        stack = np.stack(rows["curve"].to_list())
        curves.append(stack.mean(axis=0))
        counts.append(len(stack))
        if len(stack) > 1:  # residuals from the mean, scaled to one seed's variance
            residuals.extend((stack - stack.mean(axis=0)) * math.sqrt(len(stack)
                                                                      / (len(stack) - 1)))
    return Bank(group=group, space=space, max_epochs=max_epochs, config=design, params=params,
                positions=positions(space, params), curves=np.stack(curves),
                seeds=np.array(counts), epoch_seconds=np.array(seconds, float),
                residuals=np.array(residuals).reshape(-1, max_epochs), trials=len(runs))


# ---------------------------------------------------------------------------------------------
# The surrogate


@dataclass(frozen=True, eq=False)
class Surrogate:
    """A fitted surrogate: ``predict(positions)`` gives mean validation-accuracy curves."""

    kind: str  # "knn" or "rbf"
    setting: float  # k nearest, or the RBF smoothing
    x: np.ndarray
    y: np.ndarray
    model: Any = None  # the scipy RBFInterpolator of an "rbf" surrogate

    @property
    def name(self) -> str:
        return surrogate_name(self.kind, self.setting)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Curves at ``x`` (positions, one row each)."""
        x = np.atleast_2d(np.asarray(x, float))
        if self.kind == "rbf":
            return self.model(x)
        k = min(int(self.setting), len(self.x))
        distance = np.sqrt(((x[:, None, :] - self.x[None, :, :]) ** 2).sum(axis=-1))
        nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
        d = np.take_along_axis(distance, nearest, axis=1)
        weight = 1.0 / np.maximum(d, 1e-9) ** 2
        weight /= weight.sum(axis=1, keepdims=True)
        return np.einsum("mk,mke->me", weight, self.y[nearest])


def surrogate_name(kind: str, setting: float) -> str:
    """``knn(k=3)`` or ``rbf(smoothing=0.1)``."""
    return f"knn(k={int(setting)})" if kind == "knn" else f"rbf(smoothing={setting:g})"


def fit_surrogate(kind: str, setting: float, x: np.ndarray, y: np.ndarray) -> Surrogate:
    """A ``kind`` surrogate (``SURROGATES``) fitted on positions ``x`` and curves ``y``."""
    if kind == "knn":
        return Surrogate(kind, setting, x, y)
    if kind == "rbf":
        from scipy.interpolate import RBFInterpolator

        model = RBFInterpolator(x, y, kernel="thin_plate_spline", smoothing=setting, degree=1)
        return Surrogate(kind, setting, x, y, model)
    raise ValueError(f"surrogate: unknown kind {kind!r}")


def cross_validate(bank: Bank, kind: str, setting: float) -> dict[str, float]:
    """Leave-one-configuration-out error of a surrogate on the bank: RMSE of the final
    epoch's and of every epoch's validation accuracy, and the Spearman correlation of the
    predicted and the measured final accuracy."""
    from scipy.stats import spearmanr

    n = len(bank.curves)
    predicted = np.empty_like(bank.curves)
    for i in range(n):
        keep = np.arange(n) != i
        model = fit_surrogate(kind, setting, bank.positions[keep], bank.curves[keep])
        predicted[i] = model.predict(bank.positions[i:i + 1])[0]
    error = predicted - bank.curves
    rho = spearmanr(predicted[:, -1], bank.curves[:, -1]).statistic if n > 2 else math.nan
    return {"rmse_final": float(np.sqrt((error[:, -1] ** 2).mean())),
            "rmse_all": float(np.sqrt((error ** 2).mean())),
            "spearman_final": float(rho)}


def choose_surrogate(bank: Bank) -> tuple[Surrogate, list[dict[str, Any]]]:
    """The candidate of ``SURROGATES`` with the smallest leave-one-out final-epoch RMSE,
    fitted on the whole bank, and every candidate's cross-validated error."""
    scores = [{"surrogate": surrogate_name(k, s),
               "kind": k, "setting": s, **cross_validate(bank, k, s)} for k, s in SURROGATES]
    best = min(scores, key=lambda row: row["rmse_final"])
    return fit_surrogate(best["kind"], best["setting"], bank.positions, bank.curves), scores


def noise_curve(bank: Bank, rng: np.random.Generator) -> np.ndarray:
    """One measured seed residual curve (zeros where the bank repeated no configuration)."""
    if not len(bank.residuals):
        return np.zeros(bank.max_epochs)
    return bank.residuals[rng.integers(len(bank.residuals))]
