"""The driver-side Tune callback that turns trial results into Parquet rows.

``on_trial_result`` writes one ``epochs`` row per reported epoch; ``on_trial_complete`` and
``on_trial_error`` write the trial's ``trials`` row. Status of a finished trial:

- ``diverged``: its last result carries ``diverged=True`` (non-finite loss; see trainable);
- ``early_stopped``: fit stopped it on a validation-loss plateau (``patience``);
- ``completed``: it ran ``max_epochs`` epochs;
- ``asha_stopped``: it ended before ``max_epochs`` for none of those reasons, i.e. the
  group's trial scheduler stopped it early (ASHA or Hyperband at a rung, or the median
  stopping rule; the name predates the other schedulers and stays for the tables' sake);
- ``failed``: it raised an error more often than ``FailureConfig(max_failures)`` allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from search.store import rows
from search.store.rows import CFG
from search.store.sink import ParquetSink
from search.study import StudyConfig


def classify(result: dict[str, Any], max_epochs: int) -> str:
    """Status of a trial that ended without an error, from its last result."""
    if not result or "epoch" not in result:
        return "failed"
    if result.get("diverged"):
        return "diverged"
    if result.get("early_stopped"):
        return "early_stopped"
    if int(result.get("epochs_run", result["epoch"])) >= max_epochs:
        return "completed"
    return "asha_stopped"


def epoch_row(study: str, group: str, trial_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """The ``epochs`` row of one reported result (``search.store.rows.epoch_row``)."""
    return rows.epoch_row(study, group, trial_id, result["attempt"], result["epoch"],
                          result["seed"], result, result, result.get("node", ""))


def trial_row(study: StudyConfig, group: str, trial: Any, status: str,
              error: str = "") -> dict[str, Any]:
    result = dict(trial.last_result or {})
    cfg = {c: result.get(c) for c in CFG}
    seed = result.get("seed")
    if seed is None:  # no result yet: rebuild the trial's settings from its Tune config
        try:
            from search.engine.trainable import cfg_columns, trial_settings

            settings = trial_settings(study, trial.config)
            cfg, seed = cfg_columns(settings), settings.seed
        except (KeyError, ValueError, TypeError):
            seed = study.seed
    if not error:
        error = str(result.get("error", "") or "")
    return rows.trial_row(study.study, group, str(trial.trial_id), status,
                          result.get("epochs_run", 0), result.get("best_val_acc"),
                          result.get("best_epoch", 0), result.get("wall_seconds"), seed, cfg,
                          error, proposer=(trial.config or {}).get("proposer"))


def _error_text(trial: Any) -> str:
    """The last line of the trial's error trace (Ray keeps the full trace in the trial dir).

    Tune writes ``error.txt`` into the trial's local staging folder and copies it to the
    storage later; the local file is read first, so the text does not depend on that copy.
    """
    text = ""
    try:
        local = trial.error_file
        if local and Path(local).is_file():
            text = Path(local).read_text(errors="replace")
        else:
            text = str(trial.get_error() or "")
    except Exception:  # the error file may be gone or unreadable
        text = ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:1000]


class SinkCallback(Callback):
    """Writes the epoch and trial rows of every group of a study through a ``ParquetSink``.

    Runs on the driver; a trial's group is its Tune config's ``group``.
    """

    def __init__(self, study: StudyConfig, sink: ParquetSink):
        self.study = study
        self.sink = sink

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if "epoch" not in result or result.get("diverged") or result.get("replayed"):
            return
        group = trial.config["group"]
        row = epoch_row(self.study.study, group, str(trial.trial_id), result)
        self.sink.append("epochs", group, [row])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = classify(trial.last_result or {}, self.study.max_epochs)
        error = "" if status != "failed" else "trial ended without reporting a result"
        group = trial.config["group"]
        self.sink.append("trials", group, [trial_row(self.study, group, trial, status, error)])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        group = trial.config["group"]
        row = trial_row(self.study, group, trial, "failed", _error_text(trial))
        self.sink.append("trials", group, [row])
