"""Replay a search strategy on the bank of learning curves: a discrete-event simulation of
``tune`` for one group with the real sampler and trial scheduler and no training.

A strategy is ``SAMPLER[+SCHEDULER]`` (``tpe+asha``; no scheduler: every trial runs its full
budget). One replay runs ``samples`` trials on ``slots`` simulated slots, as ``tune`` does:

- proposals come from the group's Optuna study with the sampler of ``make_sampler`` (the
  same settings, seed and startup rule as ``tune``), asked when a slot frees up, so with many
  slots most proposals are made before any result is in;
- every epoch's result goes to the Tune scheduler of ``make_scheduler`` (Ray's own ASHA,
  asynchronous Hyperband or median stopping rule) and to the Optuna trial
  (``trial.report``), and an ended trial is told to Optuna as ``GroupSearcher`` tells it
  (``optuna_outcome``: COMPLETE with its best validation accuracy, PRUNED when stopped);
- a trial's curve is the surrogate's curve at its configuration plus one measured seed
  residual curve; its epochs take the seconds of one of the bank's trials drawn at random.

The search *selects* the full-budget trial with the best observed validation accuracy (as
``analyze`` and ``reproduce`` do). What the replay records is the **expected** final
validation accuracy of the selected configuration: the surrogate's noise-free curve there,
so noise that flatters a lucky trial does not count as found quality.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from search.bench.curves import Bank, Surrogate, noise_curve, positions
from search.study import StudyConfig

STRATEGIES: tuple[str, ...] = (
    "random", "random+asha", "tpe", "tpe+asha", "qmc", "cmaes", "gp", "tpe+hyperband",
    "tpe+median", "random+hyperband",
)
"""The strategies ``bench --search`` compares by default."""


def parse_strategy(text: str) -> tuple[str, str]:
    """``"tpe+asha"`` -> ``("tpe", "asha")``; ``"qmc"`` -> ``("qmc", "none")``."""
    from search.study.config import SAMPLERS, SCHEDULERS

    sampler, _, scheduler = text.strip().partition("+")
    scheduler = scheduler or "none"
    if sampler not in SAMPLERS or scheduler not in SCHEDULERS:
        raise ValueError(f"--strategies: {text!r} is not SAMPLER[+SCHEDULER] with a sampler of "
                         f"{', '.join(SAMPLERS)} and a scheduler of {', '.join(SCHEDULERS)}")
    return sampler, scheduler


@dataclass(eq=False)
class ReplayTrial:
    """What the Tune scheduler sees of a trial (hashable by identity, as Tune's are)."""

    trial_id: str
    config: dict[str, Any]
    epoch: int = 0
    best: float = -math.inf
    curve: np.ndarray = field(default_factory=lambda: np.zeros(0))
    expected: float = math.nan  # the surrogate's noise-free final accuracy
    epoch_seconds: float = 1.0
    optuna_trial: Any = None


@dataclass(frozen=True)
class Trace:
    """One replay: whenever the selection changes (a full-budget trial ended better than the
    selected one), the epochs consumed so far, the simulated time, the trials started so far,
    and the expected final accuracy of the selected configuration."""

    strategy: str
    slots: int
    seed: int
    epochs: np.ndarray
    seconds: np.ndarray
    started: np.ndarray
    quality: np.ndarray
    trials: int
    total_epochs: int
    total_seconds: float


def replay_config(config: StudyConfig, strategy: str, seed: int, **settings: Any
                  ) -> StudyConfig:
    """The bank's study config with the strategy's sampler and scheduler, the replay's seed
    and any of ``samples``, ``grace_period``, ``reduction_factor``, ``n_startup``."""
    sampler, scheduler = parse_strategy(strategy)
    given = {k: v for k, v in settings.items() if v is not None}
    if "samples" in given and "n_startup" not in given:
        from search.study.config import default_n_startup

        given["n_startup"] = default_n_startup(given["samples"])
    return dataclasses.replace(config, sampler=sampler, scheduler=scheduler, seed=seed,
                               warm_start=None, **given)


def replay(bank: Bank, surrogate: Surrogate, config: StudyConfig, slots: int,
           strategy: str) -> Trace:
    """One replay of ``config``'s sampler and scheduler for group ``bank.group``."""
    import optuna
    from ray.tune.schedulers import TrialScheduler

    from search.engine.algorithms import make_sampler, make_scheduler
    from search.engine.searcher import distribution, optuna_outcome

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(config.seed)
    group, max_epochs = bank.group, bank.max_epochs
    space = {p: distribution(p, r) for p, r in bank.space.items()}
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config, space))
    scheduler = make_scheduler(config, group)
    running: list[tuple[float, int, ReplayTrial]] = []
    started, consumed, now = 0, 0, 0.0
    selected_observed = -math.inf
    selected_expected = math.nan
    out_epochs, out_seconds, out_started, out_quality = [], [], [], []

    def start() -> None:
        nonlocal started
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            asked = study.ask(space)
        mean = surrogate.predict(positions(bank.space, asked.params))[0]
        trial = ReplayTrial(trial_id=str(started), config={"group": group, **asked.params},
                            curve=mean + noise_curve(bank, rng), expected=float(mean[-1]),
                            epoch_seconds=float(rng.choice(bank.epoch_seconds)),
                            optuna_trial=asked)
        scheduler.on_trial_add(None, trial)
        heapq.heappush(running, (now + trial.epoch_seconds, started, trial))
        started += 1

    while True:
        while len(running) < slots and started < config.samples:
            start()
        if not running:
            break
        now, order, trial = heapq.heappop(running)
        trial.epoch += 1
        consumed += 1
        value = float(trial.curve[trial.epoch - 1])
        trial.best = max(trial.best, value)
        trial.optuna_trial.report(value, step=trial.epoch)
        result = {"epoch": trial.epoch, "val_acc": value, "best_val_acc": trial.best}
        action = scheduler.on_trial_result(None, trial, result)
        if trial.epoch < max_epochs and action != TrialScheduler.STOP:
            heapq.heappush(running, (now + trial.epoch_seconds, order, trial))
            continue
        scheduler.on_trial_complete(None, trial, result)
        status = "completed" if trial.epoch >= max_epochs else "asha_stopped"
        state, told = optuna_outcome(status, trial.best)
        study.tell(trial.optuna_trial, told, state=optuna.trial.TrialState[state])
        if status == "completed" and trial.best > selected_observed:
            selected_observed, selected_expected = trial.best, trial.expected
            out_epochs.append(consumed)
            out_seconds.append(now)
            out_started.append(started)
            out_quality.append(selected_expected)
    return Trace(strategy=strategy, slots=slots, seed=config.seed,
                 epochs=np.array(out_epochs, int), seconds=np.array(out_seconds, float),
                 started=np.array(out_started, int), quality=np.array(out_quality, float),
                 trials=started, total_epochs=consumed, total_seconds=now)


# ---------------------------------------------------------------------------------------------
# Summaries over replay seeds


def first_reaching(trace: Trace, q: float, axis: str = "epochs") -> float:
    """The epochs (``axis``: or seconds, or trials started) a replay had consumed when its
    selected configuration first reached expected quality ``q``; ``inf`` if it never did."""
    hit = np.flatnonzero(trace.quality >= q)
    return float(getattr(trace, axis)[hit[0]]) if len(hit) else math.inf


def best_so_far(trace: Trace, grid: np.ndarray, axis: str = "epochs") -> np.ndarray:
    """The selected configuration's expected quality at each point of ``grid`` (NaN before
    the replay's first full-budget trial ended)."""
    at = getattr(trace, axis)
    index = np.searchsorted(at, grid, side="right") - 1
    return np.where(index >= 0, trace.quality[np.maximum(index, 0)], math.nan)


def median_or_inf(values: np.ndarray) -> float:
    """The median, where ``inf`` (never reached) sorts last."""
    return float(np.median(np.sort(values))) if len(values) else math.nan


def speedup(random_epochs: np.ndarray, epochs: np.ndarray, rng: np.random.Generator,
            resamples: int = 2000) -> dict[str, float | None]:
    """Median epochs random search needs to reach q over the median the strategy needs, with
    a 95% percentile-bootstrap interval over replay seeds (each side resampled on its own).
    A median that is ``inf`` (q not reached in half the replays) makes the ratio undefined:
    None, as are interval ends whose resamples are undefined more than 2.5% of the time."""
    def ratio(a: np.ndarray, b: np.ndarray) -> float:
        top, bottom = median_or_inf(a), median_or_inf(b)
        return top / bottom if math.isfinite(top) and math.isfinite(bottom) else math.nan

    point = ratio(random_epochs, epochs)
    boot = np.array([ratio(rng.choice(random_epochs, len(random_epochs)),
                           rng.choice(epochs, len(epochs))) for _ in range(resamples)])
    defined = np.isfinite(boot)
    if not defined.any() or (~defined).mean() > 0.025:
        low = high = None
    else:
        low, high = (float(v) for v in np.percentile(boot[defined], [2.5, 97.5]))
    return {"speedup": point if math.isfinite(point) else None, "speedup_low": low,
            "speedup_high": high}


def summarize(traces: list[Trace], random_traces: list[Trace], q: float, seed: int = 0
              ) -> dict[str, Any]:
    """One strategy at one slot count over its replay seeds: epochs and seconds to reach
    ``q`` (median), the speedup over random search (``speedup``), the reached fraction, and
    the expected quality of the final selection (median and interquartile range)."""
    epochs = np.array([first_reaching(t, q) for t in traces])
    seconds = np.array([first_reaching(t, q, "seconds") for t in traces])
    started = np.array([first_reaching(t, q, "started") for t in traces])
    final = np.array([t.quality[-1] if len(t.quality) else math.nan for t in traces])
    baseline = np.array([first_reaching(t, q) for t in random_traces])
    rng = np.random.default_rng(seed)
    return {
        "strategy": traces[0].strategy, "slots": traces[0].slots, "replays": len(traces),
        "q": q, "reached": float(np.isfinite(epochs).mean()),
        "epochs_to_q": median_or_inf(epochs), "seconds_to_q": median_or_inf(seconds),
        "trials_to_q": median_or_inf(started),
        **speedup(baseline, epochs, rng),
        "final_median": float(np.nanmedian(final)),
        "final_q25": float(np.nanpercentile(final, 25)),
        "final_q75": float(np.nanpercentile(final, 75)),
        "trials": float(np.median([t.trials for t in traces])),
        "total_epochs": float(np.median([t.total_epochs for t in traces])),
        "total_seconds": float(np.median([t.total_seconds for t in traces])),
    }


# ---------------------------------------------------------------------------------------------
# A real search in the replay's terms


def real_trace(study, bank: Bank, surrogate: Surrogate, slots: int) -> Trace:
    """The trace of group ``bank.group`` of a real study (``analysis.tables.Study``): its
    full-budget trials in the order they ended, the selection by observed best validation
    accuracy, and the surrogate's expected final accuracy of each selection, so a real search
    and its replays are measured alike. Epochs and seconds count from the group's first epoch."""
    from analysis.tables import latest_attempt

    group = bank.group
    epochs = latest_attempt(study.epochs)
    epochs = epochs[epochs["group"] == group].sort_values("timestamp", kind="stable")
    trials = study.trials[study.trials["group"] == group]
    if epochs.empty or trials.empty:
        raise ValueError(f"--real: the study has no {group} trials")
    start = float((epochs["timestamp"] - epochs["epoch_seconds"]).min())
    ended = epochs.groupby("trial_id")["timestamp"].max()
    trials = trials.assign(ended=trials["trial_id"].map(ended)).sort_values("ended")
    stamps = epochs["timestamp"].to_numpy(float)
    order = epochs.groupby("trial_id")["timestamp"].min().sort_values().index.tolist()
    selected = -math.inf
    out: dict[str, list] = {"epochs": [], "seconds": [], "started": [], "quality": []}
    for row in trials.to_dict("records"):
        if row["status"] != "completed" or int(row["epochs_run"]) < bank.max_epochs:
            continue
        if float(row["best_val_acc"]) <= selected:
            continue
        selected = float(row["best_val_acc"])
        params = {p: row[f"cfg_{p}"] for p in bank.space}
        out["epochs"].append(int(np.searchsorted(stamps, row["ended"], side="right")))
        out["seconds"].append(float(row["ended"]) - start)
        out["started"].append(order.index(row["trial_id"]) + 1)
        out["quality"].append(float(surrogate.predict(positions(bank.space, params))[0, -1]))
    config = study.config
    strategy = f"{config.get('sampler', 'tpe')}+{config.get('scheduler', 'asha')}"
    return Trace(strategy=f"real {strategy.removesuffix('+none')}", slots=slots, seed=-1,
                 epochs=np.array(out["epochs"], int), seconds=np.array(out["seconds"]),
                 started=np.array(out["started"], int), quality=np.array(out["quality"]),
                 trials=len(trials), total_epochs=len(epochs),
                 total_seconds=float(stamps.max()) - start)


def band_position(real: Trace, traces: list[Trace], grid: np.ndarray) -> dict[str, Any]:
    """Where the real best-so-far lies among the replays' at each point of ``grid``
    (epochs): the fraction of replays at or below it, and whether it lies inside the
    interquartile range and inside the 5-95% range of the replays."""
    mine = best_so_far(real, grid)
    values = np.stack([best_so_far(t, grid) for t in traces])
    values = np.where(np.isfinite(values), values, -np.inf)
    shown = np.isfinite(mine)
    rank = (values <= np.where(shown, mine, -np.inf)[None, :]).mean(axis=0)
    low25, high75, low5, high95 = (np.percentile(values, p, axis=0, method="lower")
                                   for p in (25, 75, 5, 95))
    inside_iqr = shown & (mine >= low25) & (mine <= high75)
    inside_90 = shown & (mine >= low5) & (mine <= high95)
    n = max(int(shown.sum()), 1)
    return {"grid": grid.tolist(), "real": mine.tolist(), "rank": rank.tolist(),
            "inside_iqr": float(inside_iqr.sum() / n), "inside_90": float(inside_90.sum() / n)}
