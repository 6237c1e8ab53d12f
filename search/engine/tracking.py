"""Experiment tracking (``--log tensorboard``, ``--log mlflow``): Ray Tune's own logger
callbacks, told what a trial of a study is.

Both log what the ``epochs`` table holds: one point per epoch at step ``epoch`` (a result
without an epoch, a diverged trial's last result and a replayed one are skipped, as the sink
skips them), every numeric value the trainable reports except the trial's ``cfg_*``
parameters and Tune's own bookkeeping (``training_iteration``, ``timestamp``, ...).

- TensorBoard (``StudyTBXCallback``, Ray's ``TBXLoggerCallback``): an event file in each
  trial's directory, ``<study>/ray/<experiment>/trial_<id>/events.out.tfevents.*``, scalars
  named ``ray/tune/<metric>`` (Tune writes it on the driver and copies it to the study's
  storage with the rest of the experiment).
- MLflow (``StudyMLflowCallback``, Ray's ``MLflowLoggerCallback``): one MLflow experiment per
  study (named by the study), one run per trial named ``<group>/trial_<id>`` and tagged
  ``study``, ``group``, ``trial_id`` and, when it ends, ``status``; the trial's Tune config
  as parameters. A trial that continues after ``--resume`` continues its run (found by its
  ``trial_id`` tag). Default store: SQLite ``<study>/mlflow/mlflow.db`` with artifacts in
  ``<study>/mlflow/artifacts`` (MLflow 3 refuses its old ``file://`` store); for URI storage
  the same under the local cache folder.

The callbacks run on the driver and are pickled with the experiment: a restored experiment
(``--resume``) keeps the tracking it was started with.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, TRAINING_ITERATION

from search.engine.callback import classify
from search.engine.experiment import trial_dirname
from search.store import files as fsutil
from search.store.files import RAY_DIR
from search.study import StudyConfig

LOGS = ("tensorboard", "mlflow")  # the values of --log (search.commands.parser)


def epoch_metrics(result: dict[str, Any]) -> dict[str, float] | None:
    """The numeric values of one epoch's result, or None for a result the ``epochs`` table
    does not get a row for (no epoch, diverged, replayed)."""
    if "epoch" not in result or result.get("diverged") or result.get("replayed"):
        return None
    return {k: float(v) for k, v in result.items()
            if k not in AUTO_RESULT_KEYS and not k.startswith("cfg_")
            and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def tensorboard_dir(config: StudyConfig) -> str:
    """Where the event files land: a trial's directory under ``<study>/ray/<experiment>/``."""
    return fsutil.join(config.study_dir, RAY_DIR)


def mlflow_store(config: StudyConfig) -> Path:
    """The folder of the default MLflow store: ``<study>/mlflow``, or for URI storage
    ``<cache>/mlflow/<study>`` (the driver's local cache folder)."""
    if fsutil.is_uri(config.storage):
        from kdcore.data import _cache_dir

        return _cache_dir() / "mlflow" / config.study
    return Path(config.study_dir).resolve() / "mlflow"


def mlflow_tracking_uri(config: StudyConfig, uri: str | None = None) -> str:
    """``uri``, else the SQLite database of the default store (``mlflow_store``)."""
    return uri or f"sqlite:///{mlflow_store(config) / 'mlflow.db'}"


class StudyTBXCallback(TBXLoggerCallback):
    """Ray's TensorBoard callback, writing the epoch results (``epoch_metrics``) at step
    ``epoch``."""

    def __init__(self, config: StudyConfig):
        super().__init__()
        self.where = (f"tensorboard: event files in each trial's directory under "
                      f"{tensorboard_dir(config)}/<experiment>/ "
                      f"(tensorboard --logdir {tensorboard_dir(config)})")

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        metrics = epoch_metrics(result)
        if metrics is not None:
            super().log_trial_result(iteration, trial,
                                     {**metrics, TRAINING_ITERATION: int(result["epoch"])})


class StudyMLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow callback with one run per trial, named and tagged by its group (see the
    module docstring); ``artifact_location`` is used when it creates the experiment."""

    def __init__(self, config: StudyConfig, tracking_uri: str,
                 artifact_location: str | None = None):
        super().__init__(tracking_uri, experiment_name=config.study,
                         tags={"study": config.study})
        self.artifact_location = artifact_location
        self.max_epochs = config.max_epochs
        self.where = (f"mlflow: experiment {config.study!r}, one run per trial, in "
                      f"{tracking_uri} (mlflow ui --backend-store-uri {tracking_uri})")

    def setup(self, *args, **kwargs) -> None:
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True,
                                                                    exist_ok=True)
        self.mlflow_util.setup_mlflow(
            tracking_uri=self.tracking_uri, registry_uri=self.registry_uri,
            experiment_name=self.experiment_name, tracking_token=self.tracking_token,
            artifact_location=self.artifact_location)
        self.tags = self.tags or {}
        self._trial_runs = {}

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:
            client, trial_id = self._client(), str(trial.trial_id)
            found = client.search_runs([self.mlflow_util.experiment_id],
                                       filter_string=f"tags.trial_id = '{trial_id}'",
                                       max_results=1)
            if found:  # the trial continues after --resume: so does its run
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                group = trial.config["group"]
                tags = {**self.tags, "group": group, "trial_id": trial_id,
                        "trial_name": str(trial)}
                run_id = self.mlflow_util.start_run(
                    run_name=f"{group}/{trial_dirname(trial)}", tags=tags).info.run_id
            self._trial_runs[trial] = run_id
        super().log_trial_start(trial)  # logs the config as parameters

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        metrics = epoch_metrics(result)
        if metrics is None:
            return
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics,
                                     step=int(result["epoch"]))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial not in self._trial_runs:
            return
        status = "failed" if failed else classify(trial.last_result or {}, self.max_epochs)
        self._client().set_tag(self._trial_runs[trial], "status", status)
        super().log_trial_end(trial, failed)


def tracking_callbacks(config: StudyConfig, logs: Iterable[str] = (),
                       mlflow_uri: str | None = None) -> list:
    """The Tune callbacks of ``logs`` (each ``tensorboard`` or ``mlflow``) for ``make_tuner``;
    MLflow logs to ``mlflow_uri``, else to the default store (``mlflow_tracking_uri``).
    An unknown tracker or a missing mlflow is a one-line ValueError."""
    logs = list(dict.fromkeys(logs))
    unknown = [x for x in logs if x not in LOGS]
    if unknown:
        raise ValueError(f"log: unknown tracker {unknown[0]!r} (choose from {', '.join(LOGS)})")
    callbacks: list = []
    if "tensorboard" in logs:
        callbacks.append(StudyTBXCallback(config))
    if "mlflow" in logs:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ValueError("log: --log mlflow needs mlflow: pip install 'kdsearch[mlflow]' "
                             "(or mlflow-skinny)") from None
        artifacts = None if mlflow_uri else str(mlflow_store(config) / "artifacts")
        callbacks.append(StudyMLflowCallback(config, mlflow_tracking_uri(config, mlflow_uri),
                                             artifacts))
    return callbacks


def print_tracking(callbacks: Iterable) -> None:
    """One line per tracking callback: where its files or runs land."""
    for cb in callbacks:
        if getattr(cb, "where", None):
            print(cb.where, flush=True)

