"""What a resumed search does with trials that already ended: Optuna and Tune's checkpoints.

Unit tests of the pieces the chaos test (tests/test_chaos.py) exercises end to end: the
searcher on a replayed or re-run trial, the checkpoint a restored trial continues from, and
the one-line note for a checkpoint Tune cannot delete.
"""

from __future__ import annotations

import logging
import sys

import pytest

pytest.importorskip("ray")  # the searcher is a Ray Tune Searcher (the device image has none)

import optuna
from helpers import tiny

from search.engine.searcher import GroupSearcher, latest_outcomes, reconcile

State = optuna.trial.TrialState


def _result(epoch: int, acc: float, epochs_run: int | None = None, **extra) -> dict:
    return {"epoch": epoch, "val_acc": acc, "epochs_run": epochs_run or epoch,
            "best_val_acc": acc, **extra}


@pytest.fixture
def searcher(tmp_path):
    config = tiny(tmp_path, study="r", groups=["kd"], samples=4, max_epochs=2)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    return GroupSearcher(config, url), config, url


def test_replayed_trial_does_not_touch_a_finished_optuna_trial(searcher):
    """The driver died after t1 ended (Optuna COMPLETE) but before Tune saved its state: the
    restored searcher still holds t1 live, and Tune replays its last epoch."""
    s, _, url = searcher
    s.suggest("t1")
    saved = s.get_state()  # Tune's last save: t1 still running
    s.on_trial_result("t1", _result(1, 0.40))
    s.on_trial_complete("t1", _result(2, 0.55))
    restored = GroupSearcher(s.config, url)
    restored.set_state(saved)
    restored.on_trial_result("t1", _result(2, 0.55))  # raised UpdateFinishedTrialError before
    restored.on_trial_complete("t1", _result(2, 0.55))
    (t,) = optuna.load_study(study_name="kd", storage=url).trials
    assert (t.state, t.value, t.intermediate_values) == (State.COMPLETE, 0.55, {1: 0.40, 2: 0.55})
    assert restored.live == {}


def test_errored_trial_rerun_by_resume_is_superseded_in_optuna(searcher):
    """t1 errored (Optuna FAIL); ``--resume`` re-runs it and it completes: its latest Optuna
    trial (a new one, same parameters, ``supersedes`` 0) says COMPLETE with its value."""
    s, config, url = searcher
    params = s.suggest("t1")
    s.on_trial_result("t1", _result(1, 0.30))
    s.on_trial_complete("t1", error=True)
    restored = GroupSearcher(config, url)
    restored.set_state(s.get_state())  # t1 is no longer live
    restored.on_trial_result("t1", _result(2, 0.50))
    restored.on_trial_complete("t1", _result(2, 0.50))
    old, new = optuna.load_study(study_name="kd", storage=url).trials
    assert old.state == State.FAIL and new.state == State.COMPLETE and new.value == 0.50
    assert new.params == {k: v for k, v in params.items() if k not in ("group", "proposer")}
    assert new.user_attrs == {"trial_id": "t1", "status": "completed", "supersedes": 0,
                              "proposer": "random"}
    assert new.intermediate_values == {1: 0.30, 2: 0.50}
    assert latest_outcomes(config, url)["t1"].number == 1


def test_reconcile_makes_optuna_agree_with_the_trials_table(searcher):
    import pandas as pd

    s, config, url = searcher
    s.suggest("t1")
    s.suggest("t2")  # asked, never reached a trials row: an orphan
    s.suggest("t3")
    s.on_trial_complete("t3", _result(1, 0.2, epochs_run=1))  # ASHA-stopped: PRUNED
    trials = pd.DataFrame([
        {"group": "kd", "trial_id": "t1", "status": "completed", "best_val_acc": 0.6},
        {"group": "kd", "trial_id": "t3", "status": "completed", "best_val_acc": 0.7},
    ])
    assert reconcile(config, url, trials) == 3  # t1 told, t3 superseded, t2 failed
    got = {k: (t.state, t.value) for k, t in latest_outcomes(config, url).items()}
    assert got == {"t1": (State.COMPLETE, 0.6), "t2": (State.FAIL, None),
                   "t3": (State.COMPLETE, 0.7)}
    assert reconcile(config, url, trials) == 0  # agrees now: nothing written


def test_restored_trial_continues_from_the_newest_checkpoint_left(tmp_path):
    import pyarrow.fs as pafs
    from ray import tune

    from search.engine.trainable import STATE_FILE, usable_checkpoint

    trial = tmp_path / "trial_x"
    for name in ("checkpoint_000003", "checkpoint_000004"):
        (trial / name).mkdir(parents=True)
        (trial / name / STATE_FILE).write_bytes(b"x")
    (trial / "checkpoint_000005").mkdir()  # half-written: no state file
    fs = pafs.LocalFileSystem()
    kept = tune.Checkpoint(str(trial / "checkpoint_000003"), filesystem=fs)
    assert usable_checkpoint(kept).path == kept.path
    gone = tune.Checkpoint(str(trial / "checkpoint_000001"), filesystem=fs)
    assert usable_checkpoint(gone).path == str(trial / "checkpoint_000004")
    alone = tune.Checkpoint(str(tmp_path / "other" / "checkpoint_000001"), filesystem=fs)
    assert usable_checkpoint(alone) is None


# A toy trial run by Tune through ``restoring_trainable``: it checkpoints every step and, on
# its first attempt, deletes its newest checkpoint and fails, so Tune's retry restores from a
# checkpoint that is gone (what a driver killed before Tune saved its state meets).
RETRY = """
import json, shutil, sys, tempfile
from pathlib import Path
import ray
from ray import tune
from search.engine.private_api import restoring_trainable
from search.engine.trainable import STATE_FILE, usable_checkpoint

def toy(config):
    start, attempt = 0, 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start, attempt = json.loads((Path(d) / STATE_FILE).read_text())
            attempt += 1
    for step in range(start + 1, 5):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / STATE_FILE).write_text(json.dumps([step, attempt]))
            tune.report({"step": step, "attempt": attempt, "resumed_from": start},
                        checkpoint=tune.Checkpoint.from_directory(d))
        if step == 3 and attempt == 1:
            newest, = Path(config["root"]).glob("retry/*/checkpoint_000002")
            shutil.rmtree(newest)  # the checkpoint Tune will restore from
            raise RuntimeError("planted failure")

ray.init(num_cpus=1, include_dashboard=False, logging_level="error")
trainable = restoring_trainable(toy, usable_checkpoint) if sys.argv[2] == "ours" else toy
grid = tune.Tuner(trainable, param_space={"root": sys.argv[1]}, run_config=tune.RunConfig(
    storage_path=sys.argv[1], name="retry", failure_config=tune.FailureConfig(max_failures=1),
    verbose=0)).fit()
r = grid[0]
print("RESULT", json.dumps({"error": r.error is not None, **(r.metrics or {})}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["ours", "plain"])
def test_a_retry_from_a_deleted_checkpoint_continues_from_the_newest_left(tmp_path, trainable):
    import json

    from helpers import env, run

    done = run([sys.executable, "-c", RETRY, str(tmp_path / "ray"), trainable], 300, env=env())
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    if trainable == "plain":  # Tune alone refuses the gone checkpoint: the trial fails
        assert result["error"] and "does not exist on storage anymore" in done.stderr
        return
    # checkpoint_000002 (step 3) is gone: the retry continues from checkpoint_000001 (step 2)
    assert not result["error"], done.stderr[-3000:]
    assert (result["step"], result["attempt"], result["resumed_from"]) == (4, 2, 2)


def test_a_checkpoint_already_deleted_is_one_line(caplog):
    from search.engine.experiment import quiet_gone_checkpoints

    quiet_gone_checkpoints()
    log = logging.getLogger("ray.tune.execution.tune_controller")
    try:
        raise FileNotFoundError("Path not found: checkpoint_000000")
    except FileNotFoundError:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 1,
                                "Trial %s: Error handling checkpoint %s",
                                ("train_trial_1", "result"), sys.exc_info())
    assert log.filters[-1].filter(record)
    assert record.exc_info is None and record.levelname == "WARNING"
    assert record.getMessage() == ("train_trial_1: an old checkpoint was already deleted "
                                   "before the interruption (harmless)")


def test_a_trial_stopped_by_its_own_patience_is_a_full_budget_value(searcher):
    """``early_stopped`` is the end of the training protocol (docs/SEARCH.md): Optuna gets
    COMPLETE with the trial's best validation accuracy, never PRUNED; an ASHA stop at the same
    epoch is PRUNED."""
    s, config, url = searcher
    assert config.max_epochs == 2
    s.suggest("t1")
    s.on_trial_complete("t1", {"epoch": 1, "val_acc": 0.31, "epochs_run": 1,
                               "best_val_acc": 0.35, "early_stopped": True})
    s.suggest("t2")
    s.on_trial_complete("t2", _result(1, 0.31, epochs_run=1))
    t1, t2 = optuna.load_study(study_name="kd", storage=url).trials
    assert (t1.state, t1.value, t1.user_attrs["status"]) == (State.COMPLETE, 0.35,
                                                            "early_stopped")
    # a PRUNED trial's value is its last intermediate value (Optuna's rule), not a final one
    assert (t2.state, t2.value, t2.user_attrs["status"]) == (State.PRUNED, 0.31, "asha_stopped")
