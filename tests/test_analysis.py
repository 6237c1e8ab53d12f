"""Tests of the analysis package on a small hand-built Parquet study with known numbers."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sps

import analysis
from analysis import (
    PAPER_ACC,
    best_configs,
    compare_groups,
    compare_studies,
    export_comparison,
    group_outcomes,
    health_check,
    holm,
    latest_attempt,
    load_study,
    param_importance,
    plot_asha,
    plot_learning_curves,
    plot_robustness,
    plot_test_accuracy,
    range_positions,
    replication,
    share_by_weight,
    teacher_gap,
    write_report,
)
from analysis.versus import NEITHER, NEW, NOT_REPLICATED, REPLICATED, REVERSED, UNDEFINED, verdict

PNG = b"\x89PNG\r\n\x1a\n"
MAX_EPOCHS = 4
SPACE = {
    "T": {"low": 1.0, "high": 16.0, "log": True, "step": None},
    "w_ce": {"low": 0.1, "high": 1.0, "log": False, "step": None},
    "w_kl": {"low": 0.1, "high": 2.0, "log": False, "step": None},
    "w_at": {"low": 10.0, "high": 5000.0, "log": True, "step": None},
    "w_fa": {"low": 0.01, "high": 10.0, "log": True, "step": None},
    "mask_pct": {"low": 0.0, "high": 90.0, "log": False, "step": 10.0},
}
# Reproduced test accuracy per group and seed; `combined` shares only seeds 0 and 1 with others.
RUNS_ACC = {
    "baseline": {0: 0.80, 1: 0.81, 2: 0.79},
    "kd": {0: 0.83, 1: 0.845, 2: 0.82},
    "fa": {0: 0.82, 1: 0.83, 2: 0.825},
    "at": {0: 0.835, 1: 0.83, 2: 0.84},
    "combined": {0: 0.84, 1: 0.835, 3: 0.85},
}
TEACHER = {"hash": "abc", "arch": "resnet50", "width": 0.25, "cbam": False, "epochs": 45,
           "test_acc": 0.90, "test_loss": 0.3, "params": 1_500_000, "latency_ms_bs1": 3.5}
ACTIVE = {
    "baseline": ("ce",),
    "kd": ("ce", "kl"),
    "fa": ("ce", "kl", "fa"),
    "at": ("ce", "kl", "at"),
    "combined": ("ce", "kl", "at", "fa"),
}
SHARE = {"ce": 0.5, "kl": 0.3, "at": 0.2, "fa": 0.2}
# kd trials: (T, w_ce, w_kl, status, epochs_run, best_val_acc); accuracy driven mostly by T.
KD_TRIALS = [
    (1.0, 0.5, 1.0, "completed", 4, 0.70),
    (2.0, 0.9, 0.5, "completed", 4, 0.75),
    (4.0, 0.3, 1.5, "completed", 4, 0.80),
    (12.0, 0.6, 0.8, "completed", 4, 0.90),
    (8.0, 0.2, 1.2, "early_stopped", 4, 0.85),
    (1.5, 0.7, 0.3, "asha_stopped", 1, 0.72),
    (3.0, 0.4, 1.9, "asha_stopped", 2, 0.99),  # higher, but not the full budget
    (6.0, 0.8, 0.6, "failed", 1, float("nan")),
]


def cfg(group: str, T: float = 4.0, w_ce: float = 1.0, w_kl: float = 1.0) -> dict:
    """cfg_* columns of a trial; weights of inactive terms are 0."""
    active = ACTIVE[group]
    return {
        "cfg_T": T if "kl" in active else 1.0,
        "cfg_w_ce": w_ce,
        "cfg_w_kl": w_kl if "kl" in active else 0.0,
        "cfg_w_at": 500.0 if "at" in active else 0.0,
        "cfg_w_fa": 1.0 if "fa" in active else 0.0,
        "cfg_mask_pct": 50.0 if {"at", "fa"} & set(active) else 0.0,
    }


def trial_rows() -> list[dict]:
    """Every trial of the study (kd from KD_TRIALS, others three or two full-budget trials)."""
    rows = []
    for i, (T, w_ce, w_kl, status, epochs_run, best) in enumerate(KD_TRIALS):
        rows.append({"group": "kd", "trial_id": f"kd-{i}", "status": status,
                     "epochs_run": epochs_run, "best_val_acc": best, **cfg("kd", T, w_ce, w_kl)})
    for group in ("baseline", "fa", "at", "combined"):
        for i in range(2 if group == "baseline" else 3):
            rows.append({"group": group, "trial_id": f"{group}-{i}", "status": "completed",
                         "epochs_run": MAX_EPOCHS, "best_val_acc": 0.70 + 0.02 * i,
                         **cfg(group, T=2.0 + 3 * i, w_ce=0.3 + 0.2 * i, w_kl=0.5 + 0.4 * i)})
    for row in rows:
        row |= {"study": "s", "best_epoch": row["epochs_run"], "wall_seconds": 10.0,
                "seed": 0, "error": "boom" if row["status"] == "failed" else None,
                "timestamp": 1000.0}
    return rows


def epoch_row(trial: dict, epoch: int, attempt: int = 0, val_acc: float | None = None,
              timestamp: float | None = None) -> dict:
    """One epochs row of ``trial``; gradient share planted at 0 for the `at` term of `at`."""
    group = trial["group"]
    shares = {f"gshare_{t}": (SHARE[t] if t in ACTIVE[group] else math.nan) for t in SHARE}
    if group == "at":
        shares["gshare_at"] = 0.0
    acc = 0.5 + 0.05 * epoch if val_acc is None else val_acc
    return {
        "study": "s", "group": group, "trial_id": trial["trial_id"], "attempt": attempt,
        "epoch": epoch, "seed": 0, **{k: v for k, v in trial.items() if k.startswith("cfg_")},
        "val_acc": acc, "val_loss": 1.0, "train_loss": 1.0,
        **{f"loss_{t}": 0.1 for t in SHARE}, **shares, "lr": 0.01, "epoch_seconds": 1.0,
        "images_per_s": 100.0, "node": "n0",
        "timestamp": 2000.0 + epoch + 10 * attempt if timestamp is None else timestamp,
    }


def run_row(group: str, seed: int, acc: float) -> dict:
    """One reproduced run."""
    return {"study": "s", "group": group, "seed": seed, "source_trial_id": f"{group}-0",
            "test_acc": acc, "test_loss": 0.5, "corrupt_acc_mean": acc - 0.1,
            "params": 11_000_000, "latency_ms_bs1": 2.0 + seed, "images_per_s_bs256": 5000.0,
            **cfg(group), "timestamp": 3000.0}


def write_parts(root: Path, table: str, name: str, rows: list[dict]) -> None:
    """Write ``rows`` as one Parquet part per group in hive layout (group from the path)."""
    frame = pd.DataFrame(rows)
    for group, sub in frame.groupby("group"):
        folder = root / table / f"group={group}"
        folder.mkdir(parents=True, exist_ok=True)
        data = pa.Table.from_pandas(sub.drop(columns="group"), preserve_index=False)
        pq.write_table(data, folder / name)


def build_study(root: Path) -> Path:
    """The fixture study, with overwritten duplicates in runs, epochs and trials."""
    root.mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({
        "study": "s", "data": "synthetic:tiny", "space": SPACE,
        "groups": list(RUNS_ACC), "max_epochs": MAX_EPOCHS}))
    (root / "teacher.json").write_text(json.dumps(TEACHER))
    trials = trial_rows()
    stale_trial = {**trials[0], "status": "failed", "epochs_run": 1, "best_val_acc": 0.1}
    write_parts(root, "trials", "part-000.parquet", [stale_trial])
    write_parts(root, "trials", "part-001.parquet", trials)

    epochs = [epoch_row(t, e) for t in trials for e in range(1, t["epochs_run"] + 1)]
    # kd-1 was resumed: attempt 0 logged a bad epoch 2 that attempt 1 re-ran.
    epochs.append(epoch_row(trials[1], 2, attempt=1, val_acc=0.61))
    epochs.append(epoch_row(trials[1], 2, attempt=0, val_acc=0.02, timestamp=2002.0))
    # kd-0 epoch 2 written again later in file order but with an OLDER timestamp.
    stale_epoch = epoch_row(trials[0], 2, val_acc=0.01, timestamp=1.0)
    epochs = [r for r in epochs if not (r["trial_id"] == "kd-1" and r["attempt"] == 0
                                        and r["epoch"] == 2 and r["val_acc"] != 0.02)]
    write_parts(root, "epochs", "part-000.parquet", epochs)
    write_parts(root, "epochs", "part-001.parquet", [stale_epoch])

    runs = [run_row(g, s, a) for g, seeds in RUNS_ACC.items() for s, a in seeds.items()]
    write_parts(root, "runs", "part-000.parquet", [run_row("kd", 1, 0.10)])  # overwritten
    write_parts(root, "runs", "part-001.parquet", runs)

    robustness = [
        {"study": "s", "group": g, "seed": s, "corruption": c, "severity": sev,
         "acc": a - 0.05 * sev - (0.02 if c == "contrast" else 0.0), "timestamp": 4000.0}
        for g in ("baseline", "kd") for s, a in RUNS_ACC[g].items()
        for c in ("gaussian_noise", "contrast") for sev in range(1, 6)
    ]
    write_parts(root, "robustness", "part-000.parquet", robustness)
    return root


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_study(tmp_path_factory.mktemp("storage") / "s")


@pytest.fixture(scope="module")
def study(study_dir: Path) -> analysis.Study:
    return load_study(study_dir)


@pytest.fixture(scope="module")
def report(study_dir: Path) -> Path:
    return write_report(study_dir)


def expected_acc(group: str) -> np.ndarray:
    return np.array(list(RUNS_ACC[group].values())) * 100


# ---------------------------------------------------------------- tables


def test_load_study_deduplicates(study: analysis.Study) -> None:
    runs = study.runs
    assert len(runs) == sum(len(s) for s in RUNS_ACC.values())
    assert not runs.duplicated(["group", "seed"]).any()
    assert runs.loc[(runs["group"] == "kd") & (runs["seed"] == 1), "test_acc"].item() == 0.845
    assert set(runs["group"]) == set(RUNS_ACC)
    assert all(isinstance(g, str) for g in runs["group"])

    trials = study.trials
    assert len(trials) == len(trial_rows())
    assert trials.loc[trials["trial_id"] == "kd-0", "status"].item() == "completed"

    epochs = study.epochs
    assert not epochs.duplicated(["trial_id", "attempt", "epoch"]).any()
    kd0 = epochs[(epochs["trial_id"] == "kd-0") & (epochs["epoch"] == 2)]
    assert kd0["val_acc"].tolist() == [pytest.approx(0.6)]  # newest timestamp wins
    expected_rows = sum(t["epochs_run"] for t in trial_rows()) + 1  # + kd-1 attempt 1
    assert len(epochs) == expected_rows
    assert study.config["data"] == "synthetic:tiny"
    assert len(study.robustness) == 2 * 3 * 2 * 5


def test_latest_attempt_keeps_highest_attempt(study: analysis.Study) -> None:
    latest = latest_attempt(study.epochs)
    kd1 = latest[latest["trial_id"] == "kd-1"].set_index("epoch")["val_acc"]
    assert kd1.loc[2] == pytest.approx(0.61)
    assert not latest.duplicated(["trial_id", "epoch"]).any()
    assert len(latest) == len(study.epochs) - 1


def test_missing_tables_are_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    empty = load_study(tmp_path / "empty")
    assert empty.runs.empty and empty.epochs.empty and empty.config == {}
    assert "test_acc" in empty.runs.columns


def test_uri_study_dir_reads_the_same(study_dir: Path, study: analysis.Study) -> None:
    via_uri = load_study(study_dir.resolve().as_uri())
    pd.testing.assert_frame_equal(via_uri.runs, study.runs)


def test_corrupt_part_names_the_file(study_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    (copy / "runs" / "group=kd" / "part-002.parquet").write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(ValueError, match=r"group=kd.part-002\.parquet"):
        load_study(copy)


# ---------------------------------------------------------------- stats


def test_holm_hand_computed() -> None:
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([math.nan, 0.5, 0.4]), [math.nan, 0.8, 0.8])
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])


def test_compare_groups_matches_scipy(study: analysis.Study) -> None:
    table = compare_groups(study.runs).set_index("group")
    assert list(table.index) == ["baseline", "kd", "fa", "at", "combined"]
    for group in RUNS_ACC:
        x = expected_acc(group)
        low, high = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
        row = table.loc[group]
        assert row["n"] == 3
        assert row["mean"] == pytest.approx(x.mean())
        assert row["std"] == pytest.approx(x.std(ddof=1))
        assert row["ci_low"] == pytest.approx(low)
        assert row["ci_high"] == pytest.approx(high)
        assert row["paper"] == PAPER_ACC[group]
        assert row["corrupt_acc_mean"] == pytest.approx(x.mean() - 10)
    assert table.loc["kd", "mean"] == pytest.approx((83 + 84.5 + 82) / 3)

    base = RUNS_ACC["baseline"]
    for group in ("kd", "fa", "at", "combined"):
        seeds = [s for s in RUNS_ACC[group] if s in base]
        a = np.array([RUNS_ACC[group][s] for s in seeds]) * 100
        b = np.array([base[s] for s in seeds]) * 100
        assert table.loc[group, "p_vs_baseline"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
        assert table.loc[group, "diff_vs_baseline"] == pytest.approx((a - b).mean())
    kd, at = expected_acc("kd"), expected_acc("at")
    assert table.loc["at", "p_vs_kd"] == pytest.approx(sps.ttest_rel(at, kd).pvalue)
    # combined pairs with baseline on seeds 0 and 1 only
    assert table.loc["combined", "diff_vs_baseline"] == pytest.approx((4 + 2.5) / 2)

    assert math.isnan(table.loc["baseline", "p_vs_baseline"])
    assert math.isnan(table.loc["kd", "p_vs_kd"])
    assert math.isnan(table.loc["kd", "p_vs_kd_holm"])
    # baseline-vs-kd is one test: the same raw and adjusted p in both of its cells
    assert table.loc["baseline", "p_vs_kd"] == table.loc["kd", "p_vs_baseline"]
    assert table.loc["baseline", "p_vs_kd_holm"] == table.loc["kd", "p_vs_baseline_holm"]
    assert table.loc["baseline", "diff_vs_kd"] == -table.loc["kd", "diff_vs_baseline"]
    assert (table["p_vs_baseline_holm"].dropna() >= table["p_vs_baseline"].dropna()).all()
    assert (table["p_vs_baseline_holm"].dropna() > table["p_vs_baseline"].dropna()).any()
    assert "latency_ms_bs1" not in table.columns  # a property of the architecture, not a group


def runs_frame(acc: dict[str, dict[int, float]]) -> pd.DataFrame:
    """A runs table: test accuracy (a fraction) per group and seed."""
    return pd.DataFrame([{"group": g, "seed": s, "test_acc": a}
                         for g, seeds in acc.items() for s, a in seeds.items()])


def test_holm_family_holds_each_paired_test_once_hand_computed() -> None:
    # Paired differences (points) over seeds 0-2: kd - baseline (1, 2, 3), at - baseline
    # (6, 8, 10), at - kd (5, 6, 7). With 3 pairs (df = 2) the two-sided t-test p-value is
    # 1 - |t| / sqrt(2 + t^2), with t = mean / (sd / sqrt(3)):
    #   kd - baseline: t = 2 / (1 / sqrt 3) = 2 sqrt 3, t^2 = 12:  p = 1 - sqrt(12/14)  = 0.0741799
    #   at - baseline: t = 8 / (2 / sqrt 3) = 4 sqrt 3, t^2 = 48:  p = 1 - sqrt(48/50)  = 0.0202041
    #   at - kd:       t = 6 / (1 / sqrt 3) = 6 sqrt 3, t^2 = 108: p = 1 - sqrt(108/110) = 0.0091326
    # Three distinct tests (baseline vs kd once, not twice), m = 3, sorted p times (m - rank):
    #   at - kd 3 x 0.0091326 = 0.0273978; at - baseline 2 x 0.0202041 = 0.0404082;
    #   kd - baseline 1 x 0.0741799 = 0.0741799 (already increasing: no running maximum).
    # Counting baseline vs kd twice (m = 4) would give 0.0365, 0.0606 and 0.1484 instead.
    runs = runs_frame({"baseline": {0: 0.80, 1: 0.81, 2: 0.79},
                       "kd": {0: 0.81, 1: 0.83, 2: 0.82},
                       "at": {0: 0.86, 1: 0.89, 2: 0.89}})
    p_kd, p_at, p_at_kd = 1 - math.sqrt(12 / 14), 1 - math.sqrt(48 / 50), 1 - math.sqrt(108 / 110)
    table = compare_groups(runs).set_index("group")
    assert table.loc["kd", "p_vs_baseline"] == pytest.approx(p_kd, rel=1e-9)
    assert table.loc["at", "p_vs_baseline"] == pytest.approx(p_at, rel=1e-9)
    assert table.loc["at", "p_vs_kd"] == pytest.approx(p_at_kd, rel=1e-9)
    assert table.loc["at", "p_vs_kd_holm"] == pytest.approx(0.0273978, abs=1e-7)
    assert table.loc["at", "p_vs_baseline_holm"] == pytest.approx(0.0404082, abs=1e-7)
    assert table.loc["kd", "p_vs_baseline_holm"] == pytest.approx(0.0741799, abs=1e-7)
    assert table.loc["baseline", "p_vs_kd_holm"] == pytest.approx(0.0741799, abs=1e-7)
    assert table.loc["baseline", "diff_vs_kd"] == pytest.approx(-2.0)
    tests = analysis.stats.paired_tests(runs)
    assert list(zip(tests["group"], tests["reference"], strict=True)) == [
        ("kd", "baseline"), ("at", "baseline"), ("at", "kd")]
    assert tests["pairs"].tolist() == [3, 3, 3] and (tests["no_p"] == "").all()


# Two seeds. kd - baseline: 52.4 - 44.0 and 60.8 - 52.4, both 8.4 points up to rounding (their
# sample std is about 1e-14): zero variance, no p-value. at - baseline (3, 1) and at - kd
# (-5.4, -7.4) have one: with 2 pairs (df = 1) p = 1 - (2/pi) atan(|t|), t = mean / (sd / sqrt 2)
# = (a + b) / |a - b|: at - baseline t = 4 / 2 = 2, p = 1 - (2/pi) atan(2) = 0.2951672;
# at - kd t = -12.8 / 2 = -6.4, p = 1 - (2/pi) atan(6.4) = 0.0986740. Holm over those two
# only (m = 2): at - kd 2 x 0.0986740 = 0.1973480; at - baseline max(0.1973480, 0.2951672).
# `fa` shares one seed with each reference: fewer than 2 pairs, no p-value either.
ZERO_VARIANCE_RUNS = {"baseline": {1: 0.440, 2: 0.524}, "kd": {1: 0.524, 2: 0.608},
                      "at": {1: 0.470, 2: 0.534}, "fa": {1: 0.50, 3: 0.51}}


def test_zero_variance_pair_has_no_p_and_stays_out_of_holm() -> None:
    table = compare_groups(runs_frame(ZERO_VARIANCE_RUNS)).set_index("group")
    assert table.loc["kd", "diff_vs_baseline"] == pytest.approx(8.4)
    for group, ref in (("kd", "baseline"), ("baseline", "kd"), ("fa", "baseline"),
                       ("fa", "kd")):
        assert math.isnan(table.loc[group, f"p_vs_{ref}"]), (group, ref)
        assert math.isnan(table.loc[group, f"p_vs_{ref}_holm"]), (group, ref)
    assert table.loc["at", "p_vs_baseline"] == pytest.approx(1 - 2 / math.pi * math.atan(2))
    assert table.loc["at", "p_vs_kd"] == pytest.approx(1 - 2 / math.pi * math.atan(6.4))
    assert table.loc["at", "p_vs_kd_holm"] == pytest.approx(0.1973480, abs=1e-7)
    assert table.loc["at", "p_vs_baseline_holm"] == pytest.approx(0.2951672, abs=1e-7)
    tests = analysis.stats.paired_tests(runs_frame(ZERO_VARIANCE_RUNS)).set_index(
        ["group", "reference"])
    assert tests.loc[("kd", "baseline"), "no_p"] == "zero variance"
    assert tests.loc[("fa", "baseline"), "no_p"] == "fewer than 2 pairs"
    assert tests.loc[("fa", "baseline"), "pairs"] == 1
    assert tests.loc[("at", "kd"), "no_p"] == ""


def test_zero_variance_tolerance_is_relative_to_the_mean_difference() -> None:
    from analysis.stats import paired

    acc = pd.DataFrame({"ref": [44.0, 52.4, 30.0], "same": [52.4, 60.8, 38.4],
                        "zero": [44.0, 52.4, 30.0], "near": [52.4, 60.81, 38.4],
                        "big": [1e6 + 44.0, 1e6 + 52.4 + 1e-7, 1e6 + 30.0 - 1e-7]}) \
        .mul(1 / 100).mul(100)  # percentages as computed from stored fractions
    # differences of 8.4 computed in floating point: equal up to ~1e-14, so zero variance
    diff, p, pairs, why = paired(acc, "same", "ref")
    assert (diff, pairs, why) == (pytest.approx(8.4), 3, "zero variance") and math.isnan(p)
    assert paired(acc, "zero", "ref")[3] == "zero variance"  # all differences exactly 0
    # differences 1e6 +- 1e-7: a std of 1e-7 is above 1e-9 but far below 1e-9 x 1e6
    assert paired(acc, "big", "ref")[3] == "zero variance"
    # one difference off by 0.01 points (an image in 10,000): a real spread, p defined
    diff, p, pairs, why = paired(acc, "near", "ref")
    assert why == "" and pairs == 3 and 0 < p < 1 and diff == pytest.approx(8.4 + 0.01 / 3)
    diff, p, pairs, why = paired(acc.iloc[:1], "same", "ref")
    assert (diff, pairs, why) == (pytest.approx(8.4), 1, "fewer than 2 pairs") and math.isnan(p)


def test_report_names_the_tests_without_a_p_value(tmp_path: Path) -> None:
    root = tmp_path / "zv"
    root.mkdir()
    (root / "study.json").write_text(json.dumps({"study": "zv", "groups": ["baseline", "kd",
                                                                        "fa", "at"]}))
    write_parts(root, "runs", "part-000.parquet",
                [run_row(g, s, a) for g, seeds in ZERO_VARIANCE_RUNS.items()
                 for s, a in seeds.items()])
    text = write_report(root, tmp_path / "out").read_text()
    section = text.split("## Test accuracy over seeds")[1].split("\n## ")[0]
    assert "over the 2 distinct paired tests of this table that have a p-value" in section
    assert "| kd | 2 | 56.60 | 5.94 |" in section and "| 8.40 | — | — |" in section
    assert ("- `kd` against `baseline` (2 pairs): the paired differences have zero variance "
            "(every shared seed gives +8.40 points)") in section
    assert "- `fa` against `baseline` (1 shared seed): fewer than 2 pairs." in section
    assert "- `fa` against `kd` (1 shared seed): fewer than 2 pairs." in section
    assert "`at` against" not in section  # both of at's tests have a p-value
    assert "with fewer than 2 pairs, or with paired differences of zero variance" in section


def test_teacher_gap_hand_computed(study: analysis.Study) -> None:
    assert study.teacher == TEACHER
    gaps = teacher_gap(compare_groups(study.runs), study.teacher["test_acc"]).set_index("group")
    # baseline 80.0 against the teacher's 90.0: a 10-point gap
    assert gaps.loc["baseline", "gap_to_teacher"] == pytest.approx(10.0)
    assert math.isnan(gaps.loc["baseline", "gap_closed"])  # the reference itself
    # kd: mean (83 + 84.5 + 82) / 3; paired gains over the baseline 3, 3.5, 3
    assert gaps.loc["kd", "gap_to_teacher"] == pytest.approx(90 - 249.5 / 3)
    assert gaps.loc["kd", "gap_closed"] == pytest.approx(9.5 / 3 / 10)
    # combined pairs with the baseline on seeds 0 and 1 only: gains 4 and 2.5
    assert gaps.loc["combined", "gap_closed"] == pytest.approx(0.325)


def test_share_by_weight_and_range_positions_hand_computed() -> None:
    # three `at` trials; w_at 10, 100, 1000 with mean shares 0.01, 0.05 (0.04 and 0.06) and 0.5
    rows = [{"study": "s", "group": "at", "trial_id": t, "attempt": 0, "epoch": e,
             "cfg_w_at": w, "gshare_at": g, "cfg_w_kl": 1.0, "gshare_kl": 0.3,
             "timestamp": float(e)}
            for t, w, shares in (("a", 10.0, [0.01, 0.01]), ("b", 100.0, [0.04, 0.06]),
                                 ("c", 1000.0, [0.5, 0.5]))
            for e, g in enumerate(shares, 1)]
    shares = share_by_weight(pd.DataFrame(rows))
    assert shares["term"].tolist() == ["at"]  # w_kl did not vary: not a row
    row = shares.iloc[0]
    assert (row["trials"], row["weight_min"], row["weight_max"]) == (3, 10.0, 1000.0)
    assert row["share_at_min"] == pytest.approx(0.01)
    assert row["share_at_max"] == pytest.approx(0.5)
    assert row["share_median"] == pytest.approx(0.05)
    assert row["spearman"] == pytest.approx(1.0)

    trials = pd.DataFrame({"group": ["at"] * 3, "cfg_w_at": [10.0, 100.0, 1000.0],
                           "cfg_T": [4.0, 4.0, 4.0]})
    best = pd.DataFrame([{"group": "at", "cfg_w_at": 1000.0, "cfg_T": 4.0}])
    space = {"w_at": {"low": 10.0, "high": 10000.0, "log": True},
             "T": {"low": 1.0, "high": 16.0, "log": True}}
    positions = range_positions(best, trials, space)
    assert positions["param"].tolist() == ["w_at"]  # T did not vary in `at`
    assert positions["position"].iloc[0] == pytest.approx(2 / 3)  # log10: (3 - 1) / (4 - 1)
    assert positions["edge"].iloc[0] == ""
    best_at_edge = best.assign(cfg_w_at=9000.0)
    assert range_positions(best_at_edge, trials, space)["edge"].iloc[0] == "high"


def test_compare_groups_empty() -> None:
    assert compare_groups(pd.DataFrame()).empty


def test_best_configs_uses_full_budget_validation(study: analysis.Study) -> None:
    best = best_configs(study.trials).set_index("group")
    assert list(best.index) == ["baseline", "kd", "fa", "at", "combined"]
    assert best.loc["kd", "trial_id"] == "kd-3"  # not kd-6 (0.99 after 2 epochs)
    assert best.loc["kd", "best_val_acc"] == pytest.approx(0.90)
    assert best.loc["kd", "cfg_T"] == pytest.approx(12.0)
    assert best.loc["fa", "trial_id"] == "fa-2"


def test_best_configs_uses_the_study_budget_not_a_group_maximum() -> None:
    trials = pd.DataFrame([
        {"group": "kd", "trial_id": "k0", "status": "completed", "epochs_run": 4,
         "best_val_acc": 0.7},
        {"group": "at", "trial_id": "a0", "status": "asha_stopped", "epochs_run": 2,
         "best_val_acc": 0.9},
        {"group": "at", "trial_id": "a1", "status": "early_stopped", "epochs_run": 3,
         "best_val_acc": 0.6},
        {"group": "fa", "trial_id": "f0", "status": "asha_stopped", "epochs_run": 2,
         "best_val_acc": 0.8},
    ])
    # at: its early-stopped trial had the full budget; the ASHA-stopped one (higher) did not
    assert best_configs(trials, 4)["trial_id"].tolist() == ["k0", "a1"]
    assert best_configs(trials)["trial_id"].tolist() == ["k0", "a1"]  # budget: longest = 4
    assert best_configs(trials, 5)["trial_id"].tolist() == ["a1"]
    assert best_configs(trials, 4)["epochs_run"].dtype == trials["epochs_run"].dtype


HONEST_TRIALS = [  # (group, trial_id, status, epochs_run, best_val_acc, error, timestamp)
    ("kd", "kd-0", "completed", MAX_EPOCHS, 0.70, None, 1.0),
    ("kd", "kd-1", "asha_stopped", 1, 0.95, None, 2.0),
    ("at", "at-0", "asha_stopped", 1, 0.60, None, 1.0),
    ("at", "at-1", "asha_stopped", 2, 0.65, None, 2.0),
    ("at", "at-2", "asha_stopped", 2, 0.62, None, 3.0),
    ("fa", "fa-0", "failed", 0, math.nan, "RuntimeError: CUDA out of memory", 9.0),
    ("fa", "fa-1", "diverged", 2, math.nan, "non-finite loss | at epoch 2", 5.0),
]


def test_report_marks_groups_without_full_budget_and_keeps_failed_ones(tmp_path: Path) -> None:
    """No `at` trial reached the budget: its row says so. Every `fa` trial failed or
    diverged: it stays in every table with its counts and first error. `baseline` never
    ran a trial: it is listed too."""
    root = tmp_path / "honest"
    root.mkdir()
    groups = ["baseline", "kd", "at", "fa"]
    (root / "study.json").write_text(json.dumps(
        {"study": "h", "groups": groups, "max_epochs": MAX_EPOCHS, "space": SPACE}))
    trials = [{"study": "h", "group": g, "trial_id": t, "status": st, "epochs_run": e,
               "best_val_acc": acc, "best_epoch": e, "seed": 0, "error": err,
               "timestamp": ts, **cfg(g)} for g, t, st, e, acc, err, ts in HONEST_TRIALS]
    write_parts(root, "trials", "part-000.parquet", trials)
    write_parts(root, "runs", "part-000.parquet",
                [run_row(g, s, 0.8) for g in ("baseline", "kd") for s in (0, 1)])
    study = load_study(root)
    outcomes = group_outcomes(study.trials, MAX_EPOCHS, groups).set_index("group")
    assert outcomes["basis"].to_dict() == {"baseline": "NO USABLE TRIAL", "kd": "full budget",
                                           "at": "LONGEST ONLY", "fa": "NO USABLE TRIAL"}
    assert outcomes.loc["kd", "trial_id"] == "kd-0"  # not kd-1 (0.95 after 1 epoch)
    assert outcomes.loc["at", "trial_id"] == "at-1" and outcomes.loc["at", "epochs_run"] == 2
    assert outcomes.loc["fa", ["trials", "failed", "diverged"]].tolist() == [2, 1, 1]
    assert outcomes.loc["fa", "first_error"] == "non-finite loss | at epoch 2"  # earliest
    assert best_configs(study.trials, MAX_EPOCHS)["group"].tolist() == ["kd"]

    text = write_report(root).read_text()
    best = text.split("## Best configuration per group")[1].split("\n## ")[0]
    assert "full budget of 4 epochs" in best and "group's full epoch budget" not in text
    # item 9: an early-stopped trial is a full-budget trial, and the text says why
    assert ("those that ran the study's full budget of 4 epochs (`max_epochs`) or stopped on "
            "their own validation-loss patience (`early_stopped`)") in best
    assert "| at | LONGEST ONLY | at-1 | asha_stopped | 65.00 |" in best
    assert "- `at`: no trial ran the study's full budget of 4 epochs" in best
    assert "| fa | NO USABLE TRIAL | — |" in best
    assert "- `fa`: no usable trial (2 trials, 1 failed, 1 diverged); first error: " \
           "non-finite loss / at epoch 2" in best
    assert "| baseline | NO USABLE TRIAL |" in best
    status = text.split("## Trial status (ASHA)")[1].split("\n## ")[0]
    # columns: completed, asha_stopped, failed, diverged, total, first_error
    assert "| fa | 0 | 0 | 1 | 1 | 2 | non-finite loss / at epoch 2 |" in status
    assert "| baseline | 0 | 0 | 0 | 0 | 0 | — |" in status
    comparison = text.split("## Test accuracy over seeds")[1].split("\n## ")[0]
    for group in ("at", "fa"):
        assert f"| {group} | 0 | — |" in comparison
    importance = text.split("## Hyperparameter importance")[1].split("\n## ")[0]
    assert "`fa`" in importance and "`at`" in importance


def test_health_check_flags_only_planted_term(study: analysis.Study) -> None:
    health = health_check(study.epochs)
    flagged = health[health["flagged"]]
    assert list(zip(flagged["group"], flagged["term"], strict=True)) == [("at", "at")]
    terms = health.groupby("group")["term"].apply(set).to_dict()
    assert terms == {g: set(t) for g, t in ACTIVE.items()}
    kd_kl = health[(health["group"] == "kd") & (health["term"] == "kl")]
    assert kd_kl["mean_share"].item() == pytest.approx(0.3)


# ---------------------------------------------------------------- importance


def test_param_importance(study: analysis.Study) -> None:
    found = param_importance(study.trials, SPACE, seed=0)
    kd = found[found["group"] == "kd"].set_index("param")["importance"]
    assert set(kd.index) == {"T", "w_ce", "w_kl"}
    assert kd.sum() == pytest.approx(1.0, abs=1e-6)
    assert kd.idxmax() == "T"
    assert "baseline" not in set(found["group"])  # 2 trials only
    again = param_importance(study.trials, SPACE, seed=0)
    pd.testing.assert_frame_equal(found, again)


def test_param_importance_skips_small_groups() -> None:
    few = pd.DataFrame([{"group": "kd", "status": "completed", "best_val_acc": 0.5,
                         "cfg_T": float(t)} for t in (1, 2)])
    assert param_importance(few, SPACE).empty


# ---------------------------------------------------------------- plots and report


def assert_png(path: Path | None) -> None:
    assert path is not None and path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000


def test_plots_write_pngs(study: analysis.Study, tmp_path: Path) -> None:
    assert_png(plot_learning_curves(study.epochs, tmp_path / "curves.png"))
    assert_png(plot_asha(study.epochs, study.trials, tmp_path / "asha.png"))
    assert_png(plot_robustness(study.robustness, tmp_path / "robustness.png"))
    assert_png(plot_test_accuracy(compare_groups(study.runs), tmp_path / "test.png"))


def test_plots_skip_empty_inputs(tmp_path: Path) -> None:
    empty = pd.DataFrame()
    assert plot_learning_curves(empty, tmp_path / "a.png") is None
    assert plot_asha(empty, empty, tmp_path / "b.png") is None
    assert plot_robustness(empty, tmp_path / "c.png") is None
    assert plot_test_accuracy(compare_groups(empty), tmp_path / "d.png") is None
    assert list(tmp_path.iterdir()) == []


def test_report_contents(report: Path, study: analysis.Study) -> None:
    assert report == report.parent / "report.md" and report.parent.name == "report"
    text = report.read_text()
    for name in ("test_accuracy", "learning_curves", "asha", "robustness"):
        assert f"({name}.png)" in text
        assert_png(report.parent / f"{name}.png")
    assert "synthetic:tiny" in text
    kd_mean = expected_acc("kd").mean()
    assert f"| kd | 3 | {kd_mean:.2f} |" in text
    p = compare_groups(study.runs).set_index("group").loc["kd", "p_vs_baseline"]
    assert f"| {p:#.3g} |" in text
    assert "FLAGGED: term `at` in group `at`" in text
    assert text.count("FLAGGED") == 2  # the table cell and the explicit line
    assert "| kd | 4 | 2 | 1 | 1 | 8 |" in text  # completed, asha, early, failed, total
    assert "kd-3" in text and "kd-6" not in text.split("## Best configuration")[1][:2000]
    assert not list(report.parent.glob(".*tmp"))
    ranges = text.split("## Search ranges")[1].split("\n## ")[0]
    assert "| kd | T | 12 | 1 | 16 | 0.90 |  |" in ranges  # log 12 / log 16 = 0.896
    teacher = text.split("## Teacher and students")[1].split("\n## ")[0]
    assert "**90.00%** test accuracy" in teacher and "1500000 parameters" in teacher
    assert "teacher - baseline = **10.00 points**" in teacher
    assert re.search(r"^\| kd \| 3 \| 83\.17 \|.*\| 3\.17 \| 6\.83 \| 0\.32 \|$", teacher, re.M)


def test_report_without_speed_json_does_not_compare_latency(report: Path) -> None:
    text = report.read_text()
    comparison = text.split("## Test accuracy over seeds")[1].split("\n## ")[0]
    assert "latency" not in comparison
    speed = text.split("## Size and speed (per architecture)")[1].split("\n## ")[0]
    assert "This study has no `speed.json`" in speed
    assert "latency was measured per run under concurrent load" in speed
    assert "not comparable between groups" in speed
    # run_row: latency 2.0 + seed over the 15 runs of seeds 0-3
    assert "15 runs: 2.000 to 5.000 ms per image at batch 1" in speed
    assert "| teacher | resnet50 width 0.25, cifar stem, without CBAM | 1500000 |" in speed
    teacher = text.split("## Teacher and students")[1].split("\n## ")[0]
    assert "ms per image" not in teacher  # measured on its own: not set against the students


SPEED = {
    "study": "s", "device": "cpu", "device_name": "Test CPU", "precision": "bf16",
    "torch_threads": 2, "rounds": 7, "repeats_bs1": 5, "large_batch": 256,
    "repeats_large": 1, "warmup": 2, "image_shape": [3, 32, 32],
    "models": {
        "student": {"arch": "resnet18 width 0.25, cifar stem, without CBAM", "params": 701466,
                    "groups": ["baseline", "kd"],
                    "latency_ms_bs1": {"median": 1.5, "q1": 1.25, "q3": 2.0},
                    "images_per_s": {"median": 5000.25, "q1": 4800.0, "q3": 5100.0}},
        "teacher": {"arch": "resnet50 width 0.25, cifar stem, without CBAM", "params": 1484186,
                    "latency_ms_bs1": {"median": 4.0, "q1": 3.75, "q3": 4.5},
                    "images_per_s": {"median": 1300.0, "q1": 1250.0, "q3": 1320.0}},
    },
}


def test_report_speed_section_reads_speed_json(study_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "with-speed"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("report"))
    (copy / "speed.json").write_text(json.dumps(SPEED))
    text = write_report(copy, tmp_path / "out").read_text()
    speed = text.split("## Size and speed (per architecture)")[1].split("\n## ")[0]
    assert ("| role | architecture | params | latency_ms_bs1 | latency_iqr | "
            "images_per_s_bs256 | images_per_s_iqr |") in speed
    assert ("| student | resnet18 width 0.25, cifar stem, without CBAM | 701466 | 1.500 | "
            "1.250–2.000 | 5000 | 4800–5100 |") in speed
    assert ("| teacher | resnet50 width 0.25, cifar stem, without CBAM | 1484186 | 4.000 | "
            "3.750–4.500 | 1300 | 1250–1320 |") in speed
    assert "on `cpu` (Test CPU), precision bf16, 2 torch threads" in speed
    assert "then 7 rounds" in speed and "5 forwards at batch 1" in speed
    assert "Every group (`baseline`, `kd`) trains this student" in speed
    assert "not comparable" not in speed


def test_report_without_runs(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    root.mkdir()
    trials = [{**t, "study": "s"} for t in trial_rows() if t["group"] == "kd"]
    write_parts(root, "trials", "part-000.parquet", trials)
    text = write_report(root, tmp_path / "out").read_text()
    assert "No reproduced runs" in text
    assert "test_accuracy.png" not in text
    assert json.loads(export_comparison(root, "json")) == []


def test_export_round_trips(study_dir: Path, study: analysis.Study) -> None:
    expected = compare_groups(study.runs, paper=None)  # synthetic data: no paper column
    assert "paper" not in expected
    from_csv = pd.read_csv(io.StringIO(export_comparison(study_dir, "csv")))
    pd.testing.assert_frame_equal(from_csv, expected, check_dtype=False)
    from_json = pd.read_json(io.StringIO(export_comparison(study_dir, "json")), orient="records")
    pd.testing.assert_frame_equal(from_json, expected, check_dtype=False)
    with pytest.raises(ValueError):
        export_comparison(study_dir, "xml")


def test_analysis_imports_no_training_stack() -> None:
    code = ("import sys, analysis; bad = {'torch', 'ray', 'kdcore', 'search'} & "
            "{m.split('.')[0] for m in sys.modules}; sys.exit(sorted(bad) or 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the paper's column


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


@pytest.mark.parametrize(("config", "expected"), [
    ({"data_classes": CIFAR10_NAMES, "data": "synthetic:tiny"}, True),  # the classes decide
    ({"data_classes": CIFAR10_NAMES[:9], "data": "cifar10"}, False),
    ({"data_classes": [f"fine{i}" for i in range(100)], "data": "cifar10"}, False),
    ({"data_classes": CIFAR10_NAMES[::-1]}, False),
    ({"data": "cifar10"}, True),
    ({"data": "cifar10:/data/anything"}, True),
    ({"data": "cifar100"}, False),
    ({"data": "cifar100:/data/cifar10"}, False),
    ({"data": "imagefolder:../shared/data/cifar10-jpeg"}, True),  # results/laptop
    ({"data": "imagefolder:/d/CIFAR-10/"}, True),
    ({"data": "jpegpack:/packs/cifar10.jpegpack"}, True),
    ({"data": "imagefolder:/d/cifar100-jpeg"}, False),
    ({"data": "imagefolder:/d/cifar-100"}, False),
    ({"data": "imagefolder:/cifar10/other"}, False),  # only the path's own name counts
    ({"data_spec": "synthetic:4", "data": "cifar10"}, False),  # data_spec first
    ({"data_spec": "cifar10", "data": "synthetic:4"}, True),
    ({"data": "synthetic:tiny"}, False),
    ({}, False),
])
def test_is_cifar10_rule(config: dict, expected: bool) -> None:
    from analysis.constants import is_cifar10, paper_numbers

    assert is_cifar10(config) is expected
    assert paper_numbers(config) == (PAPER_ACC if expected else None)


def test_cifar10_class_names_are_kdcores() -> None:
    from analysis.constants import CIFAR10_CLASSES
    from kdcore.data import CIFAR10_CLASSES as KDCORE_CLASSES

    assert CIFAR10_CLASSES == KDCORE_CLASSES == tuple(CIFAR10_NAMES)


def test_compare_groups_without_paper_has_no_paper_column(study: analysis.Study) -> None:
    with_paper = compare_groups(study.runs)
    without = compare_groups(study.runs, paper=None)
    assert list(without.columns) == [c for c in with_paper.columns if c != "paper"]
    pd.testing.assert_frame_equal(without, with_paper.drop(columns="paper"))
    assert "paper" not in compare_groups(pd.DataFrame(), paper=None).columns


def legend_labels(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The legend labels of every figure saved from now on."""
    import analysis.plots as plots

    seen: list[list[str]] = []
    original = plots.save

    def recording(fig, path):
        seen.append([text for ax in fig.axes for text in ax.get_legend_handles_labels()[1]])
        return original(fig, path)

    monkeypatch.setattr(plots, "save", recording)
    return seen


@pytest.mark.parametrize("cifar10", [False, True])
def test_paper_numbers_only_for_cifar10(study_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, cifar10: bool) -> None:
    import shutil

    copy = tmp_path / "study"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("report"))
    config = json.loads((copy / "study.json").read_text())  # data: synthetic:tiny
    config["data_classes"] = CIFAR10_NAMES if cifar10 else ["a", "b"]
    (copy / "study.json").write_text(json.dumps(config))
    labels = legend_labels(monkeypatch)
    text = write_report(copy, tmp_path / "out").read_text()
    comparison = text.split("## Test accuracy over seeds")[1].split("\n## ")[0]
    header = next(line for line in comparison.splitlines() if line.startswith("| group"))
    assert header.endswith("| params | paper |" if cifar10 else "| params |")
    assert ("`paper` is the paper's reported" in text) is cifar10
    assert ("80.56" in text) is cifar10 and ("paper" in comparison) is cifar10
    assert ("paper (best validation)" in labels[0]) is cifar10  # the test-accuracy figure
    exported = json.loads(export_comparison(copy, "json"))
    assert all(("paper" in row) is cifar10 for row in exported) and len(exported) == 5
    if cifar10:
        assert exported[0]["paper"] == PAPER_ACC["baseline"]


# ---------------------------------------------------------------- one study against another
# (analysis.versus, kdsearch analyze --versus): Welch's test by hand, Holm over groups, and
# the verdicts on each study's paired tests.


def test_compare_studies_is_welchs_test_by_hand_with_holm_over_groups() -> None:
    # kd: reference 50, 52, 54 (mean 52, variance 4); this 55, 56, 57, 58 (mean 56.5,
    # variance 5/3). se^2 = 4/3 + (5/3)/4 = 21/12; Welch-Satterthwaite
    # df = se^4 / ((4/3)^2 / 2 + (5/12)^2 / 3) = 3.0625 / 0.9467593 = 3.23472.
    # at: the same three values in both (diff 0, t 0, p 1). Holm over the two p-values:
    # kd 2 x p, at max(2 p, 1) = 1. baseline: zero variance on both sides (no p, not in the
    # family); fa: runs in one study only (no row).
    reference = runs_frame({"kd": {1: 0.50, 2: 0.52, 3: 0.54}, "at": {1: 0.60, 2: 0.61, 3: 0.62},
                            "baseline": {1: 0.45, 2: 0.45}, "fa": {1: 0.5, 2: 0.6}})
    this = runs_frame({"kd": {1: 0.55, 2: 0.56, 3: 0.57, 4: 0.58},
                       "at": {1: 0.60, 2: 0.61, 3: 0.62}, "baseline": {1: 0.47, 2: 0.47}})
    se, df = math.sqrt(21 / 12), 1.75 ** 2 / ((4 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3)
    assert df == pytest.approx(3.23472, abs=1e-5)
    p = 2 * sps.t.sf(4.5 / se, df)
    half = sps.t.ppf(0.975, df) * se

    table = compare_studies(reference, this).set_index("group")
    assert list(table.index) == ["baseline", "kd", "at"]
    kd = table.loc["kd"]
    assert (kd["n_ref"], kd["n"]) == (3, 4)
    assert kd["mean_ref"] == pytest.approx(52) and kd["mean"] == pytest.approx(56.5)
    assert kd["ci_low_ref"] == pytest.approx(52 - sps.t.ppf(0.975, 2) * 2 / math.sqrt(3))
    assert kd["diff"] == pytest.approx(4.5)
    assert kd["diff_ci_low"] == pytest.approx(4.5 - half, rel=1e-9)
    assert kd["diff_ci_high"] == pytest.approx(4.5 + half, rel=1e-9)
    assert kd["p_welch"] == pytest.approx(p, rel=1e-9)
    assert kd["p_welch_holm"] == pytest.approx(2 * p, rel=1e-9)
    assert table.loc["at", "diff"] == pytest.approx(0, abs=1e-12)
    assert table.loc["at", "p_welch_holm"] == pytest.approx(1.0)
    base = table.loc["baseline"]
    assert base["diff"] == pytest.approx(2.0)
    assert np.isnan([base["diff_ci_low"], base["p_welch"], base["p_welch_holm"]]).all()


@pytest.mark.parametrize(("diff_ref", "p_ref", "diff", "p", "expected"), [
    (4.8, 0.01, 3.0, 0.03, REPLICATED), (4.8, 0.01, -3.0, 0.03, REVERSED),
    (4.8, 0.01, 3.0, 0.20, NOT_REPLICATED), (1.2, 0.60, 3.0, 0.01, NEW),
    (1.2, 0.60, 3.0, 0.06, NEITHER), (1.2, math.nan, 3.0, 0.01, UNDEFINED),
    (4.8, 0.049, 3.0, 0.05, NOT_REPLICATED),  # p < alpha is significant, p = alpha is not
])
def test_verdict(diff_ref: float, p_ref: float, diff: float, p: float, expected: str) -> None:
    assert verdict(diff_ref, p_ref, diff, p) == expected


def test_replication_puts_each_studys_holm_adjusted_tests_side_by_side() -> None:
    # Reference (the hand-computed study of test_analysis): paired differences over seeds 0-2
    # kd - baseline (1, 2, 3) Holm p 0.0741799; at - baseline (6, 8, 10) 0.0404082;
    # at - kd (5, 6, 7) 0.0273978. This study: kd - baseline (1, 2, 3) again; at - kd
    # (-5, -6, -7): raw p 0.0091326 as before; at - baseline (-4, -4, -4) has zero variance,
    # so no p, and the family is two tests: at - kd 2 x 0.0091326 = 0.0182652,
    # kd - baseline max(0.0182652, 0.0741799).
    reference = runs_frame({"baseline": {0: 0.80, 1: 0.81, 2: 0.79},
                            "kd": {0: 0.81, 1: 0.83, 2: 0.82}, "at": {0: 0.86, 1: 0.89, 2: 0.89}})
    this = runs_frame({"baseline": {0: 0.80, 1: 0.81, 2: 0.79},
                       "kd": {0: 0.81, 1: 0.83, 2: 0.82}, "at": {0: 0.76, 1: 0.77, 2: 0.75}})
    table = replication(reference, this).set_index(["group", "reference"])
    assert table.loc[("kd", "baseline"), "verdict"] == NEITHER
    assert table.loc[("kd", "baseline"), "p_holm"] == pytest.approx(0.0741799, abs=1e-7)
    assert table.loc[("at", "kd"), "diff_ref"] == pytest.approx(6.0)
    assert table.loc[("at", "kd"), "diff"] == pytest.approx(-6.0)
    assert table.loc[("at", "kd"), "p_holm_ref"] == pytest.approx(0.0273978, abs=1e-7)
    assert table.loc[("at", "kd"), "p_holm"] == pytest.approx(0.0182652, abs=1e-7)
    assert table.loc[("at", "kd"), "verdict"] == REVERSED
    assert table.loc[("at", "baseline"), "p_holm_ref"] == pytest.approx(0.0404082, abs=1e-7)
    assert math.isnan(table.loc[("at", "baseline"), "p_holm"])
    assert table.loc[("at", "baseline"), "verdict"] == UNDEFINED
