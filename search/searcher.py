"""``GroupSearcher``: every group of a study behind one Ray Tune searcher, one Optuna study each.

All groups share one Tune experiment, so they share every slot of the cluster: whenever a
slot frees, the searcher proposes a trial of the group that has started the fewest trials so
far (groups interleave; none waits for another to finish). Each tuned group keeps its own
Optuna study (TPE, multivariate, constant liar, seeded), named by the group, in an Optuna
RDB storage, so ``optuna-dashboard`` and ``optuna.load_study`` show the search. The baseline
has nothing to tune: its trials are the seeds ``seed … seed + samples - 1`` at the default
settings and never reach Optuna.

Optuna is told what happened to each trial (``kdsearch`` status → Optuna state):

- every reported epoch → ``trial.report(val_acc, step=epoch)`` (intermediate values);
- ``completed`` / ``early_stopped`` → ``COMPLETE`` with ``best_val_acc`` (what selection uses);
- ``asha_stopped`` → ``PRUNED`` (TPE ranks pruned trials by how far they got, then by their
  last intermediate value);
- ``diverged`` → ``COMPLETE`` with 0.0, the worst possible accuracy;
- ``failed`` → ``FAIL`` (ignored by TPE).

Every Optuna trial carries the Tune ``trial_id`` as the user attribute ``trial_id`` and the
kdsearch status as ``status``, so the ``trials`` table and the Optuna storage can be joined.
The searcher's own state (which Tune trial is which Optuna trial) is saved as JSON with Tune's
experiment state; on ``--resume`` the same Optuna studies continue, and Optuna trials that
were asked for but never reached Tune's saved state are marked ``FAIL`` (attribute
``orphaned``), so no configuration counts twice.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

from ray.tune.search import Searcher

from .callback import classify
from .study import StudyConfig

METRIC = "val_acc"


class GroupSearcher(Searcher):
    """Proposes the trials of every group of ``config``; see the module docstring."""

    def __init__(self, config: StudyConfig, optuna_storage: str):
        super().__init__(metric=METRIC, mode="max")
        self.config = config
        self.optuna_storage = optuna_storage
        self.started = {g: 0 for g in config.groups}  # trials handed out per group
        self.live: dict[str, tuple[str, int]] = {}  # Tune trial id -> (group, Optuna number)
        self._studies: dict[str, Any] = {}  # opened lazily; never pickled
        self._trials: dict[str, Any] = {}  # Tune trial id -> optuna.Trial (a handle)
        self._orphans_checked = False

    # -- Optuna ----------------------------------------------------------------------------

    def _study(self, group: str):
        if group not in self._studies:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(storage=self.optuna_storage, study_name=group,
                                        direction="maximize", load_if_exists=True)
            # Seeded by the study seed plus the trials already there: a resumed search does
            # not replay the random proposals it made before the interruption.
            seed = self.config.seed + len(study.get_trials(deepcopy=False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True,
                                                           seed=seed)
            self._studies[group] = study
        return self._studies[group]

    def _distributions(self, group: str) -> dict:
        from optuna.distributions import FloatDistribution

        return {p: FloatDistribution(r.low, r.high, log=r.log, step=r.step)
                for p, r in self.config.group_space(group).items()}

    def _handle(self, trial_id: str):
        """The ``optuna.Trial`` of a live Tune trial (rebuilt from its number after a restore)."""
        if trial_id not in self._trials:
            import optuna

            group, number = self.live[trial_id]
            study = self._study(group)
            storage = study._storage  # the storage object Optuna built from the URL
            study_id = storage.get_study_id_from_name(group)
            optuna_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
            self._trials[trial_id] = optuna.Trial(study, optuna_id)
        return self._trials[trial_id]

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
                    optuna.Trial(study, t._trial_id).set_user_attr("orphaned", True)
                    study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    # -- Tune's searcher interface ---------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | None:
        if not self._orphans_checked:
            self._fail_orphans()
        open_groups = [g for g in self.config.groups if self.started[g] < self.config.samples]
        if not open_groups:
            return Searcher.FINISHED
        group = min(open_groups, key=lambda g: self.started[g])  # ties: the study's order
        index = self.started[group]
        self.started[group] += 1
        if group == "baseline":
            self.live[trial_id] = (group, -1)
            return {"group": group, "seed": self.config.seed + index}
        trial = self._study(group).ask(self._distributions(group))
        trial.set_user_attr("trial_id", trial_id)
        self.live[trial_id] = (group, trial.number)
        self._trials[trial_id] = trial
        return {"group": group, **trial.params}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        group, _ = self.live.get(trial_id, ("baseline", -1))
        if group == "baseline" or not result or result.get("diverged") or result.get("replayed"):
            return
        value, epoch = result.get(METRIC), result.get("epoch")
        if value is None or epoch is None or not math.isfinite(float(value)):
            return
        trial = self._handle(trial_id)
        with warnings.catch_warnings():  # a retried epoch repeats its step: Optuna keeps the first
            warnings.simplefilter("ignore")
            trial.report(float(value), step=int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        import optuna

        if trial_id not in self.live:
            return
        group, number = self.live[trial_id]
        if group == "baseline":
            del self.live[trial_id]
            return
        status = "failed" if error else classify(result or {}, self.config.max_epochs)
        # Tune does not pass the result that ends a trial to on_trial_result: report it here.
        self.on_trial_result(trial_id, result or {})
        study = self._study(group)
        trial = self._handle(trial_id)
        trial.set_user_attr("status", status)
        State = optuna.trial.TrialState
        # skip_if_finished: an errored trial resumed with --resume was told FAIL before
        if status in ("completed", "early_stopped"):
            study.tell(number, float(result["best_val_acc"]), state=State.COMPLETE,
                       skip_if_finished=True)
        elif status == "asha_stopped":
            study.tell(number, state=State.PRUNED, skip_if_finished=True)
        elif status == "diverged":
            study.tell(number, 0.0, state=State.COMPLETE, skip_if_finished=True)
        else:
            study.tell(number, state=State.FAIL, skip_if_finished=True)
        del self.live[trial_id]
        self._trials.pop(trial_id, None)

    # -- state: JSON, saved with Tune's experiment state -----------------------------------

    def get_state(self) -> dict:
        return {"started": dict(self.started), "live": {k: list(v) for k, v in self.live.items()}}

    def set_state(self, state: dict) -> None:
        self.started = {g: int(state["started"].get(g, 0)) for g in self.config.groups}
        self.live = {k: (str(g), int(n)) for k, (g, n) in state["live"].items()}
        self._trials = {}
        self._orphans_checked = False

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as fh:
            json.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            self.set_state(json.load(fh))

    def __getstate__(self) -> dict:  # Tune pickles its search algorithm; Optuna handles stay out
        return {**self.__dict__, "_studies": {}, "_trials": {}}
