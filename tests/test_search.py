"""The search package: study config, Parquet sink, and real Ray Tune runs (ASHA, 2 nodes).

The slow tests start real Ray (2 CPUs) on tiny synthetic data with 1/8-width models; they
send traffic to loopback addresses only and stop every process they start by process id.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray")  # every test here needs Ray (the device image has none)

from helpers import TINY, check_search_tables, env, kdsearch, ray_cluster, run, tiny, write_toml

from search.commands.cli import main
from search.engine.callback import classify
from search.store.sink import ParquetSink, read_raw, read_table
from search.study import (
    PARAMS,
    StudyConfig,
    config_from_study_json,
    group_params,
    load_study_config,
    read_study_json,
    write_study_json,
)

# ---------------------------------------------------------------------------------------------
# Study config


def test_presets_files_and_flags_resolve_in_order(tmp_path):
    smoke = load_study_config("smoke", None, {})
    assert smoke.study == "smoke" and smoke.student_width <= 0.25 and smoke.teacher.cbam
    paper = load_study_config("paper", None, {})
    assert (paper.teacher.arch, paper.student, paper.batch_size, paper.lr, paper.max_epochs,
            paper.val_size, paper.device) == ("resnet50", "resnet18", 64, 0.01, 30, 5000, "cuda")
    assert paper.momentum == 0.9 and paper.weight_decay == 5e-4 and paper.teacher.cbam
    toml = write_toml(tmp_path / "s.toml",
                      {"samples": 7, "max_epochs": 4, "teacher": {"epochs": 2}})
    (tmp_path / "s.yaml").write_text("samples: 9\nspace:\n  T: {low: 2, high: 8}\n")
    c = load_study_config("smoke", toml, {"samples": None, "max_epochs": 2})
    assert (c.samples, c.max_epochs, c.teacher.epochs, c.teacher.width) == (7, 2, 2, 0.125)
    y = load_study_config("smoke", tmp_path / "s.yaml", {"epochs": 3, "group": "kd"})
    assert y.samples == 9 and y.space["T"].low == 2.0 and y.space["T"].log and y.groups == ("kd",)


@pytest.mark.parametrize("bad, field", [
    ({"study": "../x"}, "study"), ({"study": "/abs/x"}, "study"), ({"study": "a/b"}, "study"),
    ({"nope": 1}, "nope"), ({"samples": 0}, "samples"), ({"grace_period": 9}, "grace_period"),
    ({"reduction_factor": 1}, "reduction_factor"), ({"groups": ["kd", "kd"]}, "groups"),
    ({"space": {"T": {"low": 0.0}}}, "space.T"), ({"space": {"mask_pct": {"high": 100}}},
                                                  "space.mask_pct"),
    ({"space": {"zz": {"low": 1}}}, "space.zz"), ({"teacher": {"depth": 3}}, "teacher.depth"),
    ({"lr": -1.0}, "lr"), ({"student_width": 0}, "student_width"), ({"gpus_per_trial": -1}, "gpus"),
])
def test_bad_settings_name_the_field(bad, field):
    with pytest.raises(ValueError, match=rf"^{field}"):
        load_study_config("smoke", None, bad)


def test_trial_config_and_group_params():
    c = load_study_config("smoke", None, {})
    assert group_params("baseline") == ()
    assert group_params("kd") == ("T", "w_ce", "w_kl")
    assert set(group_params("at")) == {"T", "w_ce", "w_kl", "w_at", "mask_pct"}
    assert set(group_params("combined")) == set(PARAMS[:6])  # the loss settings
    t = c.trial_config("fa", {"T": 2.0, "w_fa": 0.5, "mask_pct": 30}, seed=3)
    got = (t.group, t.T, t.w_fa, t.w_at, t.mask_pct, t.seed, t.epochs)
    assert got == ("fa", 2, 0.5, 0, 30, 3, 3)
    assert t.student_width == c.student_width and t.teacher_cbam
    with pytest.raises(ValueError, match="^w_at"):
        c.trial_config("kd", {"w_at": 10.0}, seed=0)
    assert c.reproduce_seeds() == (1, 2) and c.seed not in c.reproduce_seeds()


def test_study_json_round_trip(tmp_path):
    c = tiny(tmp_path, study="s1")
    write_study_json(c, data_fingerprint="abc", teacher_hash="t1")
    doc = read_study_json(c.storage, "s1")
    assert doc["data_fingerprint"] == "abc" and doc["teacher_hash"] == "t1"
    assert {"torch", "ray", "optuna", "pyarrow"} <= set(doc["versions"])
    assert config_from_study_json(doc) == c
    assert not list((tmp_path / "store" / "s1").glob(".*"))  # no temporary file left


# ---------------------------------------------------------------------------------------------
# Sink


def epoch(trial: str, e: int, attempt: int = 1, acc: float = 0.5, ts: float | None = None):
    return {"study": "s", "group": "kd", "trial_id": trial, "attempt": attempt, "epoch": e,
            "seed": 0, "cfg_T": 2.0, "val_acc": acc, "node": "127.0.0.2",
            "timestamp": time.time() if ts is None else ts}


def test_sink_parts_dedupe_and_analysis_reads_them(tmp_path):
    study_dir = str(tmp_path / "s")
    sink = ParquetSink(study_dir)
    sink.append("epochs", "kd", [epoch("a", 1, ts=1.0), epoch("a", 2, ts=2.0)])
    sink.append("epochs", "kd", [epoch("a", 2, acc=0.9, ts=3.0)])  # a re-sent row
    sink.append("epochs", "at", [epoch("b", 1)])
    sink.append("trials", "kd", [{"trial_id": "a", "status": "asha_stopped", "epochs_run": 2,
                                  "timestamp": 5.0}])
    sink.append("trials", "kd", [{"trial_id": "a", "status": "completed", "epochs_run": 3,
                                  "timestamp": 6.0}])
    parts = sorted((tmp_path / "s" / "epochs" / "group=kd").iterdir())
    assert len(parts) == 2 and all(p.name.startswith("part-") for p in parts)
    assert len(read_raw(study_dir, "epochs")) == 4
    e = read_table(study_dir, "epochs")
    assert len(e) == 3 and e.loc[(e.trial_id == "a") & (e.epoch == 2), "val_acc"].item() == 0.9
    assert set(e.group) == {"kd", "at"} and e["gshare_fa"].isna().all()
    t = read_table(study_dir, "trials")
    assert t.status.tolist() == ["completed"] and t.epochs_run.tolist() == [3]
    with pytest.raises(ValueError, match="unknown column"):
        sink.append("trials", "kd", [{"trial_id": "x", "bogus": 1}])
    with pytest.raises(ValueError, match="^group"):
        sink.append("trials", "../kd", [{"trial_id": "x"}])
    uri = ParquetSink(f"file://{tmp_path}/u")  # pyarrow filesystem URIs work the same way
    uri.append("trials", "kd", [{"trial_id": "z", "status": "failed"}])
    assert read_table(f"file://{tmp_path}/u", "trials").trial_id.tolist() == ["z"]
    from analysis.tables import load_study  # the reader someone else wrote must agree

    study = load_study(study_dir)
    assert len(study.epochs) == 3 and study.trials.status.tolist() == ["completed"]


def test_status_classification():
    assert classify({"epoch": 3, "epochs_run": 3}, 3) == "completed"
    assert classify({"epoch": 1, "epochs_run": 1}, 3) == "asha_stopped"
    assert classify({"epoch": 2, "epochs_run": 2, "early_stopped": True}, 3) == "early_stopped"
    assert classify({"epoch": 2, "epochs_run": 1, "diverged": True}, 3) == "diverged"
    assert classify({}, 3) == "failed"


# ---------------------------------------------------------------------------------------------
# Command line: bad input is one line on stderr, exit 2, nothing written


@pytest.mark.parametrize("extra, needle", [
    (["--study", "../escape"], "study"),
    (["--study", "ok", "--address", "127.0.0.9:9"], "address"),
    (["--study", "ok", "--samples", "0"], "samples"),
])
def test_cli_bad_input(tmp_path, capsys, extra, needle):
    store = tmp_path / "store"
    rc = main(["tune", "--preset", "smoke", "--data", "synthetic:40", "--storage", str(store),
               "--group", "kd", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not (store / "ok").exists() and not (tmp_path / "escape").exists()


# ---------------------------------------------------------------------------------------------
# Real Ray runs


@pytest.fixture
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
def test_search_with_asha_stopping(tmp_path, ray_shutdown):
    from search.commands.tune import run_tune

    config = tiny(tmp_path, study="asha", groups=["kd"], samples=6)
    summary = run_tune(config)
    trials = check_search_tables(config.study_dir, config, "kd")
    assert set(trials.status) <= {"completed", "asha_stopped"}
    stopped = trials[trials.status == "asha_stopped"]
    assert len(stopped) >= 1 and (stopped.epochs_run < config.max_epochs).all()
    assert (trials.loc[trials.status == "completed", "epochs_run"] == config.max_epochs).all()
    assert (trials.cfg_w_at == 0).all() and (trials.cfg_mask_pct == 0).all()
    assert summary["groups"]["kd"]["trials"] == 6 and "best" in summary["groups"]["kd"]
    doc = read_study_json(config.storage, "asha")
    assert doc["teacher_hash"] and doc["data_fingerprint"] and doc["versions"]["ray"]
    with pytest.raises(ValueError, match="already has search results"):
        run_tune(config)  # a finished study is only continued with resume=True


@pytest.mark.slow
def test_diverged_and_failed_trials_are_classified(tmp_path, ray_shutdown):
    import ray
    from ray import tune

    from search.engine.experiment import optuna_storage_url, run_search
    from search.engine.ray_start import init_ray
    from search.engine.trainable import SharedInputs, train_trial

    def search(config: StudyConfig):  # as run_tune runs it, but without a teacher
        inputs = SharedInputs(data=ray.put(config.load_data()))
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, study=config, inputs=inputs), {"cpu": 1})
        return run_search(config, trainable, False, 2, optuna_storage_url(config))

    # lr = 1e6 makes the loss non-finite in epoch 1: a `diverged` row, no retry, no epoch row.
    config = tiny(tmp_path, study="div", groups=["baseline"], samples=1, max_epochs=2, lr=1e6)
    init_ray(config)
    assert search(config) is not None
    t = read_table(config.study_dir, "trials")
    assert t.status.tolist() == ["diverged"] and t.epochs_run.tolist() == [0]
    assert "non-finite" in t.error.item() and read_table(config.study_dir, "epochs").empty

    # kd without a teacher raises in every attempt: retried twice, then a `failed` row, and
    # Optuna is told FAIL.
    config = tiny(tmp_path, study="fail", groups=["kd"], samples=1, max_epochs=2)
    assert search(config) is not None
    t = read_table(config.study_dir, "trials")
    assert t.status.tolist() == ["failed"] and "teacher" in t.error.item()
    import optuna

    (only,) = optuna.load_study(study_name="kd", storage=optuna_storage_url(config)).trials
    assert only.state == optuna.trial.TrialState.FAIL
    assert only.user_attrs == {"trial_id": t.trial_id.item(), "status": "failed",
                               "proposer": "random"}  # a random startup draw (TPE)


@pytest.mark.slow
def test_two_node_cluster(tmp_path):
    with ray_cluster(workers=("127.0.0.3",)) as cluster:
        settings = {**TINY, "groups": ["baseline"], "samples": 2, "max_epochs": 2}
        cfg = write_toml(tmp_path / "n.toml", settings)
        store = tmp_path / "store"
        done = run(kdsearch("tune", "--config", str(cfg), "--storage", str(store), "--study", "n",
                            "--address", cluster["address"]), 300, env=env())
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        epochs = read_table(str(store / "n"), "epochs")
        assert set(epochs.node) == {"127.0.0.2", "127.0.0.3"}
        assert len(read_table(str(store / "n"), "trials")) == 2
