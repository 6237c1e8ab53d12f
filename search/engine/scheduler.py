"""``GroupScheduler``: one trial scheduler per tuned group inside one Tune experiment.

All groups of a study run in one Tune experiment (one queue, every slot shared), but a ``kd``
trial must never be ranked against an ``at`` trial: each tuned group gets its own trial
scheduler (``search.engine.algorithms.make_scheduler``: ASHA, asynchronous Hyperband, the
median stopping rule or none), and every scheduler call is routed by the trial's ``group``.
The baseline's seeds are never stopped early (stopping seeds of one configuration would
select noise); they run FIFO. ``GroupASHA`` is the name of the ASHA-only version that older
experiments pickled; it still loads and runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.study import StudyConfig


class GroupScheduler(FIFOScheduler):
    """FIFO order across groups; per-group decisions (``factory(config, group)`` builds the
    scheduler of each tuned group)."""

    def __init__(self, config: StudyConfig,
                 factory: Callable[[StudyConfig, str], TrialScheduler]):
        super().__init__()
        self.schedulers = {group: factory(config, group)
                           for group in config.groups if group != "baseline"}
        self.added: set[str] = set()  # trials handed to a group's scheduler (on_trial_add)

    def __setstate__(self, state: dict) -> None:
        if "asha" in state:  # a GroupASHA pickled before the schedulers had one name
            state["schedulers"] = state.pop("asha")
        self.__dict__.update({"added": set(), **state})  # ``added``: pickled before it

    def _of(self, trial) -> TrialScheduler | None:
        return self.schedulers.get(trial.config.get("group"))

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # every group's scheduler has its metric and mode already

    def _known(self, trial) -> TrialScheduler | None:
        """The scheduler of a trial it was told about (``on_trial_add``), else None."""
        return self._of(trial) if trial.trial_id in self.added else None

    def on_trial_add(self, tune_controller, trial) -> None:
        if (scheduler := self._of(trial)) is not None:
            scheduler.on_trial_add(tune_controller, trial)
            self.added.add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if (scheduler := self._of(trial)) is None or result.get("diverged"):
            return TrialScheduler.CONTINUE
        return scheduler.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if (scheduler := self._known(trial)) is not None:
            scheduler.on_trial_complete(tune_controller, trial, result)
            self.added.discard(trial.trial_id)  # a scheduler forgets a trial once it ends

    def on_trial_remove(self, tune_controller, trial) -> None:
        if (scheduler := self._known(trial)) is not None:
            scheduler.on_trial_remove(tune_controller, trial)
            self.added.discard(trial.trial_id)

    def debug_string(self) -> str:
        return "\n".join(f"{g}: {s.debug_string()}" for g, s in self.schedulers.items())


class GroupASHA(GroupScheduler):
    """One ASHA per tuned group (``scheduler = "asha"``; the class older experiments hold)."""

    def __init__(self, config: StudyConfig):
        from search.engine.algorithms import make_scheduler

        super().__init__(dataclasses.replace(config, scheduler="asha"), make_scheduler)
