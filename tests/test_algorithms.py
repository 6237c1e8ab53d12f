"""Samplers, trial schedulers, the time budget and warm starts of a search (issue 19).

The slow tests run real searches with sleeping trials and synthetic learning curves
(``run_tune(simulate=...)``) on one private Ray instance shared by the module; trials run
one at a time (``max_concurrent = 1``), so every proposal and every stopping decision is
deterministic: the k-th trial of a group is asked for when k trials of it have finished.
The time-budget test kills a driver it started in its own process group (``helpers.spawn``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("ray")  # real Ray Tune and Optuna (the device image has neither)
pytest.importorskip("optuna")

import optuna
from helpers import TINY, env, spawn, wait_for, write_toml

from search.commands.cli import main
from search.commands.tune import print_summary, run_tune
from search.engine.algorithms import hyperband_brackets, make_sampler, make_scheduler
from search.store.rows import trial_row
from search.store.sink import ParquetSink, read_table
from search.study import (
    config_from_study_json,
    load_study_config,
    read_study_json,
    settle,
    write_study_json,
)
from search.study.config import default_n_startup, parse_duration

SIM = 0.1  # seconds per simulated epoch
REPO = Path(__file__).resolve().parents[1]
# kdsearch status -> Optuna state, written out here rather than taken from the searcher
STATE = {"completed": "COMPLETE", "early_stopped": "COMPLETE", "diverged": "COMPLETE",
         "asha_stopped": "PRUNED", "failed": "FAIL"}


def sim(store: Path, study: str, **settings):
    """A study of kd and at, 5 trials each, 3 epochs, one trial at a time, 2 startup trials."""
    return load_study_config(None, None, {
        **TINY, "storage": str(store), "study": study, "groups": ["kd", "at"], "samples": 5,
        "max_epochs": 3, "grace_period": 1, "max_concurrent": 1, "n_startup": 2, **settings})


# ---------------------------------------------------------------------------------------------
# Settings


def test_n_startup_default_is_a_quarter_of_the_trials_between_2_and_10():
    assert [default_n_startup(n) for n in (1, 4, 8, 12, 16, 32, 40, 48, 200)] == [
        2, 2, 2, 3, 4, 8, 10, 10, 10]
    assert load_study_config("laptop", None, {}).n_startup == 3  # 12 trials: 9 not random
    assert load_study_config("paper", None, {}).n_startup == 10
    assert load_study_config("laptop", None, {"n_startup": 5}).n_startup == 5
    # fixed when the config is made: a study that grows keeps what it ran with
    stored = load_study_config("laptop", None, {"study": "s"}).to_dict()
    assert settle(stored, {"samples": 40}).n_startup == 3  # not 10, the default at 40


def test_durations_parse_to_seconds():
    cases = {"2h": 7200, "90m": 5400, "45s": 45, "1h30m": 5400, "1.5h": 5400, "3600": 3600,
             " 2H ": 7200, 12: 12, 0.5: 0.5}
    assert {k: parse_duration(k) for k in cases} == cases
    assert parse_duration(None) is None
    assert load_study_config("smoke", None, {"time_budget": "90m"}).time_budget == 5400.0
    for bad in ("2x", "h", "", "1h-5m", "m30", True):
        with pytest.raises(ValueError, match=r"^time_budget: expected seconds"):
            parse_duration(bad)


@pytest.mark.parametrize("bad, line", [
    ({"sampler": "bohb"}, "sampler: must be one of ['tpe', 'random', 'qmc', 'cmaes', 'gp'], "
                          "got 'bohb'"),
    ({"scheduler": "pbt"}, "scheduler: must be one of ['asha', 'hyperband', 'median', 'none'], "
                           "got 'pbt'"),
    ({"trial_scheduler": "pbt"}, "scheduler: must be one of"),  # the flag's spelling
    ({"n_startup": 0}, "n_startup: must be an integer > 0, got 0"),
    ({"n_startup": 2.5}, "n_startup: must be an integer > 0, got 2.5"),
    ({"time_budget": "soon"}, "time_budget: expected seconds or a duration"),
    ({"time_budget": 0}, "time_budget: must be > 0 seconds, got 0.0"),
    ({"warm_start": "../x"}, "warm_start: '../x' is not a valid study name"),
    ({"warm_start": "smoke"}, "warm_start: a study cannot start from itself ('smoke')"),
    ({"warm_start_storage": "/x"}, "warm_start_storage: must be a path or URI, and needs "
                                   "warm_start"),
])
def test_bad_settings_are_one_line_naming_the_field(bad, line):
    with pytest.raises(ValueError) as err:
        load_study_config("smoke", None, bad)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_flags_reach_the_study_config():
    from search.commands.parser import build_parser
    from search.study import overrides_from_args

    for command in ("tune", "run"):
        args = build_parser().parse_args([
            command, "--sampler", "qmc", "--n-startup", "3", "--trial-scheduler", "median",
            "--time-budget", "2h", "--warm-start", "old", "--warm-start-storage", "/w"])
        c = load_study_config("smoke", None, overrides_from_args(args))
        assert (c.sampler, c.n_startup, c.scheduler, c.time_budget, c.warm_start,
                c.warm_start_storage) == ("qmc", 3, "median", 7200.0, "old", "/w")
    assert "sampler" in c.to_dict() and c.to_dict()["time_budget"] == 7200.0


def test_an_old_study_json_resumes_as_it_ran(tmp_path):
    """Studies stored before these settings ran TPE with Optuna's 10 startup trials and ASHA."""
    doc = json.loads((REPO / "tests/fixtures/study-issue16/old/study.json").read_text())
    assert not {"sampler", "n_startup", "scheduler", "time_budget"} & set(doc)
    old = config_from_study_json(doc, {"storage": str(tmp_path)})
    assert (old.sampler, old.n_startup, old.scheduler, old.time_budget, old.warm_start) == (
        "tpe", 10, "asha", None, None)
    assert settle(doc, {"samples": 3}).n_startup == 10  # not the default rule's 2
    with pytest.raises(ValueError, match=r"^n_startup: 2 differs from the stored study's 10"):
        settle(doc, {"n_startup": 2})


@pytest.mark.parametrize("given, line", [
    ({"sampler": "gp"}, "sampler: 'gp' differs from the stored study's 'tpe'"),
    ({"n_startup": 3}, "n_startup: 3 differs from the stored study's 2"),
    ({"trial_scheduler": "median"}, "scheduler: 'median' differs from the stored study's 'asha'"),
    ({"warm_start": "other"}, "warm_start: 'other' differs from the stored study's None"),
    ({"time_budget": "30m"}, "time_budget: 1800.0 is less than the stored study's 3600.0"),
])
def test_a_stored_study_refuses_another_algorithm(tmp_path, given, line):
    config = sim(tmp_path, "s", time_budget="1h")
    write_study_json(config)
    with pytest.raises(ValueError) as err:
        settle(read_study_json(config.storage, "s"), given)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_a_time_budget_grows_like_samples(tmp_path):
    config = sim(tmp_path, "s", time_budget="1h")
    write_study_json(config)
    doc = read_study_json(config.storage, "s")
    assert settle(doc, {"time_budget": "2h"}).time_budget == 7200.0
    assert settle(doc, {"warm_start_storage": None}).time_budget == 3600.0
    unlimited = sim(tmp_path, "u")
    write_study_json(unlimited)
    with pytest.raises(ValueError, match=r"^time_budget: 60.0 is less than the stored study's "
                                         "no limit"):
        settle(read_study_json(unlimited.storage, "u"), {"time_budget": 60})


# ---------------------------------------------------------------------------------------------
# Factories, the per-group scheduler, the search clock


def test_factories_build_optuna_samplers_and_tune_schedulers(tmp_path):
    from optuna import samplers
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    kinds = {"tpe": samplers.TPESampler, "random": samplers.RandomSampler,
             "qmc": samplers.QMCSampler, "cmaes": samplers.CmaEsSampler,
             "gp": samplers.GPSampler}
    for name, kind in kinds.items():
        sampler = make_sampler(sim(tmp_path, "f", sampler=name, seed=7), {}, trials=3)
        assert isinstance(sampler, kind)
    tpe = make_sampler(sim(tmp_path, "f", n_startup=4), {})
    assert tpe._n_startup_trials == 4 and tpe._constant_liar and tpe._multivariate
    qmc = make_sampler(sim(tmp_path, "f", sampler="qmc", seed=7), {}, trials=3)
    assert (qmc._seed, qmc._scramble, qmc._qmc_type) == (7, True, "sobol")  # no offset

    config = sim(tmp_path, "f", max_epochs=12, grace_period=2)
    assert [hyperband_brackets(dataclasses.replace(config, max_epochs=m, grace_period=g))
            for m, g in ((12, 2), (3, 1), (8, 2), (30, 5), (4, 4))] == [3, 2, 3, 3, 1]
    built = {s: make_scheduler(dataclasses.replace(config, scheduler=s), "kd")
             for s in ("asha", "hyperband", "median", "none")}
    assert type(built["asha"]) is AsyncHyperBandScheduler and len(built["asha"]._brackets) == 1
    assert len(built["hyperband"]._brackets) == 3
    assert type(built["median"]) is MedianStoppingRule and built["median"]._grace_period == 2
    assert type(built["none"]) is FIFOScheduler


class Trial:
    """A stand-in for a Tune trial: an id and a config (hashable by identity, like Tune's)."""

    def __init__(self, trial_id: str, group: str):
        self.trial_id, self.config = trial_id, {"group": group}


def test_group_scheduler_and_the_pickles_of_old_experiments(tmp_path):
    from search.engine.algorithms import make_scheduler
    from search.engine.scheduler import GroupASHA, GroupScheduler

    config = sim(tmp_path, "p", groups=["baseline", "kd", "at"], scheduler="median",
                 grace_period=1)
    group = GroupScheduler(config, make_scheduler)
    assert set(group.schedulers) == {"kd", "at"}
    trials = [Trial(f"kd{i}", "kd") for i in range(4)]
    other = Trial("at0", "at")
    for t in (*trials, other):
        group.on_trial_add(None, t)
    for t, acc in zip(trials[:3], (0.8, 0.7, 0.9), strict=True):
        assert group.on_trial_result(None, t, {"epoch": 1, "val_acc": acc}) == "CONTINUE"
    # below the median of the other three kd trials; the at trial is not compared with them
    assert group.on_trial_result(None, trials[3], {"epoch": 1, "val_acc": 0.75}) == "STOP"
    assert group.on_trial_result(None, other, {"epoch": 1, "val_acc": 0.1}) == "CONTINUE"

    # A GroupASHA pickled before GroupScheduler existed holds ``asha`` (and no ``added``).
    new = GroupASHA(sim(tmp_path, "p", groups=["baseline", "kd"]))
    old = GroupASHA.__new__(GroupASHA)
    old.__dict__.update({k: v for k, v in new.__dict__.items()
                         if k not in ("schedulers", "added")}, asha=new.schedulers)
    restored = pickle.loads(pickle.dumps(old))
    assert set(restored.schedulers) == {"kd"} and restored.added == set()
    t = Trial("k", "kd")
    restored.on_trial_add(None, t)
    assert restored.on_trial_result(None, t, {"epoch": 1, "val_acc": 0.5}) == "CONTINUE"


def test_the_search_clock_does_not_count_downtime(tmp_path, monkeypatch):
    from search.engine import searcher as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    config = sim(tmp_path, "c", time_budget=10, samples=50)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = module.GroupSearcher(config, url)
    now[0] += 4.0
    assert first.suggest("t1")["group"] == "kd"
    saved = json.loads(json.dumps(first.get_state()))  # as Tune saves it
    assert saved["search_seconds"] == 4.0 and saved["budget_reached"] is False
    now[0] += 3600.0  # the driver is down for an hour
    second = pickle.loads(pickle.dumps(module.GroupSearcher(config, url)))
    second.set_state(saved)
    assert second.search_seconds() == 4.0
    now[0] += 5.9
    assert second.suggest("t2") not in (None, "FINISHED")  # 9.9 s searched: still starts
    now[0] += 0.1
    assert second.suggest("t3") == "FINISHED" and second.budget_reached
    assert second.get_state()["search_seconds"] == pytest.approx(10.0)
    grown = module.GroupSearcher(dataclasses.replace(config, time_budget=20.0), url,
                                 started=second.started, searched=10.0)
    assert grown.suggest("t4") not in (None, "FINISHED")  # a grown budget continues


def test_the_proposer_is_no_trial_setting(tmp_path):
    from search.engine.trainable import trial_settings

    config = sim(tmp_path, "t")
    plain = {"group": "kd", "T": 2.0, "w_ce": 0.5, "w_kl": 1.0}
    assert trial_settings(config, {**plain, "proposer": "tpe"}) == trial_settings(config, plain)


def test_an_old_trials_table_without_proposers_loads_and_reports(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis import load_study
    from analysis.layout import part_name
    from analysis.report import proposals_lines
    from analysis.stats import proposal_counts

    study_dir = tmp_path / "s"
    old = trial_row("s", "kd", "a", "completed", 3, 0.5, 3, 1.0, 0, {"cfg_T": 2.0})
    del old["proposer"], old["group"]
    folder = study_dir / "trials" / "group=kd"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old]), folder / part_name(1))  # the oldest part
    ParquetSink(str(study_dir)).append("trials", "kd", [
        trial_row("s", "kd", f"n{i}", "completed", 3, 0.5, 3, 1.0, 0, {}, proposer=who)
        for i, who in enumerate(("random", "tpe", "random", "warm start"))])
    trials = load_study(study_dir).trials
    assert trials.set_index("trial_id").proposer.isna().to_dict()["a"]
    assert proposal_counts(trials) == {"kd": {"warm start": 1, "random": 2, "tpe": 1}}
    assert proposal_counts(trials.drop(columns="proposer")) == {}
    lines = proposals_lines(trials, {"sampler": "tpe", "n_startup": 2})
    assert "- `kd`: 1 warm start, 2 random, 1 tpe" in lines
    only_random = trials[trials.proposer == "random"]
    assert any("random search" in line for line in proposals_lines(only_random, {}))


# ---------------------------------------------------------------------------------------------
# Warm start: clipping and refusals (an earlier study written directly, no Ray)


def earlier_study(store: Path, name: str, rows: dict[str, list[dict]], **settings) -> None:
    """An earlier study's study.json and trials: per group, (trial_id, status, acc, cfg)."""
    config = load_study_config(None, None, {**TINY, "storage": str(store), "study": name,
                                            "groups": ["kd", "at"], **settings})
    write_study_json(config)
    sink = ParquetSink(config.study_dir)
    for group, trials in rows.items():
        sink.append("trials", group, [
            trial_row(name, group, t["id"], t.get("status", "completed"),
                      t.get("epochs", config.max_epochs), t["acc"], 1, 1.0, 0, t["cfg"])
            for t in trials])


def kd(T, **more):
    return {"cfg_T": T, "cfg_w_ce": 0.5, "cfg_w_kl": 1.0, **more}


def test_warm_start_clips_to_the_new_space_and_refuses_what_it_lacks(tmp_path, capsys,
                                                                      monkeypatch):
    from search.engine.warm_start import plan, plan_lines

    store = tmp_path / "store"
    earlier_study(store, "a", {
        "kd": [{"id": "k1", "acc": 0.6, "cfg": kd(20.0)},  # T beyond this study's 16
               {"id": "k2", "acc": 0.9, "cfg": kd(3.0), "status": "asha_stopped",
                "epochs": 1},  # not a full-budget trial: never a warm start
               {"id": "k3", "acc": 0.7, "cfg": kd(4.0)},
               {"id": "k4", "acc": 0.5, "cfg": kd(5.0)}],
        "at": [{"id": "a1", "acc": 0.4, "cfg": kd(2.0, cfg_w_at=100.0, cfg_mask_pct=47.0)}],
    }, space={"T": {"low": 1.0, "high": 32.0, "log": True},
              "mask_pct": {"low": 0.0, "high": 90.0, "step": 1.0}})
    config = sim(store, "b", warm_start="a")
    got = plan(config)
    assert got["kd"].params == [{"T": 4.0, "w_ce": 0.5, "w_kl": 1.0},
                                {"T": 16.0, "w_ce": 0.5, "w_kl": 1.0}]  # n_startup = 2 best
    assert got["kd"].sources == ["k3", "k1"]
    assert got["at"].params == [{"T": 2.0, "w_ce": 0.5, "w_kl": 1.0, "w_at": 100.0,
                                 "mask_pct": 50.0}]  # onto this study's step of 10
    lines = plan_lines(config)
    assert lines == [
        "warm start kd: the 2 best of study 'a' first (k3, k1); clipped to this study's "
        "space: T 20 -> 16 (k1)",
        "warm start at: the 1 best of study 'a' first (a1); clipped to this study's space: "
        "mask_pct 47 -> 50 (a1)"]

    # Refused in one line, exit 2, before Ray starts: a missing study, a parameter this
    # study does not search, a choice it does not have.
    earlier_study(store, "lr", {"kd": [{"id": "k1", "acc": 0.6, "cfg": kd(2.0, cfg_lr=0.05)}]},
                  space={"kd": {"lr": {"low": 0.01, "high": 0.1, "log": True}}})
    earlier_study(store, "sched", {"kd": [{"id": "k1", "acc": 0.6,
                                           "cfg": kd(2.0, cfg_lr_schedule="cosine")}]},
                  space={"kd": {"lr_schedule": {"choices": ["constant", "cosine"]}}})
    toml = write_toml(tmp_path / "b.toml", {**TINY, "groups": ["kd", "at"], "samples": 3})
    with open(toml, "a") as fh:  # kd's one schedule (a table two levels down)
        fh.write('[space.kd.lr_schedule]\nvalue = "constant"\n')

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("search.commands.tune.init_ray", no_ray)
    for source, line in [
        ("nope", f"warm_start: no study 'nope' in {store}"),
        ("lr", "warm_start: lr was searched in group 'kd' of study 'lr' but is not in this "
               "study's space of 'kd'"),
        ("sched", "warm_start: lr_schedule of trial k1 in study 'sched': 'cosine' is not "
                  "among this study's choices ['constant']"),
    ]:
        rc = main(["tune", "--config", str(toml), "--storage", str(store), "--study", "new",
                   "--warm-start", source])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err == [f"kdsearch tune: error: {line}"], err
        assert not (store / "new").exists()


# ---------------------------------------------------------------------------------------------
# Real searches (simulated trials) on one Ray instance


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    from search.engine.ray_start import init_ray, quiet_ray

    quiet_ray()
    init_ray(None, None, 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("algorithms") / "store"


@pytest.fixture(scope="module")
def search(store, ray_instance):
    """``search(sampler, scheduler)``: (config, summary) of its study, run once per module."""
    done: dict[str, tuple] = {}

    def run(sampler: str, scheduler: str):
        name = f"{sampler}-{scheduler}"
        if name not in done:
            groups = ["baseline", "kd", "at"] if sampler == "tpe" else ["kd", "at"]
            config = sim(store, name, sampler=sampler, scheduler=scheduler, groups=groups)
            import numpy as np

            np.random.seed(0)  # Tune's asynchronous Hyperband draws each trial's bracket
            done[name] = config, run_tune(config, simulate=SIM)
        return done[name]

    return run


def optuna_trials(config, group: str) -> list:
    url = f"sqlite:///{Path(config.study_dir) / 'optuna.db'}"
    return sorted(optuna.load_study(study_name=group, storage=url).trials, key=lambda t: t.number)


def check_optuna_agrees(config, trials) -> None:
    """Every trial of the trials table is one Optuna trial with its state, value, epochs,
    status and proposer; Optuna has no other trial but FAIL ones asked for by a driver
    killed before Tune saved them (``orphaned``)."""
    for group in [g for g in config.groups if g != "baseline"]:
        mine = trials[trials.group == group]
        every = optuna_trials(config, group)
        orphans = [t for t in every if t.user_attrs.get("orphaned")]
        assert all(t.state.name == "FAIL" for t in orphans)
        told = {t.user_attrs["trial_id"]: t for t in every if t not in orphans}
        assert set(told) == set(mine.trial_id)
        for row in mine.itertuples():
            t = told[row.trial_id]
            assert t.state.name == STATE[row.status], (row.trial_id, row.status, t.state)
            assert t.user_attrs["status"] == row.status
            assert t.user_attrs["proposer"] == row.proposer
            assert max(t.intermediate_values) == row.epochs_run
            if row.status in ("completed", "early_stopped"):
                assert t.value == row.best_val_acc
            params = {k: v for k, v in t.params.items()}
            assert params == {p: getattr(row, f"cfg_{p}") for p in params}


def sobol_points(ranges: list[tuple], n: int, seed: int) -> list[dict[str, float]]:
    """The first ``n`` points of a scrambled Sobol sequence mapped onto ``ranges`` (name,
    low, high, log, step) as Optuna maps a unit coordinate: linearly onto [low, high] (onto
    log(low)..log(high) for a log range), a step range widened by half a step at each end
    and rounded onto its grid."""
    from scipy.stats import qmc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n is not a power of 2
        unit = qmc.Sobol(len(ranges), scramble=True, seed=seed).random(n)
    points = []
    for row in unit:
        point = {}
        for (name, low, high, log, step), u in zip(ranges, row, strict=True):
            if log:
                v = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
            elif step:
                v = (low - step / 2) + u * (high - low + step)
                v = min(max(round((v - low) / step) * step + low, low), high)
            else:
                v = low + u * (high - low)
            point[name] = v
        points.append(point)
    return points


COMBOS = [("tpe", "asha"), ("random", "hyperband"), ("qmc", "median"), ("cmaes", "none"),
          ("gp", "none")]
# proposals per group of 5, hand-computed: n_startup = 2 and one trial at a time, so the
# k-th ask of a group (k = 0, 1, …) sees k finished trials (tpe counts COMPLETE and PRUNED,
# gp and cmaes COMPLETE: all are COMPLETE without a trial scheduler)
PROPOSALS = {"tpe": {"random": 2, "tpe": 3}, "random": {"random": 5}, "qmc": {"qmc": 5},
             "cmaes": {"random": 2, "cmaes": 3}, "gp": {"random": 2, "gp": 3}}


@pytest.mark.slow
@pytest.mark.parametrize("sampler, scheduler", COMBOS)
def test_each_sampler_and_trial_scheduler_searches(search, sampler, scheduler, capsys):
    config, summary = search(sampler, scheduler)
    trials = read_table(config.study_dir, "trials")
    sizes = trials.groupby("group", observed=True).size().to_dict()
    assert sizes == {g: 5 for g in config.groups}
    check_optuna_agrees(config, trials)
    tuned = trials[trials.group != "baseline"]
    for group in ("kd", "at"):
        assert summary["groups"][group]["proposals"] == PROPOSALS[sampler]
    print_summary(summary)
    words = ", ".join(f"{n} {p}" for p, n in PROPOSALS[sampler].items())
    assert capsys.readouterr().out.count(f"proposals: {words}") == 2
    stopped = tuned[tuned.status == "asha_stopped"]
    if scheduler == "none":  # no early stopping: every trial ran the full budget
        assert (tuned.status == "completed").all()
        assert (tuned.epochs_run == config.max_epochs).all()
    else:  # deterministic (trials one at a time); the scheduler stopped some
        assert len(stopped) >= 1 and (stopped.epochs_run < config.max_epochs).all()
    base = trials[trials.group == "baseline"]
    assert (base.status == "completed").all() and base.proposer.isna().all()
    if sampler != "qmc":
        return
    seed = config.seed  # one Sobol sequence per group, seeded by the study seed
    shared = [("T", 1.0, 16.0, True, None), ("w_ce", 0.1, 1.0, False, None),
              ("w_kl", 0.1, 2.0, False, None)]
    at = shared + [("w_at", 10.0, 5000.0, True, None), ("mask_pct", 0.0, 90.0, False, 10.0)]
    for group, ranges in (("kd", shared), ("at", at)):
        assert {p: (r.low, r.high, r.log, r.step) for p, r in config.group_space(group).items()
                } == {name: (low, high, log, step) for name, low, high, log, step in ranges}
        expected = sobol_points(ranges, 5, seed)
        got = [t.params for t in optuna_trials(config, group)]
        for e, g in zip(expected, got, strict=True):
            assert g == pytest.approx(e, rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_a_warm_start_proposes_the_earlier_best_first(search, store, capsys):
    earlier, _ = search("qmc", "median")  # 4 full-budget trials per group, 1 stopped
    before = read_table(earlier.study_dir, "trials")
    capsys.readouterr()
    config = sim(store, "warm", warm_start=earlier.study, samples=3,
                 space={"T": {"low": 1.0, "high": 2.0, "log": True}})
    summary = run_tune(config, simulate=SIM)
    out = capsys.readouterr().out
    trials = read_table(config.study_dir, "trials").set_index("trial_id")
    clipped_any = False
    for group in ("kd", "at"):
        full = before[(before.group == group) & (before.status == "completed")
                      & (before.epochs_run == earlier.max_epochs)]
        best = full.sort_values("best_val_acc", ascending=False).head(2)  # n_startup = 2
        expected = []
        for row in best.to_dict("records"):
            params = {p: row[f"cfg_{p}"] for p in config.group_space(group)}
            clipped_any |= params["T"] > 2.0
            expected.append({**params, "T": min(params["T"], 2.0)})  # this study's T range
        first, second, third = optuna_trials(config, group)
        assert [first.params, second.params] == expected  # exact values
        assert [t.user_attrs["proposer"] for t in (first, second, third)] == [
            "warm start", "warm start", "tpe"]
        assert [first.user_attrs["warm_start_trial"], second.user_attrs["warm_start_trial"]] \
            == list(best.trial_id)
        for t in (first, second):
            row = trials.loc[t.user_attrs["trial_id"]]
            assert row.proposer == "warm start"
            assert {p: row[f"cfg_{p}"] for p in t.params} == t.params
        assert summary["groups"][group]["proposals"] == {"warm start": 2, "tpe": 1}
        line = next(x for x in out.splitlines() if x.startswith(f"warm start {group}:"))
        assert ", ".join(best.trial_id) in line
    assert clipped_any and "clipped to this study's space: T " in out
    check_optuna_agrees(config, trials.reset_index())

    # a grown search (resume) does not enqueue them again
    grown = run_tune(dataclasses.replace(config, samples=4), resume=True, simulate=SIM)
    for group in ("kd", "at"):
        made = [t.user_attrs["proposer"] for t in optuna_trials(config, group)]
        assert len(made) == 4 and made.count("warm start") == 2
        assert grown["groups"][group]["proposals"]["warm start"] == 2


BUDGET, DOWN, EPOCH = 12.0, 12.0, 0.3  # DOWN > BUDGET - 2 s searched before the kill
CHILD = """
import sys
from search.commands.tune import run_tune
from search.study import load_study_config
run_tune(load_study_config(None, sys.argv[1], {}), simulate=float(sys.argv[2]), num_cpus=2)
"""


def saved_state(study_dir: Path) -> dict | None:
    """The searcher state Tune saved last: the newest session's file (its name holds the
    session's start; a restored run uploads the older files again)."""
    files = sorted((study_dir / "ray" / "search").glob("searcher-state-*.pkl"))
    return json.loads(files[-1].read_text()) if files else None


@pytest.mark.slow
def test_a_time_budget_stops_new_trials_and_a_resume_skips_the_downtime(store, ray_instance,
                                                                       tmp_path, capsys):
    settings = {**TINY, "storage": str(store), "study": "budget", "groups": ["kd", "at"],
                "samples": 40, "max_epochs": 2, "grace_period": 1, "time_budget": f"{BUDGET}s"}
    toml = write_toml(tmp_path / "budget.toml", settings)
    study_dir = store / "budget"
    with open(tmp_path / "first.log", "w") as log, spawn(
            [sys.executable, "-c", CHILD, str(toml), str(EPOCH)], env=env(), stdout=log,
            stderr=subprocess.STDOUT) as proc:
        def searched_a_while():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "first.log").read_text()[-3000:])
            state = saved_state(study_dir) if study_dir.exists() else None
            return state if state and state["search_seconds"] >= 2.0 else None

        wait_for(searched_a_while, 180, "2 s of search in the saved state")
        proc.reap()  # SIGKILL the driver and its Ray instance
    killed = saved_state(study_dir)
    assert not killed["budget_reached"] and killed["search_seconds"] < BUDGET
    time.sleep(DOWN)  # the downtime itself: a budget that counted it would be spent

    resumed_at = time.time()
    config = load_study_config(None, toml, {})
    summary = run_tune(config, resume=True, simulate=EPOCH)
    resumed_for = time.time() - resumed_at
    out = capsys.readouterr().out
    final = saved_state(study_dir)
    # trials started after the resume: with the downtime counted (>= 2 + 12 s) none would.
    # The trials restored from the kill run first; once they have all ended with budget left
    # (the budget cannot end sooner than BUDGET - searched after the resume), a slot is free
    # and a new trial must start. On a loaded machine the restored trials can outlast the
    # budget; then only the clock below tells a counted downtime.
    started = sum(final["started"].values()) - sum(killed["started"].values())
    epochs = read_table(str(study_dir), "epochs")
    restored_end = epochs.loc[epochs.trial_id.isin(list(killed["live"])), "timestamp"].max()
    if restored_end - resumed_at < BUDGET - killed["search_seconds"]:
        assert started >= 1, (killed, final)
    # the clock went on from the saved state by no more than the resumed run lasted
    assert final["budget_reached"] and BUDGET <= final["search_seconds"]
    assert final["search_seconds"] <= killed["search_seconds"] + resumed_for, (killed, final)
    done = json.loads((study_dir / "ray" / "search.done.json").read_text())
    assert done["budget_reached"] and done["search_seconds"] >= BUDGET
    assert summary["stopped_by_time_budget"] and summary["search_seconds"] >= BUDGET
    assert "search stopped by its time budget" in out
    trials = read_table(str(study_dir), "trials")
    assert len(trials) == sum(final["started"].values()) < 2 * config.samples
    assert (trials.status != "failed").all()
    check_optuna_agrees(config, trials)
    # no trial started after the budget: the last first epoch of a trial new to the resumed
    # search began within the budget left (plus the restore and a worker's start; without the
    # budget 80 trials would go on starting for over a minute)
    starts = (epochs.timestamp - epochs.epoch_seconds).groupby(epochs.trial_id).min()
    new = starts[(starts > resumed_at) & ~starts.index.isin(list(killed["live"]))]
    if len(new):
        last = new.max() - resumed_at
        assert last <= BUDGET - killed["search_seconds"] + 20.0, last
    print_summary(summary)
    assert f"stopped by its time budget of {BUDGET:.0f} s" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\ntime budget {BUDGET:.0f} s: {killed['search_seconds']:.1f} s searched when "
              f"killed ({sum(killed['started'].values())} trials started), {DOWN:.0f} s down, "
              f"then {started} more trials in {resumed_for:.1f} s; "
              f"{final['search_seconds']:.1f} s searched in all")
