"""Settings of a stored study: what a later command may change, and what it refuses.

Runtime fields (storage, resources, device) change freely; ``samples`` and ``seeds`` may grow
(the search continues in one more Tune experiment, reproduce trains only the missing seeds)
and the growth is recorded in ``study.json``; any other change is refused in one line that
names the field and both values, exit status 2, nothing written.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray")  # the end-to-end test runs real Ray (the device image has none)

from helpers import TINY, tiny, write_toml

from search.commands.cli import main
from search.store.sink import read_table
from search.study import read_study_json, settle, write_study_json


@pytest.fixture
def stored(tmp_path):
    config = tiny(tmp_path, study="s", groups=["kd", "at"], samples=2, seeds=2)
    write_study_json(config, data_fingerprint="f0", teacher_hash="t0")
    return config, read_study_json(config.storage, "s")


def test_runtime_and_growing_fields_change(stored):
    config, doc = stored
    assert settle(doc, {}) == config
    assert settle(doc, config.to_dict()) == config
    grown = settle(doc, {"seeds": 3, "samples": 5, "cpus_per_trial": 2.0, "device": "cpu",
                         "group": "all", "data": "synthetic:40"})
    assert (grown.seeds, grown.samples, grown.cpus_per_trial) == (3, 5, 2.0)
    assert grown.groups == ("kd", "at") and grown.student_width == 0.125


@pytest.mark.parametrize("given, line", [
    ({"seeds": 1}, "seeds: 1 is fewer than the stored study's 2"),
    ({"samples": 1}, "samples: 1 is fewer than the stored study's 2"),
    ({"epochs": 5}, "max_epochs: 5 differs from the stored study's 3"),
    ({"student_width": 0.25}, "student_width: 0.25 differs from the stored study's 0.125"),
    ({"teacher": {"width": 0.25}}, "teacher.width: 0.25 differs from the stored study's 0.125"),
    ({"space": {"T": {"high": 8.0}}}, "space.T.high: 8.0 differs from the stored study's 16.0"),
    ({"group": "kd"}, "groups: ['kd'] differs from the stored study's ['kd', 'at']"),
    ({"precision": "fp32"}, "precision: 'fp32' differs from the stored study's 'auto'"),
])
def test_changes_to_what_was_measured_are_refused(stored, given, line):
    _, doc = stored
    with pytest.raises(ValueError) as err:
        settle(doc, given)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


@pytest.fixture
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_stored_study_grows_and_refuses(tmp_path, capsys, ray_shutdown):
    """A finished study: ``reproduce --seeds`` trains exactly the missing seeds, ``tune
    --resume --samples`` runs exactly the missing trials (and Optuna sees them), and a
    config file or preset that disagrees with the study is refused before anything runs."""
    import optuna

    settings = {**TINY, "groups": ["baseline", "kd"], "samples": 2, "max_epochs": 2,
                "grace_period": 1, "seeds": 1}
    cfg = write_toml(tmp_path / "s.toml", settings)
    store = str(tmp_path / "store")
    where = ["--config", str(cfg), "--storage", store, "--study", "g"]
    study_dir = tmp_path / "store" / "g"
    assert _cli(capsys, "tune", *where)[0] == 0
    assert _cli(capsys, "reproduce", "--storage", store, "--study", "g")[0] == 0
    runs = read_table(str(study_dir), "runs")
    assert sorted(zip(runs.group, runs.seed, strict=True)) == [("baseline", 1), ("kd", 1)]

    rc, out, _ = _cli(capsys, "reproduce", "--storage", store, "--study", "g", "--seeds", "2")
    assert rc == 0 and "2 runs to do" in out, out[-2000:]
    runs = read_table(str(study_dir), "runs")
    assert sorted(zip(runs.group, runs.seed, strict=True)) == [
        ("baseline", 1), ("baseline", 2), ("kd", 1), ("kd", 2)]
    assert read_study_json(store, "g")["seeds"] == 2

    # Refused in one line, exit 2, nothing written: a config file that changes the student,
    # fewer seeds, a preset that disagrees with the study.
    before = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()}
    changed = write_toml(tmp_path / "c.toml", {**settings, "student_width": 0.25})
    for argv, line in [
        (["tune", "--resume", "--config", str(changed), "--storage", store, "--study", "g"],
         "student_width: 0.25 differs from the stored study's 0.125"),
        (["reproduce", "--storage", store, "--study", "g", "--seeds", "1"],
         "seeds: 1 is fewer than the stored study's 2"),
        (["run", "--preset", "smoke", "--storage", store, "--study", "g"],
         "differs from the stored study's"),
    ]:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and line in err, (argv, err)
    after = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()}
    assert after == before

    # More samples: one more experiment runs exactly the missing trial of each group.
    rc, out, _ = _cli(capsys, "tune", "--resume", "--storage", store, "--study", "g",
                      "--samples", "3")
    assert rc == 0 and "search grows: baseline 2 -> 3, kd 2 -> 3 trials" in out, out[-3000:]
    trials = read_table(str(study_dir), "trials")
    assert trials.groupby("group", observed=True).size().to_dict() == {"baseline": 3, "kd": 3}
    assert sorted(trials[trials.group == "baseline"].seed) == [0, 1, 2]  # seeds continue
    kd = optuna.load_study(study_name="kd", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert len(kd.trials) == 3 and {t.user_attrs["trial_id"] for t in kd.trials} == set(
        trials[trials.group == "kd"].trial_id)
    assert read_study_json(store, "g")["samples"] == 3
    done = json.loads((study_dir / "ray" / "search-3.done.json").read_text())
    assert done["trials"] == 2
    rc, out, _ = _cli(capsys, "tune", "--resume", "--storage", store, "--study", "g")
    assert rc == 0 and "search already finished: skipped" in out
