"""reproduce, analyze and run: selection by validation only, resumable stages, the smoke preset."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from helpers import run

from search.engine.reproduce import planned_runs
from search.store.sink import ParquetSink, part_files, read_table
from search.study import load_study_config

REPO = Path(__file__).resolve().parents[1]


def _trial(trial_id, group, acc, epochs_run, **cfg):
    row = {"study": "s", "trial_id": trial_id, "status": "completed", "epochs_run": epochs_run,
           "best_val_acc": acc, "best_epoch": epochs_run, "wall_seconds": 1.0, "seed": 0,
           "error": "", "timestamp": time.time()}
    row.update({f"cfg_{k}": v for k, v in
                {"T": 4.0, "w_ce": 1.0, "w_kl": 0.0, "w_at": 0.0, "w_fa": 0.0, "mask_pct": 0.0,
                 **cfg}.items()})
    return row


def test_planned_runs_take_best_full_budget_trial_and_skip_finished(tmp_path):
    config = load_study_config(overrides={"study": "s", "storage": str(tmp_path), "max_epochs": 4,
                                          "grace_period": 1, "seeds": 3,
                                          "groups": ["baseline", "kd"]})
    sink = ParquetSink(config.study_dir)
    sink.append("trials", "kd", [
        _trial("a", "kd", 0.70, 4, T=2.0, w_ce=0.5, w_kl=1.5),
        _trial("b", "kd", 0.95, 2, T=8.0, w_ce=0.2, w_kl=0.3),  # better, but stopped at epoch 2
        _trial("c", "kd", 0.60, 4, T=3.0, w_ce=0.9, w_kl=0.2),
    ])
    sink.append("runs", "kd", [{"study": "s", "group": "kd", "seed": 2, "test_acc": 0.5,
                                "timestamp": time.time()}])
    runs = planned_runs(config, ("baseline", "kd"))
    kd = [r for r in runs if r["group"] == "kd"]
    assert {r["seed"] for r in kd} == {1, 3}  # seed 2 already done
    assert all(r["source_trial_id"] == "a" and r["T"] == 2.0 and r["w_kl"] == 1.5 for r in kd)
    base = [r for r in runs if r["group"] == "baseline"]
    assert [r["seed"] for r in base] == [1, 2, 3] and "T" not in base[0]


def test_planned_runs_refuse_a_group_without_trials(tmp_path):
    config = load_study_config(overrides={"study": "s", "storage": str(tmp_path),
                                          "groups": ["at"]})
    with pytest.raises(ValueError, match="no finished full-budget trial of 'at'"):
        planned_runs(config, ("at",))


def _kdsearch(*args, env=None, timeout=900):
    """``kdsearch ARGS`` as a subprocess; when it ends or times out, nothing it started (its
    private Ray, Ray's workers) is left running (``helpers.run``)."""
    return run([sys.executable, "-m", "search.commands.cli", *args], timeout, cwd=REPO,
               env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["tune", "--study", "../x", "--data", "synthetic:4"], "study"),
    (["tune", "--study", "/abs", "--data", "synthetic:4"], "study"),
    (["tune", "--study", "s", "--epochs", "0", "--data", "synthetic:4"], "max_epochs"),
    (["analyze", "--study", "missing"], "no study.json"),
    (["train", "--group", "kd", "--set", "T=-1", "--data", "synthetic:4"], "T:"),
    (["train", "--group", "kd", "--set", "w_kl=nan", "--data", "synthetic:4"], "w_kl"),
    (["train", "--group", "baseline", "--data", "imagefolder:/nonexistent"], "does not exist"),
    (["tune", "--preset", "smoke", "--study", "s", "--data", "synthetic:40",
      "--address", "127.0.0.9:1"], "address"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = _kdsearch(*args, "--storage", str(tmp_path / "store"), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))


@pytest.mark.slow
def test_smoke_preset_end_to_end_and_rerun_redoes_nothing(tmp_path, shared_data_dir):
    """`kdsearch run --preset smoke` on the real data: all stages, five groups in the report."""
    data = f"imagefolder:{shared_data_dir}"
    storage = str(tmp_path / "results")
    t0 = time.monotonic()
    proc = _kdsearch("run", "--preset", "smoke", "--data", data, "--storage", storage,
                     timeout=1500)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout + proc.stderr  # workers Ray stops normally print no trace
    assert "Traceback" not in console and "SystemExit" not in console, console[-3000:]
    report = Path(storage) / "smoke" / "report" / "report.md"
    assert f"report: {report}" in proc.stdout
    text = report.read_text()
    table = text.split("## Test accuracy over seeds")[1].split("##")[0]
    for group in ("baseline", "kd", "fa", "at", "combined"):
        assert re.search(rf"^\| {group} \| 2 \|", table, re.M), (group, table)
    runs = read_table(str(Path(storage) / "smoke"), "runs")
    assert sorted(set(runs["group"])) == ["at", "baseline", "combined", "fa", "kd"]
    assert len(runs) == 10 and runs["test_acc"].between(0, 1).all()
    print(f"smoke preset wall time: {wall:.0f}s")
    check_teacher_measured(storage, text)

    # A second `run` finds every stage finished: no new trial, epoch or run rows.
    before = {t: len(part_files(str(Path(storage) / "smoke"), t)[2])
              for t in ("epochs", "trials", "runs")}
    again = _kdsearch("run", "--preset", "smoke", "--data", data, "--storage", storage,
                      timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {t: len(part_files(str(Path(storage) / "smoke"), t)[2])
             for t in ("epochs", "trials", "runs")}
    assert after == before


def check_teacher_measured(storage: str, report_text: str) -> None:
    """reproduce measured the study's teacher on the test set (``teacher.json``), the report
    shows it, and a damaged ``teacher.json`` is measured again by the next ``reproduce``."""
    from kdcore.evaluate import accuracy
    from search.engine.teacher_task import load_cached
    from search.engine.trainable import frozen_teacher
    from search.study import config_from_study_json, read_study_json

    study_dir = Path(storage) / "smoke"
    measured = json.loads((study_dir / "teacher.json").read_text())
    stored = read_study_json(storage, "smoke")
    assert measured["hash"] == stored["teacher_hash"]
    config = config_from_study_json(stored, {"storage": storage})
    data = config.load_data()
    state, _ = load_cached(config, data)
    teacher = frozen_teacher(config, state, data.num_classes)
    _, acc = accuracy(teacher, data.test_x, data.test_y, data.mean, data.std,
                      precision=config.precision)
    assert measured["test_acc"] == pytest.approx(acc, abs=1e-9)
    assert len(data.test_y) == 500 and f"**{acc * 100:.2f}%** test accuracy" in report_text

    runs_before = len(read_table(str(study_dir), "runs"))
    (study_dir / "teacher.json").write_text('{"hash": ')
    again = _kdsearch("reproduce", "--study", "smoke", "--storage", storage, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher test_acc" in again.stdout
    again_measured = json.loads((study_dir / "teacher.json").read_text())
    for key in ("hash", "test_acc", "test_loss", "params"):  # latency is timed again
        assert again_measured[key] == measured[key], key
    assert len(read_table(str(study_dir), "runs")) == runs_before


def test_train_command_checkpoints_and_resumes(tmp_path):
    base = ["train", "--group", "kd", "--data", "synthetic:8", "--val-size", "20",
            "--teacher-epochs", "1", "--storage", str(tmp_path), "--study", "t",
            "--set", "student_width=0.125", "--set", "teacher_width=0.125",
            "--set", "batch_size=16"]
    first = _kdsearch(*base, "--set", "epochs=2", timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert re.findall(r"^kd epoch +(\d+)", first.stdout, re.M) == ["1", "2"]
    out = tmp_path / "t" / "train" / "kd-seed0"
    assert (out / "checkpoint.pt").is_file()
    assert list((tmp_path / "teachers").glob("teacher-*.pt"))
    resumed = _kdsearch(*base, "--set", "epochs=3", "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.findall(r"^kd epoch +(\d+)", resumed.stdout, re.M) == ["3"]
    assert '"epochs_run": 3' in (out / "summary.json").read_text()
