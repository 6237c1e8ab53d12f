"""Chaos test of the search: SIGKILL the driver's whole process group again and again.

One real search (two tuned groups, 4 trials each, on a private Ray instance) is killed at
several moments — right after a trial's final ``trials`` row appears (the driver dies after
a trial ended but, usually, before Tune saved its state) and at random times after epoch
rows — and resumed with ``--resume`` each time until it finishes. Then every trial has
exactly one final row, the ``epochs`` table holds each trial's epochs 1..epochs_run once, no
resume printed a searcher error, and the Optuna storage agrees with the ``trials`` table on
every trial.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")  # real Ray (the device image has none)

from helpers import TINY, env, kdsearch, spawn, wait_for, write_toml

from search.store.sink import part_files, read_raw, read_table
from search.study import config_from_study_json, read_study_json

KILLS = 5  # at least 5 (issue 16)
SEED = 16


def _parts(study_dir: Path, table: str) -> int:
    return len(part_files(str(study_dir), table)[2]) if study_dir.exists() else 0


def _run_until_killed(argv: list[str], log: Path, study_dir: Path, moment: str,
                      rng: random.Random, timeout: float = 300.0) -> int | None:
    """Run ``argv`` in its own process group (``helpers.spawn``: the group and everything it
    started are reaped however this ends); SIGKILL all of it at ``moment`` (``trial-end``:
    as soon as a new trials row appears; ``epoch``: a random 0-3 s after a new epoch row
    appears). Returns the exit status, or None when it was killed."""
    trials0, epochs0 = _parts(study_dir, "trials"), _parts(study_dir, "epochs")

    def event() -> bool:
        if proc.poll() is not None:
            return True
        if moment == "trial-end":
            return _parts(study_dir, "trials") > trials0
        return moment == "epoch" and _parts(study_dir, "epochs") > epochs0

    with open(log, "w") as fh, spawn(argv, env=env(), stdout=fh,
                                     stderr=subprocess.STDOUT) as proc:
        try:
            wait_for(event, timeout, f"{moment} event or exit", period=0.05)
        except AssertionError:
            raise AssertionError(log.read_text()[-3000:]) from None
        if proc.poll() is not None:
            return proc.returncode
        if moment == "epoch":
            time.sleep(rng.uniform(0.0, 3.0))  # the kill moment itself, drawn at random
        done = proc.poll()
        proc.reap()
        return done


@pytest.mark.slow
def test_search_survives_repeated_driver_kills(tmp_path):
    rng = random.Random(SEED)
    settings = {**TINY, "groups": ["kd", "at"], "samples": 4, "max_epochs": 3,
                "grace_period": 1}
    cfg = write_toml(tmp_path / "chaos.toml", settings)
    store = tmp_path / "store"
    study_dir = store / "chaos"
    base = kdsearch("tune", "--config", str(cfg), "--storage", str(store), "--study", "chaos")
    moments = ["trial-end", "epoch"] * KILLS
    kills, runs, logs = 0, 0, []
    t0 = time.monotonic()
    while True:
        runs += 1
        assert runs <= 3 * KILLS, "the search did not finish:\n" + logs[-1].read_text()[-3000:]
        log = tmp_path / f"run{runs}.log"
        logs.append(log)
        argv = base + (["--resume"] if runs > 1 else [])
        if kills < KILLS:
            rc = _run_until_killed(argv, log, study_dir, moments[kills], rng)
            if rc is None:
                kills += 1
                continue
        else:
            rc = _run_until_killed(argv, log, study_dir, "never", rng, timeout=600)
        assert rc == 0, log.read_text()[-3000:]
        break
    wall = time.monotonic() - t0

    text = "\n".join(p.read_text() for p in logs)
    for needle in ("UpdateFinishedTrialError", "Error stopping trial", "Traceback"):
        assert needle not in text, needle

    from search.engine.searcher import (  # (after the runs: see above)
        latest_outcomes,
        optuna_outcome,
    )

    config = config_from_study_json(read_study_json(str(store), "chaos"), {"storage": str(store)})
    trials = read_table(str(study_dir), "trials")
    # every trial has exactly one final row; epochs 1..epochs_run once per trial
    assert trials.groupby("group", observed=True).size().to_dict() == {"kd": 4, "at": 4}
    assert trials.trial_id.is_unique
    epochs = read_table(str(study_dir), "epochs")
    latest = epochs.sort_values("attempt").drop_duplicates(["trial_id", "epoch"], keep="last")
    for t in trials.itertuples():
        got = sorted(latest.loc[latest.trial_id == t.trial_id, "epoch"])
        assert got == list(range(1, t.epochs_run + 1)), (t.trial_id, got)
    assert not latest.duplicated(["trial_id", "epoch"]).any()

    # Optuna agrees with the trials table on every trial's state and value
    url = f"sqlite:///{study_dir / 'optuna.db'}"
    latest_optuna = latest_outcomes(config, url)
    disagreements = []
    for t in trials.itertuples():
        state, value = optuna_outcome(t.status, t.best_val_acc)
        o = latest_optuna.get(t.trial_id)
        if o is None or o.state.name != state or (
                value is not None and abs((o.value or -1) - value) > 1e-9):
            disagreements.append((t.trial_id, t.status, o and o.state.name))
    import optuna

    running = [t.number for g in config.groups for t in optuna.load_study(
        study_name=g, storage=url).get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    assert disagreements == [] and running == []
    raw = read_raw(str(study_dir), "epochs")
    # trials whose end was recorded more than once: run again after a kill although they had
    # ended (the case that used to crash every later resume) — the kills must have made some
    ended_twice = int(read_raw(str(study_dir), "trials").trial_id.duplicated().sum())
    assert ended_twice >= 1
    fixed = sum(int(line.split()[1]) for line in text.splitlines()
                if line.startswith("optuna: ") and "brought in line" in line)
    print(f"chaos: {kills} kills survived in {runs} runs, {wall:.0f}s; {len(trials)} trials, "
          f"{len(raw)} epoch rows written ({len(latest)} after dedup), {ended_twice} trials "
          f"ended twice, "
          f"{len(disagreements)} disagreements, {fixed} Optuna trials reconciled at the end")
