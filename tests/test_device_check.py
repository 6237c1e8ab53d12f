"""The GPU device check: its dry run without Ray/Optuna, its deadlines, the mini-study's plan."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from helpers import REPO, kill_tree

from search.bench.plan import Sizes, bench_rates, makespan, plan_study


def _load_device_check():
    """``bench/device_check.py`` as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("device_check", REPO / "bench/device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_ray_no_optuna(tmp_path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import ray``/``import optuna`` fail as on
    the device image (where neither is installed): packages whose ``__init__`` raises
    ImportError, which ``pytest.importorskip`` does not turn into a skip either."""
    blocker = tmp_path / "blocker"
    for name in ("ray", "optuna"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(
            f"raise ImportError({name + ' is not installed on the device image'!r})\n")
    return blocker


@pytest.fixture
def leaders():
    """Process-group leaders a test starts; killed (with descendants) when it ends."""
    started: list[int] = []
    yield started
    kill_tree(started)


@pytest.mark.slow
def test_dry_run_without_ray_or_optuna_writes_every_result(tmp_path, no_ray_no_optuna, leaders):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDSEARCH_", "RAY_"))}
    env.update(PY=sys.executable, OUT=str(out), PYTHONPATH=str(no_ray_no_optuna))
    proc = subprocess.Popen(["bash", "bench/device_check.sh", "--dry-run", "--work", str(work)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    leaders.append(proc.pid)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log.decode()[-3000:]

    assert sorted(p.name for p in out.iterdir()) == sorted([
        "device_check.log", "summary.json", "cuda-tests.txt", "bench.jsonl", "ministudy.log",
        "ministudy-runs.csv", "ministudy-report.md", "ministudy.tar.gz"])  # 8: all come back
    text = (out / "device_check.log").read_text()
    assert "ray absent" in text and "optuna absent" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and summary["dry_run"] is True
    assert {s["stage"] for s in summary["stages"]} == {
        "device", "cuda-tests", "bench", "bench-k", "bench-compile", "ministudy", "report"}
    tests = (out / "cuda-tests.txt").read_text()
    assert "error" not in tests.lower() and "passed" not in tests  # collected, all skipped
    assert tests.count("no CUDA device") >= 4
    stage = next(s for s in summary["stages"] if s["stage"] == "cuda-tests")
    assert "tests/test_gpu_path.py" in stage["argv"] and "tests" not in stage["argv"]
    assert not {"tests/test_search.py", "tests/test_cluster_search.py"} & set(stage["argv"])

    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    single = {(r["group"], r["feed"]) for r in rows
              if r["stage"] == "bench" and r["student"] == "resnet18"}
    assert single == {(g, f) for g in ("baseline", "kd", "fa", "at", "combined")
                      for f in ("device", "dataloader")}
    assert [r["concurrent"] for r in rows if r["stage"] == "bench-k"] == [2]
    assert [r["compile"] for r in rows if r["stage"] == "bench-compile"] == [True]
    assert any(r["student"] == "resnet50" and r.get("role") == "teacher-rate" for r in rows)
    assert all(r["images_per_s"] > 0 for r in rows)

    plan = json.loads((out / "ministudy.log").read_text().split("plan: ", 1)[1].splitlines()[0])
    assert plan["epochs"] == 1 and plan["k"] in (1, 2)
    with tarfile.open(out / "ministudy.tar.gz") as tar:
        tar.extractall(tmp_path / "study", filter="data")
    from search.store.sink import read_table

    study = tmp_path / "study" / "ministudy"
    runs = read_table(str(study), "runs")
    assert sorted(zip(runs.group, runs.seed, strict=True)) == sorted(
        (g, s) for g in ("baseline", "kd", "fa", "at", "combined") for s in (1, 2))
    assert runs.test_acc.between(0, 1).all() and (runs.epochs_run == 1).all()
    assert (runs.source_trial_id == "defaults").all()
    assert len(read_table(str(study), "robustness")) == 10 * 35  # 7 corruptions x 5 severities
    epochs = read_table(str(study), "epochs")  # fit's per-epoch metrics, one row per run here
    assert sorted(epochs.trial_id) == sorted(f"{g}-seed{s}" for g, s in zip(
        runs.group, runs.seed, strict=True))
    kd = epochs[epochs.group == "kd"]
    assert (kd.gshare_ce + kd.gshare_kl).round(6).eq(1).all() and kd.gshare_at.isna().all()
    assert json.loads((study / "study.json").read_text())["max_concurrent"] == plan["k"]
    report = (out / "ministudy-report.md").read_text()
    assert "## Test accuracy over seeds" in report and "| combined | 2 |" in report
    assert "No epochs recorded" not in report and "| combined | fa |" in report  # health
    assert len((out / "ministudy-runs.csv").read_text().strip().splitlines()) == 11


def test_cuda_test_files_are_the_files_of_pytests_cuda_selection():
    """The cuda-tests stage reads the files' text instead of importing them; pytest's own
    ``-m cuda`` selection (Ray and Optuna installed here, so every module collects) must
    pick tests from exactly those files."""
    files = _load_device_check().cuda_test_files()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
         "-p", "no:cacheprovider", "tests"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = {line.split("::", 1)[0] for line in proc.stdout.splitlines() if "::" in line}
    assert selected and sorted(selected) == files


def test_stage_past_its_deadline_is_killed_with_its_children(tmp_path, monkeypatch):
    dc = _load_device_check()
    monkeypatch.setitem(dc.PLAN, "slow", (2, 2))
    args = argparse.Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "work"),
                              py=sys.executable, dry_run=False, data="synthetic:2")
    check = dc.Check(args)
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('partial result', flush=True)\n"
              "time.sleep(60)\n")
    t0 = time.monotonic()
    rc = check.run("slow", [sys.executable, "-c", script], tmp_path / "slow.txt")
    assert time.monotonic() - t0 < 20
    assert rc == -9 and check.stages[-1]["timed_out"] is True
    assert (tmp_path / "slow.txt").read_text() == "partial result\n"  # kept what it wrote
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed with the stage's session; give the kernel a moment to reap
        stat = Path(f"/proc/{grandchild}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage's child outlived the deadline")
    assert "TIMED OUT" in (tmp_path / "out" / "device_check.log").read_text()
    # A stage whose deadline has passed is not started at all.
    assert check.run("slow", [sys.executable, "-c", "pass"], tmp_path / "late.txt") == -1
    assert check.stages[-1]["skipped"] is True
    assert dc.summarize(check) == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"] == ["slow"]


# ---------------------------------------------------------------------------------------------
# The mini-study's plan


def test_makespan_longest_first_by_hand():
    # 2 slots: 5 | 4, then 3 joins the 4 (7), 3 joins the 5 (8), 2 joins the 7 (9).
    assert makespan([3, 5, 2, 4, 3], 2) == 9
    assert makespan([3, 5, 2, 4, 3], 1) == 17
    assert makespan([3, 5, 2], 4) == 5


def test_bench_rates_from_bench_rows():
    rows = [
        {"group": "baseline", "feed": "device", "student": "resnet18", "images_per_s": 1000.0},
        {"group": "baseline", "feed": "dataloader", "student": "resnet18", "images_per_s": 9.0},
        {"group": "kd", "feed": "device", "student": "resnet18", "images_per_s": 500.0},
        {"group": "baseline", "feed": "device", "student": "resnet50", "images_per_s": 260.0},
        {"group": "kd", "feed": "device", "student": "resnet18", "concurrent": 2,
         "images_per_s": 800.0},
        {"group": "kd", "feed": "device", "student": "resnet18", "compile": True,
         "images_per_s": 700.0},
    ]
    rates = bench_rates(rows)
    assert rates == pytest.approx({"baseline": 1000.0, "kd": 500.0, "teacher": 200.0,
                                   "speedup_2": 1.6})


def test_plan_takes_the_most_epochs_that_fit_then_the_fastest_k(monkeypatch):
    import search.bench.plan as ms

    for name, value in (("INFER_PER_TRAIN", 3.0), ("RUN_OVERHEAD_S", 6.0),
                        ("TEACHER_SHARE", 0.35), ("N_CORRUPTED", 35)):
        monkeypatch.setattr(ms, name, value)
    rates = {"baseline": 100.0, "kd": 50.0, "teacher": 10.0}
    sizes = Sizes(train=1000, val=100, test=100)
    # Teacher epoch: 1000/10 + 100/30 = 103.33 s; 0.35 * 500 s holds 1 epoch.
    # One process (K=1): baseline run 10.333 E + 18 s, kd run 20.667 E + 30 s, in sequence:
    # 31 E + 48 <= 500 - 103.33  ->  E = 11.
    plan = plan_study(rates, 500, groups=("baseline", "kd"), seeds=1, sizes=sizes, max_epochs=30)
    assert (plan.k, plan.epochs, plan.teacher_epochs) == (1, 11, 1)
    assert plan.est_teacher_s == pytest.approx(103.333, abs=1e-3)
    assert plan.est_runs_s == pytest.approx(31 * 11 + 48, abs=1e-6)
    # Two processes at 1.5x the total rate (0.75x each): the two runs overlap, kd's
    # 27.556 E + 38 s is the makespan: E = 13 fits (499.56 s), 14 does not.
    plan = plan_study({**rates, "speedup_2": 1.5}, 500, groups=("baseline", "kd"), seeds=1,
                      sizes=sizes, k_choices=(1, 2, 4))
    assert (plan.k, plan.epochs) == (2, 13)
    assert plan.run_s["kd"] == pytest.approx(1000 / 37.5 * 13 + 100 / 112.5 * 13 + 38)
    # Nothing fits: 1 epoch at the K that finishes first; the cap on epochs holds.
    plan = plan_study({**rates, "speedup_2": 1.5}, 50, groups=("baseline", "kd"), seeds=1,
                      sizes=sizes)
    assert (plan.k, plan.epochs, plan.teacher_epochs) == (2, 1, 1)
    assert plan_study(rates, 1e9, groups=("baseline",), seeds=1, sizes=sizes,
                      max_epochs=7).epochs == 7
    assert plan_study(rates, 1e9, groups=("baseline",), sizes=sizes).teacher_epochs == 0
    # A group the bench did not reach is planned at the slowest measured rate.
    partial = plan_study({"baseline": 100.0, "teacher": 10.0}, 500, groups=("baseline", "kd"),
                         seeds=1, sizes=sizes)
    assert partial.run_s["kd"] == partial.run_s["baseline"] == pytest.approx(
        partial.epochs * (1000 / 100 + 100 / 300) + 100 * 36 / 300 + 6)
    with pytest.raises(ValueError, match="no single-process"):
        plan_study({"teacher": 10.0}, 100, groups=("baseline", "kd"))
