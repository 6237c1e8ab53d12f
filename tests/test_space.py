"""The open search space: training settings next to the loss weights, int/float/categorical
ranges, fixed values, per-group ranges; the tables, best configs and report carry them."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from helpers import TINY, env, kdsearch, run

from search.engine.searcher import distribution
from search.study import ParamRange, StudyConfig, load_study_config
from search.study.space import group_space, space_from


def test_shared_and_per_group_ranges_resolve_per_group():
    space = space_from({
        "lr": {"low": 0.001, "high": 0.1, "log": True},
        "batch_size": {"choices": [32, 64]},
        "at": {"w_at": {"high": 200}, "momentum": {"low": 0.5, "high": 0.95}},
        "kd": {"lr": {"value": 0.02}},
    })
    at, kd = group_space(space, "at"), group_space(space, "kd")
    assert list(at) == ["T", "w_ce", "w_kl", "w_at", "mask_pct", "lr", "momentum",
                        "batch_size"]
    assert at["w_at"] == ParamRange(10.0, 200.0, log=True)  # the shared low, its own high
    assert at["lr"] == ParamRange(0.001, 0.1, log=True)
    assert at["batch_size"] == ParamRange(choices=(32, 64))
    assert kd["lr"] == ParamRange(0.02, 0.02) and "momentum" not in kd
    assert group_space(space, "baseline") == {}


@pytest.mark.parametrize("raw, message", [
    ({"kd": {"w_at": {"low": 1.0, "high": 2.0}}}, "space.kd.w_at: group 'kd' does not tune w_at"),
    ({"baseline": {"lr": {"value": 0.1}}}, "space.baseline: the baseline tunes nothing"),
    ({"lr": {"low": 0.1}}, "space.lr: needs low and high"),
    ({"lr_schedule": {"choices": ["step"]}}, "space.lr_schedule: choices must be distinct values "
                                             "among ['constant', 'cosine']"),
    ({"batch_size": {"low": 16.5, "high": 64}}, "space.batch_size: batch_size takes integer"),
    ({"momentum": {"low": 0.5, "high": 1.5}}, "space of 'kd' at its high end: momentum: must be "
                                              "in [0, 1)"),
    ({"lr": {"value": 0.1, "log": True}}, "space.lr: a fixed value takes no other key"),
    ({"depth": {"low": 1, "high": 2}}, "space.depth: unknown parameter"),
])
def test_bad_ranges_are_one_line_naming_the_entry(raw, message):
    with pytest.raises(ValueError) as info:
        StudyConfig.from_dict({"groups": ["kd", "at"], "space": raw})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_ranges_become_the_optuna_distributions():
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    assert distribution("batch_size", ParamRange(16, 128, step=16)) == IntDistribution(
        16, 128, step=16)
    assert distribution("batch_size", ParamRange(choices=(32, 64))) == CategoricalDistribution(
        (32, 64))
    assert distribution("lr", ParamRange(1e-3, 1e-1, log=True)) == FloatDistribution(
        1e-3, 1e-1, log=True)
    assert distribution("lr_schedule", ParamRange(choices=("constant", "cosine"))) == \
        CategoricalDistribution(("constant", "cosine"))


def test_searched_training_settings_beat_the_studys():
    c = load_study_config("smoke", None, {"space": {"lr": {"low": 0.001, "high": 0.1}}})
    t = c.trial_config("kd", {"lr": 0.03, "batch_size": 32.0, "lr_schedule": "cosine"}, seed=1)
    assert (t.lr, t.batch_size, t.lr_schedule) == (0.03, 32, "cosine")
    assert isinstance(t.batch_size, int)
    assert c.trial_config("kd", {}, seed=1).lr == c.lr  # untuned: the study's own setting


@pytest.mark.slow
def test_a_study_tuning_lr_and_batch_size_carries_them_to_tables_and_report(tmp_path):
    """kd and at tune lr (log) and batch_size (categorical) beside their weights; at has its
    own w_at range and tunes momentum; a real search (subprocess), then the report."""
    from analysis import write_report
    from analysis.stats import best_configs
    from search.store.sink import read_table

    settings = {**TINY, "study": "open", "groups": ["kd", "at"], "samples": 2,
                "max_epochs": 1, "grace_period": 1, "space": {
                    "lr": {"low": 0.01, "high": 0.1, "log": True},
                    "batch_size": {"choices": [16, 32]},
                    "at": {"w_at": {"low": 100, "high": 200},
                           "momentum": {"low": 0.5, "high": 0.8}}}}
    cfg = tmp_path / "open.yaml"  # YAML: the per-group tables nest three deep
    cfg.write_text(yaml.safe_dump(settings))
    store = tmp_path / "store"
    done = run(kdsearch("tune", "--config", str(cfg), "--storage", str(store)), 600, env=env())
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    study_dir = store / "open"
    trials = read_table(str(study_dir), "trials")
    epochs = read_table(str(study_dir), "epochs")
    assert len(trials) == 4
    assert trials.cfg_lr.between(0.01, 0.1).all() and trials.cfg_lr.nunique() == 4
    assert set(trials.cfg_batch_size) <= {16, 32}
    assert str(trials.cfg_batch_size.dtype).lower().startswith("int")
    at, kd = trials[trials.group == "at"], trials[trials.group == "kd"]
    assert at.cfg_w_at.between(100, 200).all() and at.cfg_momentum.between(0.5, 0.8).all()
    assert (kd.cfg_momentum == 0.9).all() and (kd.cfg_w_at == 0).all()  # not tuned by kd
    assert (trials.cfg_lr_schedule == "constant").all()  # untuned categorical: the setting
    # Every epoch row carries its trial's values; the lr column is what the trial trained at.
    merged = epochs.merge(trials[["trial_id", "cfg_lr"]], on="trial_id", suffixes=("", "_t"))
    assert (merged.cfg_lr == merged.cfg_lr_t).all() and (merged.lr == merged.cfg_lr).all()
    # Optuna holds the same values (its params are the group's searched ones).
    import optuna

    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    for group, rows in (("kd", kd), ("at", at)):
        study = optuna.load_study(study_name=group, storage=storage)
        expected = {"T", "w_ce", "w_kl", "lr", "batch_size"} | (
            {"w_at", "mask_pct", "momentum"} if group == "at" else set())
        for t in study.trials:
            assert set(t.params) == expected
            row = rows[rows.trial_id == t.user_attrs["trial_id"]].iloc[0]
            for p, v in t.params.items():
                assert row[f"cfg_{p}"] == (pytest.approx(v) if isinstance(v, float) else v)
    doc = json.loads((study_dir / "study.json").read_text())
    assert doc["group_spaces"]["at"]["w_at"] == {"low": 100.0, "high": 200.0, "log": True}
    assert doc["group_spaces"]["kd"]["batch_size"] == {"choices": [16, 32]}
    best = best_configs(trials, 1)
    assert {"cfg_lr", "cfg_batch_size", "cfg_momentum"} <= set(best.columns)
    report = write_report(str(study_dir)).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| group | basis"))
    assert "cfg_lr" in header and "cfg_batch_size" in header
    for _, row in best.iterrows():
        assert f"{row.cfg_lr:.4g}" in report and math.isfinite(row.cfg_lr)
