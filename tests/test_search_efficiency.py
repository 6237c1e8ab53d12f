"""``kdsearch bench --search``: the bank of learning curves, the surrogate, the replay of a
search strategy on it, and the speedup to quality q (docs/PERFORMANCE.md, "Search
efficiency"). Banks here are written with the project's own sink; expectations are worked
out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from search.bench.curves import (
    Bank,
    choose_surrogate,
    cross_validate,
    fit_surrogate,
    load_bank,
    positions,
)
from search.bench.replay import (
    Trace,
    best_so_far,
    first_reaching,
    parse_strategy,
    replay,
    replay_config,
    speedup,
)
from search.store.rows import epoch_row, trial_row
from search.store.sink import ParquetSink
from search.study import load_study_config
from search.study.space import group_space, space_from

REPO = Path(__file__).resolve().parents[1]
KD_SPACE = {"T": {"low": 1.0, "high": 16.0, "log": True},
            "w_ce": {"low": 0.1, "high": 1.0, "log": False},
            "w_kl": {"low": 0.1, "high": 2.0, "log": False}}


def write_study(root: Path, name: str, runs: list[tuple[dict, list[float]]],
                warm_start: str | None = None, seed: int = 0) -> None:
    """A finished ``kd`` study of full-budget trials (``runs``: parameters, curve) written
    as ``tune`` writes one: study.json, then epochs and trials rows through ParquetSink."""
    study_dir = root / name
    study_dir.mkdir(parents=True)
    epochs = len(runs[0][1])
    (study_dir / "study.json").write_text(json.dumps({
        "study": name, "data": "synthetic:4", "groups": ["kd"], "samples": len(runs),
        "max_epochs": epochs, "grace_period": 1, "reduction_factor": 2.0, "sampler": "qmc",
        "scheduler": "none", "seed": seed, "warm_start": warm_start, "val_size": 10,
        "space": KD_SPACE, "group_spaces": {"kd": KD_SPACE}}))
    sink = ParquetSink(str(study_dir))
    for i, (params, curve) in enumerate(runs):
        cfg = {f"cfg_{k}": v for k, v in params.items()}
        tid = f"t{i}"
        for e, acc in enumerate(curve, start=1):
            metrics = {"val_acc": acc, "val_loss": 1 - acc, "epoch_seconds": 10.0 + i}
            sink.append("epochs", "kd", [epoch_row(name, "kd", tid, 0, e, seed, metrics, cfg,
                                                   "n")])
        sink.append("trials", "kd", [trial_row(name, "kd", tid, "completed", epochs,
                                               max(curve), int(np.argmax(curve)) + 1, 1.0,
                                               seed, cfg)])


def test_positions_are_fractions_of_each_range_log_ranges_in_log():
    space = group_space(space_from(KD_SPACE), "kd")
    # T = 4 is halfway from 1 to 16 in log; w_ce 0.55 halfway in 0.1-1; w_kl 2 the top
    assert positions(space, {"T": 4.0, "w_ce": 0.55, "w_kl": 2.0}) == pytest.approx(
        np.array([[0.5, 0.5, 1.0]]))


def test_load_bank_averages_seeds_and_keeps_scaled_residuals(tmp_path):
    a, b, c = ({"T": 1.0, "w_ce": 0.1, "w_kl": 0.1}, {"T": 16.0, "w_ce": 1.0, "w_kl": 2.0},
               {"T": 4.0, "w_ce": 0.55, "w_kl": 1.05})
    write_study(tmp_path, "curves", [(a, [0.5, 0.6]), (b, [0.2, 0.3]), (c, [0.4, 0.4])])
    write_study(tmp_path, "curves-seed1", [(a, [0.7, 0.8])], warm_start="curves", seed=1)
    bank = load_bank(tmp_path, "kd")
    assert bank.trials == 4 and len(bank.curves) == 3 and bank.max_epochs == 2
    row = int(np.flatnonzero(bank.seeds == 2)[0])
    assert bank.curves[row] == pytest.approx([0.6, 0.7])  # the mean of the two seeds
    # residuals from the mean (+-0.1), scaled by sqrt(n / (n - 1)) = sqrt(2)
    assert sorted(bank.residuals[:, 0]) == pytest.approx([-0.1 * math.sqrt(2),
                                                          0.1 * math.sqrt(2)])
    assert bank.noise_std == pytest.approx([0.1 * math.sqrt(2)] * 2)
    assert sorted(bank.epoch_seconds) == pytest.approx([10.0, 10.0, 11.0, 12.0])
    with pytest.raises(ValueError, match="group 'at' is not in"):
        load_bank(tmp_path, "at")


def test_knn_weights_by_inverse_squared_distance():
    x = np.array([[0.0], [1.0], [3.0]])
    y = np.array([[1.0, 1.0], [2.0, 4.0], [9.0, 9.0]])
    two = fit_surrogate("knn", 2, x, y)
    # from 0.5 away: points 0 and 1 at distance 0.5 each -> equal weights
    assert two.predict([[0.5]])[0] == pytest.approx([1.5, 2.5])
    # from 2: points 1 (distance 1) and 3 (distance 1) equal; from 0.2: 1/0.04 vs 1/0.64
    w0, w1 = 1 / 0.04, 1 / 0.64
    assert two.predict([[0.2]])[0] == pytest.approx(
        [(w0 * 1 + w1 * 2) / (w0 + w1), (w0 * 1 + w1 * 4) / (w0 + w1)])
    assert fit_surrogate("knn", 1, x, y).predict(x) == pytest.approx(y)


def linear_bank(n: int = 20) -> Bank:
    """Curves linear in a 2-D position: a thin-plate spline with degree 1 reproduces them."""
    rng = np.random.default_rng(0)
    x = rng.random((n, 2))
    y = np.stack([0.3 + 0.2 * x[:, 0] + 0.1 * x[:, 1], 0.4 + 0.3 * x[:, 0] + 0.1 * x[:, 1]], 1)
    return Bank(group="kd", space={}, max_epochs=2, config={}, params=None, positions=x,
                curves=y, seeds=np.ones(n, int), residuals=np.zeros((0, 2)),
                epoch_seconds=np.array([1.0]), trials=n)


def test_cross_validation_tells_an_exact_surrogate_from_a_crude_one():
    bank = linear_bank()
    rbf = cross_validate(bank, "rbf", 0.0)
    nearest = cross_validate(bank, "knn", 1)
    assert rbf["rmse_final"] < 1e-6 and rbf["spearman_final"] == pytest.approx(1.0)
    assert nearest["rmse_final"] > 0.01  # a step function of a ramp
    chosen, scores = choose_surrogate(bank)
    assert chosen.kind == "rbf" and len(scores) == 8
    assert min(s["rmse_final"] for s in scores) == pytest.approx(
        next(s for s in scores if s["surrogate"] == chosen.name)["rmse_final"])


def two_point_bank(residuals: np.ndarray | None = None) -> Bank:
    """kd's space; a poor corner (all parameters low) and a good one (all high), 4 epochs,
    rising curves; the nearest-configuration surrogate answers one or the other."""
    space = group_space(space_from(KD_SPACE), "kd")
    curves = np.array([[0.1, 0.15, 0.2, 0.25], [0.5, 0.7, 0.8, 0.9]])
    return Bank(group="kd", space=space, max_epochs=4, config={}, params=None,
                positions=np.array([[0.0] * 3, [1.0] * 3]), curves=curves,
                seeds=np.ones(2, int),
                residuals=np.zeros((0, 4)) if residuals is None else residuals,
                epoch_seconds=np.array([2.0]), trials=2)


def bank_config(**settings):
    return load_study_config(None, None, {"groups": ["kd"], "max_epochs": 4, "grace_period": 1,
                                          "reduction_factor": 2.0, "samples": 12, **settings})


def test_replay_runs_every_trial_its_budget_without_a_scheduler():
    bank = two_point_bank()
    surrogate = fit_surrogate("knn", 1, bank.positions, bank.curves)
    trace = replay(bank, surrogate, replay_config(bank_config(), "random", 3), 2, "random")
    assert trace.trials == 12 and trace.total_epochs == 12 * 4
    # 12 trials of 4 epochs of 2 s on 2 slots: 6 rounds of 8 s
    assert trace.total_seconds == pytest.approx(48.0)
    # the selection only improves, and ends at the good corner (the chance that 12 uniform
    # draws all lie nearer the poor corner is far below 1e-3)
    assert list(trace.quality) == sorted(trace.quality) and trace.quality[-1] == 0.9
    assert set(trace.quality) <= {0.25, 0.9}


def test_asha_stops_poor_trials_and_spends_fewer_epochs():
    bank = two_point_bank()
    surrogate = fit_surrogate("knn", 1, bank.positions, bank.curves)
    full = replay(bank, surrogate, replay_config(bank_config(), "random", 3), 1, "random")
    asha = replay(bank, surrogate, replay_config(bank_config(), "random+asha", 3), 1,
                  "random+asha")
    # same seed, same sampler: the same 12 proposals, but ASHA cuts poor ones at its rungs
    assert asha.trials == full.trials == 12
    assert asha.total_epochs < full.total_epochs
    assert asha.quality[-1] == full.quality[-1] == 0.9
    assert first_reaching(asha, 0.9) <= first_reaching(full, 0.9)


def test_noise_can_mislead_the_selection_but_the_recorded_quality_is_noise_free():
    # a residual of +0.9 on the last epoch makes a poor trial look best sometimes
    bank = two_point_bank(residuals=np.array([[0, 0, 0, 0.9], [0, 0, 0, -0.0]]))
    surrogate = fit_surrogate("knn", 1, bank.positions, bank.curves)
    qualities = set()
    for seed in range(8):
        trace = replay(bank, surrogate, replay_config(bank_config(), "random", seed), 2,
                       "random")
        qualities |= set(trace.quality)
    assert qualities <= {0.25, 0.9}  # expected values of the corners, never the noisy 1.15


def test_first_reaching_and_best_so_far_step_functions():
    trace = Trace("x", 1, 0, epochs=np.array([8, 24, 40]), seconds=np.array([1.0, 3.0, 5.0]),
                  started=np.array([1, 3, 5]), quality=np.array([0.3, 0.5, 0.6]), trials=5,
                  total_epochs=40, total_seconds=5.0)
    assert first_reaching(trace, 0.5) == 24 and first_reaching(trace, 0.55) == 40
    assert first_reaching(trace, 0.55, "seconds") == 5.0
    assert first_reaching(trace, 0.5, "started") == 3
    assert first_reaching(trace, 0.7) == math.inf
    got = best_so_far(trace, np.array([4, 8, 30, 100]))
    assert np.isnan(got[0]) and list(got[1:]) == [0.3, 0.5, 0.6]


def test_speedup_is_the_ratio_of_median_epochs_and_undefined_when_not_reached():
    rng = np.random.default_rng(0)
    out = speedup(np.array([10.0, 20.0, 30.0]), np.array([5.0, 10.0, 15.0]), rng)
    assert out["speedup"] == pytest.approx(2.0)
    assert out["speedup_low"] <= 2.0 <= out["speedup_high"]
    never = speedup(np.array([10.0, 20.0, 30.0]), np.array([math.inf, math.inf, 5.0]), rng)
    assert never["speedup"] is None and never["speedup_low"] is None


def test_strategies_are_sampler_plus_scheduler():
    assert parse_strategy("tpe+asha") == ("tpe", "asha")
    assert parse_strategy("qmc") == ("qmc", "none")
    with pytest.raises(ValueError, match="SAMPLER"):
        parse_strategy("tpe+sometimes")
    config = replay_config(bank_config(), "gp+median", 7, samples=40, grace_period=2)
    assert (config.sampler, config.scheduler, config.seed, config.samples,
            config.grace_period, config.n_startup) == ("gp", "median", 7, 40, 2, 10)


def random_kd_params(rng: np.random.Generator) -> dict[str, float]:
    """One uniform draw from KD_SPACE (T log-uniform)."""
    return {"T": float(np.exp(rng.uniform(0, np.log(16)))),
            "w_ce": float(rng.uniform(0.1, 1)), "w_kl": float(rng.uniform(0.1, 2))}


def test_bench_search_command_on_a_small_bank(tmp_path):
    rng = np.random.default_rng(1)
    runs = []
    for _ in range(10):
        params = random_kd_params(rng)
        top = 0.3 + 0.3 * params["w_ce"]
        runs.append((params, [top * (1 - 0.5 ** e) for e in range(1, 5)]))
    write_study(tmp_path / "bank", "curves", runs)
    write_study(tmp_path / "bank", "curves-seed1",
                [(runs[0][0], [v + 0.01 for v in runs[0][1]])], warm_start="curves", seed=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "search.commands.cli", "bench", "--search", "--bank",
           str(tmp_path / "bank"), "--slots", "1,4", "--seeds", "3", "--samples", "16",
           "--strategies", "tpe+asha", "--json", "--out", str(out), "--jobs", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    surrogate = lines[0]["surrogate"]
    assert surrogate["configurations"] == 10 and surrogate["trainings"] == 11
    rows = lines[1:]
    assert [(r["slots"], r["strategy"]) for r in rows] == [
        (1, "random"), (1, "tpe+asha"), (4, "random"), (4, "tpe+asha")]
    assert all(r["replays"] == 3 for r in rows)
    assert all(r["speedup"] == 1.0 for r in rows if r["strategy"] == "random")
    assert all(r["trials"] == 16 for r in rows)  # --samples, not the bank study's 10
    saved = json.loads((out / "search_efficiency.json").read_text())
    assert saved["results"] == rows and (out / "search_efficiency.png").stat().st_size > 10_000
    bad = subprocess.run([*cmd[:-7], "--strategies", "tpe+never"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert bad.returncode != 0 and "SAMPLER[+SCHEDULER]" in bad.stderr
    default = subprocess.run([*cmd[:7], "--seeds", "1", "--strategies", "random", "--json",
                              "--out", str(out), "--jobs", "1"], capture_output=True,
                             text=True, timeout=300, cwd=REPO)
    assert default.returncode == 0, default.stderr[-2000:]
    # without --samples a replay runs 64 trials per group (the documented default)
    assert json.loads(default.stdout.splitlines()[-1])["trials"] == 64


def test_a_real_study_is_measured_like_its_replays(tmp_path):
    from analysis.tables import load_study
    from search.bench.replay import band_position, real_trace

    a, b, c = ({"T": 1.0, "w_ce": 0.1, "w_kl": 0.1}, {"T": 16.0, "w_ce": 1.0, "w_kl": 2.0},
               {"T": 4.0, "w_ce": 0.55, "w_kl": 1.05})
    # written one trial after another, so they end in this order
    write_study(tmp_path, "curves", [(a, [0.5, 0.6]), (b, [0.2, 0.3]), (c, [0.8, 0.9])])
    bank = load_bank(tmp_path, "kd")
    surrogate = fit_surrogate("knn", 1, bank.positions, bank.curves)
    real = real_trace(load_study(tmp_path / "curves"), bank, surrogate, slots=1)
    # a is selected after 2 epochs, b never (worse), c after all 6; 1st and 3rd trial started
    assert list(real.epochs) == [2, 6] and list(real.started) == [1, 3]
    assert real.quality == pytest.approx([0.6, 0.9]) and real.strategy == "real qmc"

    def flat(value: float) -> Trace:
        return Trace("x", 1, 0, epochs=np.array([1]), seconds=np.array([1.0]),
                     started=np.array([1]), quality=np.array([value]), trials=1,
                     total_epochs=6, total_seconds=1.0)

    replays = [flat(0.2), flat(0.7), flat(0.95)]
    position = band_position(real, replays, np.array([2.0, 6.0]))
    # at 2 epochs the real 0.6 is above 1 of 3 replays; at 6 its 0.9 is above 2 of 3
    assert position["rank"] == pytest.approx([1 / 3, 2 / 3])
    # lower-method quartiles of (0.2, 0.7, 0.95): 0.2 and 0.7 -> 0.6 inside, 0.9 outside
    assert position["inside_iqr"] == pytest.approx(0.5)
    assert position["inside_90"] == pytest.approx(0.5)  # 5-95%: 0.2 to 0.7 as well


def test_bench_search_real_puts_a_study_beside_replays_of_its_own_settings(tmp_path):
    rng = np.random.default_rng(2)
    runs = []
    for _ in range(8):
        params = random_kd_params(rng)
        runs.append((params, [0.2 + 0.4 * params["w_ce"] * e / 4 for e in range(1, 5)]))
    write_study(tmp_path / "bank", "curves", runs)
    cmd = [sys.executable, "-m", "search.commands.cli", "bench", "--search", "--bank",
           str(tmp_path / "bank"), "--real", str(tmp_path / "bank" / "curves"), "--slots", "1",
           "--seeds", "3", "--json", "--out", str(tmp_path / "out"), "--jobs", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.splitlines()[-1])
    # the study's own strategy and budget: qmc, no scheduler, its 8 trials
    assert (row["strategy"], row["slots"], row["replays"]) == ("qmc+none", 1, 3)
    assert row["replay"]["trials"] == 8 and row["replay"]["total_epochs"] == 32
    assert 0 <= row["inside_iqr"] <= row["inside_90"] <= 1
    # the real search selected the best of its 8 runs: its expected final is the bank's top
    assert row["real_final"] == pytest.approx(max(c[-1] for _, c in runs), abs=0.02)
    assert (tmp_path / "out" / "real_vs_replay.json").exists()


def test_the_committed_bank_loads():
    # the bank issue 20 asks for: at least 48 configurations per group, 8 of them with 3 seeds
    for group, dims in (("kd", 3), ("at", 5)):
        bank = load_bank(REPO / "results" / "curves", group)
        assert bank.positions.shape == (len(bank.curves), dims) and len(bank.curves) >= 48
        assert (bank.seeds == 3).sum() >= 8 and len(bank.residuals) == 3 * (bank.seeds == 3).sum()
        assert bank.max_epochs == 8 and bank.curves.shape[1] == 8
        assert ((bank.positions >= 0) & (bank.positions <= 1)).all()
        assert ((bank.curves > 0.1) & (bank.curves < 1)).all()  # better than chance


def test_the_committed_comparison_rebuilds_the_tables_of_performance_md():
    # docs/PERFORMANCE.md "Search efficiency" quotes results/curves/efficiency/TABLES.md, which
    # efficiency_table.py makes from the committed JSON lines of compare.sh
    script = REPO / "results" / "curves" / "efficiency_table.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    committed = (REPO / "results" / "curves" / "efficiency" / "TABLES.md").read_text()
    assert done.stdout == committed
    doc = (REPO / "docs" / "PERFORMANCE.md").read_text()
    strategy_tables = committed.split("\n\n")[:4]  # kd and at: speedups, final selections
    assert len(strategy_tables) == 4 and all(table in doc for table in strategy_tables)
