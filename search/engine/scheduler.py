"""``GroupASHA``: one ASHA per tuned group inside one Tune experiment.

All groups of a study run in one Tune experiment (one queue, every slot shared), but a ``kd``
trial must never be ranked against an ``at`` trial: each tuned group gets its own
``AsyncHyperBandScheduler`` (its own rungs), and every scheduler call is routed by the trial's
``group``. The baseline's seeds are never stopped early (stopping seeds of one configuration
would select noise); they run FIFO.
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from search.study import StudyConfig


class GroupASHA(FIFOScheduler):
    """FIFO order across groups; per-group ASHA decisions (time attribute ``epoch``)."""

    def __init__(self, config: StudyConfig, metric: str = "val_acc"):
        super().__init__()
        self.asha = {
            group: AsyncHyperBandScheduler(
                time_attr="epoch", metric=metric, mode="max", max_t=config.max_epochs,
                grace_period=config.grace_period, reduction_factor=config.reduction_factor)
            for group in config.groups if group != "baseline"
        }
        self.added: set[str] = set()  # trials handed to an ASHA (on_trial_add)

    def _of(self, trial) -> AsyncHyperBandScheduler | None:
        return self.asha.get(trial.config.get("group"))

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # every ASHA has its metric and mode already

    def _known(self, trial) -> AsyncHyperBandScheduler | None:
        """The ASHA of a trial it was told about (``on_trial_add``), else None."""
        added = self.__dict__.setdefault("added", set())  # a scheduler pickled before ``added``
        return self._of(trial) if trial.trial_id in added else None

    def on_trial_add(self, tune_controller, trial) -> None:
        if (asha := self._of(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)
            self.__dict__.setdefault("added", set()).add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if (asha := self._of(trial)) is None or result.get("diverged"):
            return TrialScheduler.CONTINUE
        return asha.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if (asha := self._known(trial)) is not None:
            asha.on_trial_complete(tune_controller, trial, result)
            self.added.discard(trial.trial_id)  # ASHA forgets a trial once it ends

    def on_trial_remove(self, tune_controller, trial) -> None:
        if (asha := self._known(trial)) is not None:
            asha.on_trial_remove(tune_controller, trial)
            self.added.discard(trial.trial_id)

    def debug_string(self) -> str:
        return "\n".join(f"{g}: {a.debug_string()}" for g, a in self.asha.items())
