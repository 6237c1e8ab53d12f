"""``kdsearch bench --tables N``: the cost of reading and analysing trial tables at scale.

Writes a synthetic study in the paper preset's shape with the project's own ``ParquetSink``,
one row per append as the search's callback does: 5 groups of N trials, ASHA stopping trials
at 5, 10 and 20 of 30 epochs, a few retried epochs, re-sent rows, failed and diverged trials,
then 5 reproduce seeds per group with their robustness rows. It then times, each in a fresh
process (peak memory = that process's maximum resident set): ``analysis.load_study`` and
``kdsearch analyze`` on the study as written (a study still running), ``kdsearch compact``,
and both again on the compacted study.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from analysis.constants import CFG_COLUMNS, GROUPS, TERMS, cfg_type
from search.store.rows import epoch_row
from search.store.rows import trial_row as table_trial_row
from search.store.sink import ParquetSink
from search.study import DEFAULT_SPACE

MAX_EPOCHS, RUNGS, SEEDS, CONCURRENT = 30, (5, 10, 20), 5, 8
ACTIVE = {"baseline": ("ce",), "kd": ("ce", "kl"), "fa": ("ce", "kl", "fa"),
          "at": ("ce", "kl", "at"), "combined": ("ce", "kl", "at", "fa")}
# (low, high, log) of each searched parameter: the shape of the default space
RANGES = {name: (r.low, r.high, r.log) for name, r in DEFAULT_SPACE.items()}
CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "contrast", "jpeg")


def sample_config(group: str, rng: random.Random) -> dict[str, float]:
    """cfg_* values of one trial: searched parameters of the group drawn, the others fixed."""
    active = ACTIVE[group]
    values = {"T": 1.0, "w_ce": 1.0, "w_kl": 0.0, "w_at": 0.0, "w_fa": 0.0, "mask_pct": 0.0}
    searched = ([] if group == "baseline" else ["T", "w_ce", "w_kl"])
    searched += [f"w_{t}" for t in ("at", "fa") if t in active]
    searched += ["mask_pct"] if {"at", "fa"} & set(active) else []
    for p in searched:
        low, high, log = RANGES[p]
        u = rng.random()
        values[p] = math.exp(math.log(low) + u * math.log(high / low)) if log else low + u * (
            high - low)
    return {f"cfg_{p}": v for p, v in values.items()}


def trial_plan(group: str, index: int, rng: random.Random, rung_scores: dict) -> dict:
    """One trial: its learning curve, where ASHA (top half per rung) stops it, its status."""
    quality = rng.gauss(0.80 + 0.01 * GROUPS.index(group), 0.03)
    curve = [min(0.99, quality - 0.35 * math.exp(-e / 6) + rng.gauss(0, 0.005))
             for e in range(1, MAX_EPOCHS + 1)]
    stop = MAX_EPOCHS
    for rung in RUNGS:
        seen = rung_scores.setdefault(rung, [])
        seen.append(curve[rung - 1])
        if curve[rung - 1] < sorted(seen)[len(seen) // 2]:  # below the rung's median
            stop = rung
            break
    status = "completed" if stop == MAX_EPOCHS else "asha_stopped"
    fate = rng.random()
    if fate < 0.01:
        status, stop = "failed", rng.randint(0, 3)
    elif fate < 0.02:
        status, stop = "diverged", rng.randint(1, 4)
    elif fate < 0.05 and stop > 12:
        status, stop = "early_stopped", rng.randint(12, stop - 1)
    return {"trial_id": f"{group}_{index:05d}", "curve": curve[:stop], "status": status,
            "cfg": sample_config(group, rng), "retry": rng.random() < 0.02}


def epoch_rows(study: str, plan: dict) -> list[dict]:
    """The epoch rows of one trial in the order the callback writes them (a retried trial
    repeats the epoch it was in with attempt 1; a few rows are sent twice)."""
    out = []
    shares = {f"gshare_{t}": (0.25 if t in ACTIVE[plan["group"]] else math.nan) for t in TERMS}
    for epoch, acc in enumerate(plan["curve"], start=1):
        metrics = {"val_acc": acc, "val_loss": 1 - acc, "train_loss": 1.1 - acc,
                   **{f"loss_{t}": 0.1 for t in TERMS}, **shares, "lr": 0.01,
                   "epoch_seconds": 30.0, "images_per_s": 1500.0}
        for attempt in ((0, 1) if plan["retry"] and epoch == 3 else (0,)):
            out.append(epoch_row(study, plan["group"], plan["trial_id"], attempt, epoch, 0,
                                  metrics, plan["cfg"], "10.0.0.1"))
    if plan["status"] == "diverged" and out:
        out.pop()  # the diverging epoch writes no row
    return out


def trial_row(study: str, plan: dict) -> dict:
    curve = plan["curve"]
    best = max(range(len(curve)), key=curve.__getitem__) if curve else None
    failed = plan["status"] in ("failed", "diverged")
    error = ("RuntimeError: CUDA error: an illegal memory access" if plan["status"] == "failed"
             else "non-finite loss" if failed else "")
    return table_trial_row(study, plan["group"], plan["trial_id"], plan["status"], len(curve),
                          None if failed or best is None else curve[best],
                          0 if best is None else best + 1, 30.0 * len(curve), 0, plan["cfg"],
                          error)


def write_study(study_dir: str, trials_per_group: int, seed: int = 0,
                compact_every: int | None = None) -> dict:
    """Write the synthetic study; returns counts and the time spent appending. By default
    the sink never compacts (the worst case); ``compact_every`` sets its own compaction."""
    rng = random.Random(seed)
    study = Path(study_dir).name
    sink = ParquetSink(study_dir, compact_every=compact_every)
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    space = {p: {"low": lo, "high": hi, "log": log} for p, (lo, hi, log) in RANGES.items()}
    (Path(study_dir) / "study.json").write_text(json.dumps({
        "study": study, "data": "synthetic (kdsearch bench --tables)", "groups": list(GROUPS),
        "samples": trials_per_group, "max_epochs": MAX_EPOCHS, "grace_period": RUNGS[0],
        "reduction_factor": 2.0, "seeds": SEEDS, "space": space}))
    appends = 0
    t0 = time.perf_counter()
    for group in GROUPS:
        rung_scores: dict = {}
        plans = [{**trial_plan(group, i, rng, rung_scores), "group": group}
                 for i in range(trials_per_group)]
        # CONCURRENT trials run at once: their epoch rows interleave, as in a real search
        for start in range(0, len(plans), CONCURRENT):
            batch = [(p, epoch_rows(study, p)) for p in plans[start:start + CONCURRENT]]
            for i in range(max(len(rows) for _, rows in batch)):
                for _, rows in batch:
                    if i < len(rows):
                        sink.append("epochs", group, [{**rows[i], "timestamp": time.time()}])
                        appends += 1
            for plan, _ in batch:
                resent = 2 if rng.random() < 0.01 else 1  # a trial row written twice
                for _ in range(resent):
                    sink.append("trials", group, [{**trial_row(study, plan),
                                                   "timestamp": time.time()}])
                    appends += 1
        appends += reproduce_rows(sink, study, group, rng)
    return {"appends": appends, "append_seconds": time.perf_counter() - t0}


def reproduce_rows(sink: ParquetSink, study: str, group: str, rng: random.Random) -> int:
    """One ``runs`` row and the ``robustness`` rows of each seed, as reproduce writes them."""
    for seed in range(1, SEEDS + 1):
        acc = rng.gauss(0.80 + 0.01 * GROUPS.index(group), 0.005)
        now = time.time()
        sink.append("runs", group, [{
            "study": study, "seed": seed, "source_trial_id": f"{group}_00000", "test_acc": acc,
            "test_loss": 1 - acc, "corrupt_acc_mean": acc - 0.2, "params": 11_000_000,
            "latency_ms_bs1": 3.0, "images_per_s_bs256": 9000.0,
            **{c: 1.0 for c in CFG_COLUMNS if cfg_type(c) == pa.float64()},
            "best_val_acc": acc, "best_epoch": 20,
            "epochs_run": MAX_EPOCHS, "train_seconds": 900.0, "node": "10.0.0.1",
            "timestamp": now}])
        sink.append("robustness", group, [
            {"study": study, "seed": seed, "corruption": c, "severity": s,
             "acc": acc - 0.04 * s, "timestamp": now}
            for c in CORRUPTIONS for s in range(1, 6)])
    return 2 * SEEDS


def measured(argv: list[str], env: dict | None = None) -> dict:
    """Run ``argv``; its wall seconds, peak resident memory (GB) and last output line."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise ValueError(f"bench --tables: {' '.join(argv[1:4])} failed: "
                             f"{err.read().decode(errors='replace')[-500:]}")
        lines = out.read().decode().strip().splitlines()
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_gb": usage.ru_maxrss / 2**20, "output": lines[-1:] or [""]}


LOAD = ("import json, sys, time; from analysis import load_study; t0 = time.perf_counter(); "
        "c0 = time.process_time(); s = load_study(sys.argv[1]); "
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'cpu': time.process_time() - c0,"
        " 'rows': {n: len(getattr(s, n)) for n in ('epochs', 'trials', 'runs', 'robustness')}}))")


def file_count(study_dir: str) -> int:
    return sum(1 for _, _, files in os.walk(study_dir) for f in files if f.endswith(".parquet")
               and not f.startswith("."))


def bench_tables(trials_per_group: int, storage: str) -> dict:
    """Write the study under ``storage``, then time load and analyze before/after compaction."""
    study_dir = str(Path(storage) / f"tables{trials_per_group}")
    if Path(study_dir).exists():
        raise ValueError(f"--storage: {study_dir} already exists; give an empty --storage")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "search.commands.cli"]
    result: dict = {"trials_per_group": trials_per_group, "study_dir": study_dir,
                    **write_study(study_dir, trials_per_group)}
    result["parts"] = file_count(study_dir)
    result["mb_on_disk"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                               os.walk(study_dir) for f in fs) / 1e6
    for state in ("written", "compacted"):
        if state == "compacted":
            step = measured([*cli, "compact", "--storage", storage, "--study",
                             Path(study_dir).name, "--min-age", "0"], env)
            result["compact_seconds"] = step["seconds"]
            result["compact_cpu_seconds"] = step["cpu_seconds"]
            result["compacted_files"] = file_count(study_dir)
        load = measured([sys.executable, "-c", LOAD, study_dir], env)
        inner = json.loads(load["output"][0])
        analyze = measured([*cli, "analyze", "--storage", storage, "--study",
                            Path(study_dir).name, "--out",
                            str(Path(storage) / f"report-{state}")], env)
        result[state] = {"load_seconds": inner["seconds"], "load_cpu_seconds": inner["cpu"],
                         "load_process_seconds": load["seconds"],
                         "load_peak_gb": load["peak_gb"], "rows": inner["rows"],
                         "analyze_seconds": analyze["seconds"],
                         "analyze_cpu_seconds": analyze["cpu_seconds"],
                         "analyze_peak_gb": analyze["peak_gb"]}
    return result


def cmd_bench_tables(args) -> int:
    n = args.tables
    if n < 1 or n > 5000:
        raise ValueError(f"--tables: {n} trials per group is outside 1..5000")
    if args.storage:
        storage = Path(args.storage)
        from search.store.files import check_storage

        check_storage(str(storage))
        result = bench_tables(n, str(storage))
    else:
        with tempfile.TemporaryDirectory(prefix="kdsearch-tables-") as tmp:
            result = bench_tables(n, tmp)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{n} trials/group: {result['parts']} part files, {result['mb_on_disk']:.0f} MB, "
          f"written by {result['appends']} appends in {result['append_seconds']:.0f}s "
          f"({1000 * result['append_seconds'] / result['appends']:.2f} ms each); compact "
          f"{result['compact_seconds']:.1f}s -> {result['compacted_files']} files")
    print("| state | load_study s (CPU s) | load peak GB | analyze s (CPU s) | analyze peak GB |")
    print("|---|---|---|---|---|")
    for state in ("written", "compacted"):
        r = result[state]
        print(f"| {state} | {r['load_seconds']:.2f} ({r['load_cpu_seconds']:.2f}) | "
              f"{r['load_peak_gb']:.2f} | {r['analyze_seconds']:.1f} "
              f"({r['analyze_cpu_seconds']:.1f}) | {r['analyze_peak_gb']:.2f} |")
    return 0
