"""A study written before ``search/`` got its rooms loads and resumes with today's code.

The fixture (``tests/fixtures/study-issue16``, its README says how it was made) is a search
killed half-way by the code of issue 16, whose pickles name the old flat modules.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("ray")  # resumes a real Ray Tune experiment (the device image has none)

from helpers import REPO, env, kdsearch, run

from analysis import load_study
from search.engine.searcher import latest_outcomes, optuna_outcome
from search.store.sink import read_table
from search.study import config_from_study_json, read_study_json

FIXTURE = REPO / "tests" / "fixtures" / "study-issue16"


def test_old_names_still_resolve_for_unpickling():
    import pickle

    from search.engine.searcher import GroupSearcher
    from search.store.sink import ParquetSink

    blob = pickle.dumps(ParquetSink("/tmp/x"), protocol=0)  # text: names can be edited
    assert b"search.store.sink" in blob
    old = blob.replace(b"search.store.sink", b"search.sink")  # what an old study holds
    assert type(pickle.loads(old)) is ParquetSink
    from search.searcher import GroupSearcher as Old  # noqa: I001 (a moved name)

    assert Old is GroupSearcher


@pytest.mark.slow
def test_a_study_written_before_the_rooms_resumes(tmp_path: Path):
    store = tmp_path / "store"
    shutil.copytree(FIXTURE, store)
    before = read_table(str(store / "old"), "trials")
    assert len(before) == 2  # half-way: 2 of 4 trials
    done = run(kdsearch("tune", "--resume", "--storage", str(store), "--study", "old",
                        "--data", "synthetic:40"), timeout=400, env=env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "from storage" in done.stdout  # the teacher under its old cache key, not retrained
    study_dir = store / "old"
    config = config_from_study_json(read_study_json(str(store), "old"), {"storage": str(store)})
    trials = read_table(str(study_dir), "trials")
    assert trials.groupby("group", observed=True).size().to_dict() == {"baseline": 2, "kd": 2}
    assert set(before.trial_id) <= set(trials.trial_id)  # the earlier trials were kept
    latest = latest_outcomes(config, f"sqlite:///{study_dir / 'optuna.db'}")
    for t in trials[trials.group == "kd"].itertuples():
        state, value = optuna_outcome(t.status, t.best_val_acc)
        assert latest[t.trial_id].state.name == state
    study = load_study(study_dir)  # analysis reads it as before
    assert len(study.trials) == 4 and len(study.epochs) >= 4
