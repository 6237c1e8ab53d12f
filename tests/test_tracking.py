"""Experiment tracking (``--log tensorboard``, ``--log mlflow``): flags, errors, and what a
real (simulated) search writes, read back with TensorBoard's and MLflow's own readers and
compared with the ``epochs`` table.

The slow test runs one search of two groups on a private local Ray instance (2 CPUs) with
sleeping trials (``run_tune(simulate=...)``); nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")  # the test extra installs it (pyproject.toml)

from helpers import tiny

from search.commands.cli import main
from search.commands.parser import LOG_CHOICES, build_parser
from search.commands.tune import tracking_from_args
from search.store.sink import read_table
from search.study import group_params, read_study_json

METRICS = ("val_acc", "val_loss", "train_loss")


# ---------------------------------------------------------------------------------------------
# Flags and errors


def test_log_flags_are_repeatable_or_comma_separated(tmp_path):
    from search.engine.tracking import LOGS, StudyMLflowCallback, StudyTBXCallback

    assert LOG_CHOICES == LOGS  # the parser spells them without importing Ray
    parse = build_parser().parse_args
    assert parse(["tune", "--log", "tensorboard,mlflow"]).log == ["tensorboard", "mlflow"]
    assert parse(["run", "--log", "mlflow", "--log", "tensorboard"]).log == [
        "mlflow", "tensorboard"]
    args = parse(["tune"])
    assert args.log is None and args.mlflow_uri is None
    config = tiny(tmp_path, study="flags")
    assert tracking_from_args(config, args) == []
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    got = tracking_from_args(config, parse(["tune", "--log", "tensorboard,tensorboard",
                                            "--mlflow-uri", uri]))  # the URI implies mlflow
    assert [type(c) for c in got] == [StudyTBXCallback, StudyMLflowCallback]
    assert got[1].tracking_uri == uri and got[1].artifact_location is None
    default = tracking_from_args(config, parse(["tune", "--log", "mlflow"]))[0]
    store = Path(config.study_dir).resolve() / "mlflow"
    assert default.tracking_uri == f"sqlite:///{store / 'mlflow.db'}"
    assert default.artifact_location == str(store / "artifacts")
    assert not Path(config.study_dir).exists()  # nothing is written before the search runs


@pytest.mark.parametrize("value", ["wandb", "tensorboard,wandb", ","])
def test_bad_log_value_is_one_line(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--storage", str(tmp_path), "--study", "x", "--log", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--log" in err[0], err
    assert "unknown tracker" in err[0] and "tensorboard, mlflow" in err[0]
    from search.engine.tracking import tracking_callbacks

    with pytest.raises(ValueError, match="^log: unknown tracker 'wandb'"):
        tracking_callbacks(tiny(tmp_path), ["wandb"])


@pytest.mark.parametrize("command", ["tune", "run"])
def test_missing_mlflow_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch,
                                                         command):
    import ray

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    store = tmp_path / "store"
    group = ["--group", "kd"] if command == "tune" else []
    rc = main([command, "--preset", "smoke", "--data", "synthetic:40", "--storage", str(store),
               "--study", "nomlflow", *group, "--log", "tensorboard,mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "mlflow" in err[0] and "pip install" in err[0], err
    assert not store.exists() and not ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# The MLflow callback without Ray: one run per trial, also across a restored experiment


class _Trial:
    """What the callbacks read of a Tune trial."""

    def __init__(self, trial_id: str, config: dict, last_result: dict | None = None):
        self.trial_id, self.config, self.last_result = trial_id, config, last_result or {}
        self.evaluated_params = config

    def __str__(self) -> str:
        return f"train_trial_{self.trial_id}"


def test_mlflow_run_per_trial_survives_a_restore(tmp_path):
    from mlflow.tracking import MlflowClient

    from search.engine.tracking import StudyMLflowCallback, epoch_metrics

    assert epoch_metrics({"training_iteration": 1}) is None
    assert epoch_metrics({"epoch": 2, "replayed": True}) is None
    assert epoch_metrics({"epoch": 2, "diverged": True, "val_acc": 0.0}) is None
    got = epoch_metrics({"epoch": 2, "val_acc": 0.5, "node": "10.0.0.1", "diverged": False,
                         "cfg_T": 2.0, "seed": 3, "timestamp": 1.0, "config": {"T": 2.0}})
    assert got == {"epoch": 2.0, "val_acc": 0.5, "seed": 3.0}

    config = tiny(tmp_path, study="restored", max_epochs=3)
    uri = f"sqlite:///{tmp_path}/ml/mlflow.db"
    trial_config = {"group": "kd", "T": 2.0, "w_ce": 0.5, "w_kl": 1.0}
    first = StudyMLflowCallback(config, uri, str(tmp_path / "ml" / "artifacts"))
    first.setup()
    trial = _Trial("abc_00000", trial_config)
    first.log_trial_start(trial)
    first.log_trial_result(1, trial, {"epoch": 1, "val_acc": 0.3, "training_iteration": 1})
    # The driver dies; the restored experiment has a new callback and a new Trial object.
    again = StudyMLflowCallback(config, uri, str(tmp_path / "ml" / "artifacts"))
    again.setup()
    trial = _Trial("abc_00000", trial_config, {"epoch": 2, "epochs_run": 2})
    again.log_trial_start(trial)
    again.log_trial_result(1, trial, {"epoch": 2, "val_acc": 0.4, "training_iteration": 1})
    again.log_trial_result(2, trial, {"epoch": 2, "val_acc": 0.4, "replayed": True})
    again.log_trial_end(trial)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("restored")
    assert experiment.artifact_location == str(tmp_path / "ml" / "artifacts")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "kd/trial_abc_00000" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["study"], tags["group"], tags["trial_id"], tags["status"]) == (
        "restored", "kd", "abc_00000", "asha_stopped")
    assert run.data.params == {k: str(v) for k, v in trial_config.items()}
    assert set(run.data.metrics) == {"epoch", "val_acc"}
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.3), (2, 0.4)]


# ---------------------------------------------------------------------------------------------
# A real search with both trackers


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One simulated search (baseline + kd, 2 trials each, 3 epochs) with
    ``--log tensorboard,mlflow``; yields (config, console output)."""
    import ray

    from search.commands.tune import run_tune

    config = tiny(tmp_path_factory.mktemp("tracked"), study="tracked",
                  groups=["baseline", "kd"], samples=2)
    args = build_parser().parse_args(["tune", "--log", "tensorboard,mlflow"])
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console):
            run_tune(config, simulate=0.2, num_cpus=2,
                     callbacks=tracking_from_args(config, args))
        yield config, console.getvalue()
    finally:
        ray.shutdown()


def _latest_epochs(config) -> dict:
    """{trial_id: epochs rows by epoch} of the ``epochs`` table (the latest attempt)."""
    epochs = read_table(config.study_dir, "epochs")
    epochs = epochs.sort_values("attempt").drop_duplicates(["trial_id", "epoch"], keep="last")
    return {t: rows.sort_values("epoch") for t, rows in epochs.groupby("trial_id")}


def _same(a, b) -> bool:
    try:
        return float(a) == pytest.approx(float(b))
    except (TypeError, ValueError):
        return str(a) == str(b)


@pytest.mark.slow
def test_tensorboard_scalars_are_the_epochs_table(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, console = tracked
    ray_dir = Path(config.study_dir) / "ray"
    assert console.count(f"tensorboard: event files in each trial's directory under {ray_dir}"
                         ) == 1, console
    epochs = _latest_epochs(config)
    trials = read_table(config.study_dir, "trials")
    dirs = sorted((ray_dir / "search").glob("trial_*"))
    assert {d.name for d in dirs} == {f"trial_{t}" for t in trials.trial_id}
    for d in dirs:
        (events,) = d.glob("events.out.tfevents.*")  # ours replaces Ray's default writer
        acc = EventAccumulator(str(d))
        acc.Reload()
        scalars = set(acc.Tags()["scalars"])
        assert {f"ray/tune/{m}" for m in METRICS} <= scalars
        assert not any("cfg_" in s or "training_iteration" in s for s in scalars), scalars
        rows = epochs[d.name.removeprefix("trial_")]
        for metric in METRICS:
            got = [(s.step, s.value) for s in acc.Scalars(f"ray/tune/{metric}")]
            want = list(zip(rows.epoch, rows[metric], strict=True))
            assert [s for s, _ in got] == [int(e) for e, _ in want], (d.name, metric)
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


@pytest.mark.slow
def test_mlflow_runs_are_the_trials_and_epochs(tracked):
    from mlflow.tracking import MlflowClient

    config, console = tracked
    uri = f"sqlite:///{Path(config.study_dir).resolve() / 'mlflow' / 'mlflow.db'}"
    assert console.count(f"mlflow: experiment 'tracked', one run per trial, in {uri}") == 1
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.study)
    runs = client.search_runs([experiment.experiment_id])
    trials = read_table(config.study_dir, "trials").set_index("trial_id")
    epochs = _latest_epochs(config)
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials.index)  # one each
    for run in runs:
        trial_id, tags = run.data.tags["trial_id"], run.data.tags
        trial = trials.loc[trial_id]
        assert (tags["group"], tags["study"], tags["status"]) == (
            trial.group, "tracked", trial.status)
        assert run.info.run_name == f"{trial.group}/trial_{trial_id}"
        assert run.info.status == "FINISHED"
        params_json = Path(config.study_dir) / "ray" / "search" / f"trial_{trial_id}"
        tune_config = json.loads((params_json / "params.json").read_text())
        assert run.data.params == {k: str(v) for k, v in tune_config.items()}
        searched = set(group_params(trial.group)) or {"seed"}  # a baseline trial: its seed
        assert searched <= set(run.data.params), (searched, run.data.params)
        for name in searched:  # and they are what the trial trained with
            column = "seed" if name == "seed" else f"cfg_{name}"
            assert _same(run.data.params[name], trial[column]), (name, run.data.params)
        rows = epochs[trial_id]
        for metric in METRICS:
            history = client.get_metric_history(run.info.run_id, metric)
            got = sorted((m.step, m.value) for m in history)
            want = [(int(e), float(v)) for e, v in zip(rows.epoch, rows[metric], strict=True)]
            assert [s for s, _ in got] == [e for e, _ in want], (trial_id, metric)
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12)
    doc = json.dumps(read_study_json(config.storage, config.study))
    assert "mlflow" not in doc and "tensorboard" not in doc  # runtime options, not settings
