"""The sampler and the trial scheduler of a study's groups, built from its settings.

Samplers are Optuna's own (``make_sampler``), one per tuned group:

- ``tpe``: ``TPESampler(multivariate=True, constant_liar=True)``;
- ``random``: ``RandomSampler``;
- ``qmc``: ``QMCSampler(qmc_type="sobol", scramble=True)``: one scrambled Sobol sequence
  seeded by the study seed; Optuna keeps its position in the study (a system attribute), so
  a resumed or grown search continues the same sequence. Every proposal is a Sobol point:
  the group's space is given up front (Optuna's own QMC draws its very first trial at random,
  before any trial has shown it the space);
- ``cmaes``: ``CmaEsSampler`` (learns from COMPLETE trials; categorical parameters, which it
  cannot handle, are drawn at random);
- ``gp``: ``GPSampler`` (a Gaussian process, learns from COMPLETE trials).

Every sampler but QMC is seeded by the study seed plus the trials already in the group's
study, so a resumed search does not replay the random draws it made before. TPE, GP and
CMA-ES draw at random while fewer trials than ``n_startup`` count for them (``STARTUP``:
TPE counts COMPLETE and PRUNED trials, GP and CMA-ES COMPLETE ones); ``proposer`` says, at
ask time and by the same count, who made a proposal.

Trial schedulers are Ray Tune's own (``make_scheduler``), one per tuned group inside the
one experiment (``search.engine.scheduler.GroupScheduler``): ``asha``
(``AsyncHyperBandScheduler``, one bracket), ``hyperband`` (the same with every bracket of
Hyperband: asynchronous Hyperband, Li et al. 2020; Tune's synchronous
``HyperBandScheduler`` pauses trials and picks which one runs, which a per-group wrapper in
one shared queue cannot route), ``median`` (``MedianStoppingRule``) and ``none`` (FIFO: every
trial runs its full budget).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna import samplers
from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    TrialScheduler,
)

from search.study import StudyConfig

METRIC = "val_acc"
STARTUP = {"tpe": ("COMPLETE", "PRUNED"), "gp": ("COMPLETE",), "cmaes": ("COMPLETE",)}
"""Samplers with random startup trials, and the trial states that count towards them."""


def make_sampler(config: StudyConfig, space: dict[str, Any], trials: int = 0
                 ) -> samplers.BaseSampler:
    """The Optuna sampler of one group: ``space`` its distributions, ``trials`` how many
    trials its study already holds (the seed offset; QMC ignores it)."""
    seed = config.seed + trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if config.sampler == "tpe":
            return samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed,
                                       n_startup_trials=config.n_startup)
        if config.sampler == "random":
            return samplers.RandomSampler(seed=seed)
        if config.sampler == "qmc":
            return SpaceQMC(space, seed=config.seed)
        if config.sampler == "cmaes":
            return samplers.CmaEsSampler(seed=seed, n_startup_trials=config.n_startup,
                                         warn_independent_sampling=False)
        if config.sampler == "gp":
            return samplers.GPSampler(seed=seed, n_startup_trials=config.n_startup)
    raise ValueError(f"sampler: unknown {config.sampler!r}")


class SpaceQMC(samplers.QMCSampler):
    """Optuna's scrambled Sobol ``QMCSampler``, told the group's space up front (Optuna's
    own infers it from the first trial, which it therefore draws at random)."""

    def __init__(self, space: dict[str, Any], seed: int):
        super().__init__(qmc_type="sobol", scramble=True, seed=seed,
                         warn_independent_sampling=False)
        self._space = dict(space)

    def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
        return dict(self._space)


def proposer(config: StudyConfig, study) -> str:
    """Who makes the next proposal of ``study`` (an Optuna study, asked right after):
    ``random`` for a startup draw, else the sampler's name."""
    states = STARTUP.get(config.sampler)
    if states is None:
        return config.sampler
    counted = study.get_trials(deepcopy=False, states=tuple(
        optuna.trial.TrialState[s] for s in states))
    return "random" if len(counted) < config.n_startup else config.sampler


def hyperband_brackets(config: StudyConfig) -> int:
    """Hyperband's brackets: s = 0 … floor(log_eta(max_epochs / grace_period))."""
    ratio = config.max_epochs / config.grace_period
    return int(math.log(ratio) / math.log(config.reduction_factor) + 1e-9) + 1


def make_scheduler(config: StudyConfig, group: str) -> TrialScheduler:
    """The Tune trial scheduler of one tuned group (time attribute: ``epoch``)."""
    if config.scheduler in ("asha", "hyperband"):
        brackets = hyperband_brackets(config) if config.scheduler == "hyperband" else 1
        return AsyncHyperBandScheduler(
            time_attr="epoch", metric=METRIC, mode="max", max_t=config.max_epochs,
            grace_period=config.grace_period, reduction_factor=config.reduction_factor,
            brackets=brackets)
    if config.scheduler == "median":
        # min_time_slice=inf: with too few trials to compare, continue (never pause a trial)
        return MedianStoppingRule(time_attr="epoch", metric=METRIC, mode="max",
                                  grace_period=config.grace_period, min_time_slice=math.inf)
    if config.scheduler == "none":
        return FIFOScheduler()
    raise ValueError(f"scheduler: unknown {config.scheduler!r}")
