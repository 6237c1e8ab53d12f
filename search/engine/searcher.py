"""``GroupSearcher``: every group of a study behind one Ray Tune searcher, one Optuna study each.

All groups share one Tune experiment, so they share every slot of the cluster: whenever a
slot frees, the searcher proposes a trial of the group that has started the fewest trials so
far (groups interleave; none waits for another to finish). Each tuned group keeps its own
Optuna study (its own sampler: TPE, random, QMC, CMA-ES or GP, seeded), named by the group,
in an Optuna RDB storage, so ``optuna-dashboard`` and ``optuna.load_study`` show the search.
The baseline
has nothing to tune: its trials are the seeds ``seed … seed + samples - 1`` at the default
settings and never reach Optuna.

Optuna is told what happened to each trial (``kdsearch`` status → Optuna state):

- every reported epoch → ``trial.report(val_acc, step=epoch)`` (intermediate values);
- ``completed`` / ``early_stopped`` → ``COMPLETE`` with ``best_val_acc`` (what selection uses);
- ``asha_stopped`` (stopped early by the group's trial scheduler: ASHA, Hyperband or the
  median rule) → ``PRUNED`` (TPE ranks pruned trials by how far they got, then by their
  last intermediate value);
- ``diverged`` → ``COMPLETE`` with 0.0, the worst possible accuracy;
- ``failed`` → ``FAIL`` (ignored by TPE).

Every Optuna trial carries the Tune ``trial_id`` as the user attribute ``trial_id``, the
kdsearch status as ``status`` and who proposed it as ``proposer`` (``random`` for a startup
draw, the sampler's name, ``warm start``; also in the Tune config and the ``trials`` table),
so the ``trials`` table and the Optuna storage can be joined. The sampler of each group comes
from ``search.engine.algorithms.make_sampler``; a warm start (``search.engine.warm_start``)
enqueues an earlier study's best configurations when a group's Optuna study is created.

With a ``time_budget`` no trial starts once the search has run that long
(``search_seconds``: the time of every process and experiment of the study, saved with the
state, so the time a killed search was down is not counted); running trials finish.
The searcher's own state (which Tune trial is which Optuna trial) is saved as JSON with Tune's
experiment state; on ``--resume`` the same Optuna studies continue, and Optuna trials that
were asked for but never reached Tune's saved state are marked ``FAIL`` (attribute
``orphaned``), so no configuration counts twice.

A resumed search can replay a trial whose Optuna trial is already finished (the driver died
after the trial ended but before Tune saved its state) or re-run one that errored (Optuna
``FAIL``). Optuna never reopens a finished trial, so nothing more is reported to it; when the
trial ends with another outcome than Optuna holds, a new Optuna trial with the same
parameters and the true outcome is added, with the user attribute ``supersedes`` (the
number it replaces). The Optuna trial of a Tune trial is therefore the latest one carrying
its ``trial_id`` (``latest_outcomes``), and ``reconcile`` makes that agree with the
``trials`` table once the search is done.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from typing import Any

from ray.tune.search import Searcher

from search.engine.callback import classify
from search.study import StudyConfig

METRIC = "val_acc"


def optuna_outcome(status: str, best_val_acc: float | None) -> tuple[str, float | None]:
    """(Optuna state name, value) that a kdsearch trial status is told as (module docstring)."""
    if status in ("completed", "early_stopped"):
        return "COMPLETE", float(best_val_acc)
    if status == "asha_stopped":
        return "PRUNED", None
    if status == "diverged":
        return "COMPLETE", 0.0
    return "FAIL", None


def distribution(name: str, r):
    """The Optuna distribution of a search range (``search.study.ParamRange``): categorical
    for ``choices``, int for an integer setting (batch_size), else float."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from search.study.space import INT_PARAMS

    if r.categorical:
        return CategoricalDistribution(r.choices)
    if name in INT_PARAMS:
        return IntDistribution(int(r.low), int(r.high), log=r.log, step=int(r.step or 1))
    return FloatDistribution(r.low, r.high, log=r.log, step=r.step)


def _agrees(trial, state: str, value: float | None) -> bool:
    """Whether the Optuna ``trial`` (a FrozenTrial) holds ``state`` and ``value``."""
    if trial.state.name != state:
        return False
    return value is None or (trial.value is not None and abs(trial.value - value) <= 1e-9)


class GroupSearcher(Searcher):
    """Proposes the trials of every group of ``config``; see the module docstring."""

    def __init__(self, config: StudyConfig, optuna_storage: str,
                 started: dict[str, int] | None = None, searched: float = 0.0):
        super().__init__(metric=METRIC, mode="max")
        self.config = config
        self.optuna_storage = optuna_storage
        # trials handed out per group (``started``: by earlier experiments of a grown search)
        self.started = {g: int((started or {}).get(g, 0)) for g in config.groups}
        self.late: dict[str, dict[int, float]] = {}  # values Optuna could no longer take
        self.live: dict[str, tuple[str, int]] = {}  # Tune trial id -> (group, Optuna number)
        self._store = None  # the Optuna storage object, opened lazily; never pickled
        self._studies: dict[str, Any] = {}  # opened lazily; never pickled
        self._trials: dict[str, Any] = {}  # Tune trial id -> optuna.Trial (a handle)
        self._orphans_checked = False
        # Search time: seconds of earlier processes and experiments (``searched``, saved with
        # the state), plus this process's since ``_since`` (never pickled: a resumed search
        # does not count the downtime). ``budget_reached``: suggest stopped on time_budget.
        self.searched = float(searched)
        self._since: float | None = time.monotonic()
        self.budget_reached = False

    # -- Optuna ----------------------------------------------------------------------------

    def _study(self, group: str):
        if group not in self._studies:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            from search.engine.algorithms import make_sampler
            from search.engine.warm_start import enqueue_warm_start

            study = optuna.create_study(storage=self._storage(), study_name=group,
                                        direction="maximize", load_if_exists=True)
            # Seeded by the study seed plus the trials already there: a resumed search does
            # not replay the random proposals it made before the interruption (QMC keeps one
            # seeded sequence: search.engine.algorithms).
            trials = len(study.get_trials(deepcopy=False))
            study.sampler = make_sampler(self.config, self._distributions(group), trials)
            if trials == 0:
                enqueue_warm_start(self.config, group, study)  # once, when the study is new
            self._studies[group] = study
        return self._studies[group]

    def _storage(self):
        """One Optuna storage object for every group's study (``optuna.storages.get_storage``)."""
        if self._store is None:
            import optuna

            self._store = optuna.storages.get_storage(self.optuna_storage)
        return self._store

    def _distributions(self, group: str) -> dict:
        return {p: distribution(p, r) for p, r in self.config.group_space(group).items()}

    def _handle(self, trial_id: str):
        """The ``optuna.Trial`` of a live Tune trial (rebuilt from its number after a restore)."""
        if trial_id not in self._trials:
            import optuna

            group, number = self.live[trial_id]
            study = self._study(group)
            self._trials[trial_id] = optuna.Trial(study, trial_key(self._storage(), study,
                                                                   number))
        return self._trials[trial_id]

    def _frozen(self, group: str, number: int):
        """The stored state of Optuna trial ``number`` of ``group`` (a FrozenTrial)."""
        storage = self._storage()
        return storage.get_trial(trial_key(storage, self._study(group), number))

    def _running(self, trial_id: str) -> bool:
        import optuna

        group, number = self.live[trial_id]
        return self._frozen(group, number).state == optuna.trial.TrialState.RUNNING

    def _lookup(self, trial_id: str) -> tuple[str, int] | None:
        """(group, Optuna number) of a Tune trial: live, or re-run by a resume after it ended
        (its latest Optuna trial, found by the ``trial_id`` attribute); None for the baseline."""
        if trial_id not in self.live:
            for group in self.config.groups:
                if group == "baseline":
                    continue
                mine = [t for t in self._study(group).get_trials(deepcopy=False)
                        if t.user_attrs.get("trial_id") == trial_id]
                if mine:
                    self.live[trial_id] = (group, max(t.number for t in mine))
                    break
            else:
                self.live[trial_id] = ("baseline", -1)  # none: a baseline seed, not looked up again
        group, number = self.live[trial_id]
        return None if group == "baseline" else (group, number)

    def _fail_orphans(self) -> None:
        """Mark Optuna trials that are RUNNING but belong to no live Tune trial as FAIL."""
        import optuna

        self._orphans_checked = True
        mine = {(g, n) for g, n in self.live.values()}
        for group in self.config.groups:
            if group == "baseline":
                continue
            study = self._study(group)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if (group, t.number) not in mine:
                    fail_orphan(self._storage(), study, t)

    # -- Tune's searcher interface ---------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | None:
        if not self._orphans_checked:
            self._fail_orphans()
        open_groups = [g for g in self.config.groups if self.started[g] < self.config.samples]
        budget = self.config.time_budget
        if open_groups and budget is not None:
            self.budget_reached = self.search_seconds() >= budget
            if self.budget_reached:  # no trial starts after the budget
                return Searcher.FINISHED
        if not open_groups:
            return Searcher.FINISHED
        group = min(open_groups, key=lambda g: self.started[g])  # ties: the study's order
        index = self.started[group]
        self.started[group] += 1
        if group == "baseline":
            self.live[trial_id] = (group, -1)
            return {"group": group, "seed": self.config.seed + index}
        from search.engine.algorithms import proposer

        study = self._study(group)
        who = proposer(self.config, study)  # counted as the sampler counts, before it draws
        trial = study.ask(self._distributions(group))
        who = trial.user_attrs.get("proposer", who)  # an enqueued trial: ``warm start``
        trial.set_user_attr("proposer", who)
        trial.set_user_attr("trial_id", trial_id)
        self.live[trial_id] = (group, trial.number)
        self._trials[trial_id] = trial
        return {"group": group, **trial.params, "proposer": who}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not result or result.get("diverged") or result.get("replayed"):
            return
        value, epoch = result.get(METRIC), result.get("epoch")
        if value is None or epoch is None or not math.isfinite(float(value)):
            return
        if self._lookup(trial_id) is None:
            return
        if not self._running(trial_id):  # a replayed or re-run trial: Optuna has its outcome
            self.late.setdefault(trial_id, {})[int(epoch)] = float(value)
            return
        trial = self._handle(trial_id)
        with warnings.catch_warnings():  # a retried epoch repeats its step: Optuna keeps the first
            warnings.simplefilter("ignore")
            trial.report(float(value), step=int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        found = self._lookup(trial_id)
        if found is None:
            self.live.pop(trial_id, None)
            return
        group, number = found
        status = "failed" if error else classify(result or {}, self.config.max_epochs)
        # Tune does not pass the result that ends a trial to on_trial_result: report it here.
        self.on_trial_result(trial_id, result or {})
        state, value = optuna_outcome(status, (result or {}).get("best_val_acc"))
        if self._running(trial_id):
            import optuna

            self._handle(trial_id).set_user_attr("status", status)
            self._study(group).tell(number, value, state=optuna.trial.TrialState[state])
        else:
            tell_outcome(self._storage(), self._study(group), self._frozen(group, number),
                         status, state, value, self.late.get(trial_id, {}))
        del self.live[trial_id]
        self._trials.pop(trial_id, None)
        self.late.pop(trial_id, None)

    # -- state: JSON, saved with Tune's experiment state -----------------------------------

    def search_seconds(self) -> float:
        """Seconds this search has run, over every process and experiment of the study."""
        if self._since is None:  # unpickled and not restored: counting starts now
            self._since = time.monotonic()
        return self.searched + time.monotonic() - self._since

    def get_state(self) -> dict:
        return {"started": dict(self.started), "live": {k: list(v) for k, v in self.live.items()},
                "late": {k: {str(e): v for e, v in d.items()} for k, d in self.late.items()},
                "search_seconds": self.search_seconds(),
                "budget_reached": self.budget_reached}

    def set_state(self, state: dict) -> None:
        self.searched = float(state.get("search_seconds", 0.0))
        self._since = time.monotonic()  # the time the search was down is not counted
        self.budget_reached = bool(state.get("budget_reached", False))
        self.started = {g: int(state["started"].get(g, 0)) for g in self.config.groups}
        self.live = {k: (str(g), int(n)) for k, (g, n) in state["live"].items()}
        self.late = {k: {int(e): float(v) for e, v in d.items()}
                     for k, d in state.get("late", {}).items()}
        self._trials = {}
        self._orphans_checked = False

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as fh:
            json.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            self.set_state(json.load(fh))

    def __getstate__(self) -> dict:  # Tune pickles its search algorithm; Optuna handles stay out
        return {**self.__dict__, "_store": None, "_studies": {}, "_trials": {}, "_since": None}

    def __setstate__(self, state: dict) -> None:  # a searcher pickled before these fields
        self.__dict__.update({"_store": None, "searched": 0.0, "_since": None,
                              "budget_reached": False, **state})


# ---------------------------------------------------------------------------------------------
# Optuna's record against the trials table


def trial_key(storage, study, number: int) -> int:
    """The storage's id of trial ``number`` of ``study`` (what ``optuna.Trial`` is built from),
    through the public storage API."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def fail_orphan(storage, study, trial) -> None:
    """Mark a RUNNING Optuna trial that no Tune trial will ever finish as FAIL (``orphaned``)."""
    import optuna

    optuna.Trial(study, trial_key(storage, study, trial.number)).set_user_attr("orphaned", True)
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def tell_outcome(storage, study, trial, status: str, state: str, value: float | None,
                 late: dict[int, float] | None = None) -> bool:
    """Make Optuna hold ``state``/``value`` for the Tune trial whose latest Optuna trial is
    ``trial`` (a FrozenTrial): tell a RUNNING one; add a superseding trial (same parameters,
    intermediate values plus ``late`` ones) where a finished one says otherwise. Returns
    whether anything was written."""
    import optuna

    State = optuna.trial.TrialState
    if trial.state == State.RUNNING:
        optuna.Trial(study, trial_key(storage, study, trial.number)).set_user_attr("status",
                                                                                   status)
        study.tell(trial.number, value, state=State[state])
        return True
    if _agrees(trial, state, value):
        return False
    study.add_trial(optuna.trial.create_trial(
        params=trial.params, distributions=trial.distributions, value=value,
        state=State[state], intermediate_values={**trial.intermediate_values, **(late or {})},
        user_attrs={**trial.user_attrs, "status": status, "supersedes": trial.number}))
    return True


def latest_outcomes(config: StudyConfig, optuna_storage: str) -> dict[str, Any]:
    """Tune trial id -> its latest Optuna trial (FrozenTrial), over the study's tuned groups;
    RUNNING trials without a ``trial_id`` attribute are left out."""
    out: dict[str, Any] = {}
    for study in _studies(config, optuna_storage).values():
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            if "trial_id" in t.user_attrs:
                out[t.user_attrs["trial_id"]] = t
    return out


def _studies(config: StudyConfig, optuna_storage) -> dict[str, Any]:
    """The Optuna study of each tuned group that has one (``optuna_storage``: a URL or a
    storage object)."""
    import optuna

    out = {}
    for group in config.groups:
        if group == "baseline":
            continue
        try:
            out[group] = optuna.load_study(study_name=group, storage=optuna_storage)
        except KeyError:  # no Optuna study: nothing was asked for this group
            continue
    return out


def reconcile(config: StudyConfig, optuna_storage: str, trials) -> int:
    """Make the Optuna storage agree with the ``trials`` table (one row per trial): each
    trial's latest Optuna trial holds the state and value its status is told as
    (``optuna_outcome``), and an Optuna trial still RUNNING with no row is FAIL
    (``orphaned``). Returns how many Optuna trials were written."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.get_storage(optuna_storage)
    studies = _studies(config, storage)
    latest = latest_outcomes(config, storage)
    written = 0
    for row in trials.to_dict("records"):
        trial = latest.get(str(row["trial_id"]))
        if row["group"] not in studies or trial is None:
            continue
        state, value = optuna_outcome(str(row["status"]), row["best_val_acc"])
        written += tell_outcome(storage, studies[row["group"]], trial, str(row["status"]),
                                state, value)
    known = set(trials["trial_id"].astype(str)) if len(trials) else set()
    for study in studies.values():
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("trial_id") not in known:
                fail_orphan(storage, study, t)
                written += 1
    return written
