"""A mini-study without Ray: the teacher, then every group at its default weights x seeds.

For a machine that has a GPU but no Ray or Optuna (the lent device machine; see
``bench/device_check.py``). The runs are ``kdsearch reproduce`` runs — ``evaluate_run``
trains and evaluates each, ``write_run`` writes the same ``runs`` and ``robustness``
tables through ``ParquetSink`` — except that nothing is tuned: every group trains at its
default loss weights (``source_trial_id`` is ``defaults``), and each run's per-epoch
metrics go to the ``epochs`` table (trial id ``<group>-seed<seed>``), so the report has
learning curves and the loss-term health check. K worker processes share the
GPU and take runs from a queue, longest first; the driver trains (or loads) the teacher
meanwhile, writes each result as it arrives and stops waiting at its deadline, so a study
cut short keeps every finished run.

Epochs come from measured throughput (``kdsearch bench --json`` rows, ``plan_study``): the
largest epoch count whose estimated time, teacher included, fits the budget.

    python3 -m search.bench.ministudy run --data SPEC --storage DIR --bench bench.jsonl --budget-s S
    python3 -m search.bench.ministudy report --storage DIR --out OUTDIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import socket
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdcore.config import GROUP_TERMS, teacher_file
from search.bench.plan import Plan, Sizes, bench_rates, plan_study

STUDY = "ministudy"


# ---------------------------------------------------------------------------------------------
# Running it: K worker processes fed from a queue


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _worker(config, tasks, results) -> None:
    """One process sharing the device: loads the data once, then trains runs until None."""
    import torch

    from kdcore.features import network
    from kdcore.teacher import load_teacher
    from search.engine.reproduce import evaluate_run

    data = config.load_data()
    if config.device.startswith("cuda"):
        torch.zeros(1, device=config.device)  # start CUDA now, while the teacher trains
    results.put(("ready", {"pid": os.getpid(), "fingerprint": data.fingerprint}))
    teacher_state = None
    while (run := tasks.get()) is not None:
        t0 = time.monotonic()
        try:
            if teacher_state is None and GROUP_TERMS[run["group"]] != ("ce",):
                # The file the driver trained; a worker never trains a teacher itself.
                path = config.teacher_cache / teacher_file(config.teacher.content_hash(data))
                teacher_state = network(load_teacher(path, config.teacher,
                                                     data.num_classes)).state_dict()
            history: list[dict] = []
            result = evaluate_run(run, config, data, teacher_state,
                                  report=lambda metrics, state, h=history: h.append(metrics))
            results.put(("done", {**result, "history": history,
                                  "wall_seconds": time.monotonic() - t0}))
        except Exception as exc:  # reported to the driver, which records it and goes on
            results.put(("failed", {**run, "error": f"{exc.__class__.__name__}: {exc}"}))


def epoch_rows(study: str, result: dict[str, Any], node: str) -> list[dict[str, Any]]:
    """``epochs`` rows of one run (trial id ``<group>-seed<seed>``), from fit's per-epoch
    metrics: the learning curves and gradient shares of the report's health check."""
    from search.store.rows import epoch_row

    trial_id, now = f"{result['group']}-seed{result['seed']}", time.time()
    return [epoch_row(study, result["group"], trial_id, 1, metrics["epoch"], result["seed"],
                      metrics, result, node, now) for metrics in result["history"]]


def _teacher(config, data) -> dict:
    """Train (or load from the cache) the study's teacher in the driver; its metadata."""
    import torch

    from kdcore.teacher import get_teacher

    def progress(metrics: dict, state: dict) -> None:
        _log(f"teacher epoch {metrics['epoch']}/{config.teacher.epochs}: val_acc "
             f"{metrics['val_acc']:.4f}, {metrics['images_per_s']:.0f} images/s "
             f"({metrics['epoch_seconds']:.1f}s)")

    torch.set_num_threads(max(1, int(config.cpus_per_trial)))
    t0 = time.monotonic()
    _, digest, meta = get_teacher(config.teacher, data, config.teacher_cache, report=progress)
    _log(f"teacher {digest}: val_acc {meta.get('val_acc', math.nan):.4f} "
         f"({time.monotonic() - t0:.1f}s)")
    return {"teacher_hash": digest, "teacher_val_acc": meta.get("val_acc"),
            "teacher_seconds": time.monotonic() - t0}


def run_study(config, k: int, deadline: float, plan: Plan | None = None) -> dict[str, int]:
    """Teacher, then every (group, seed) at default weights on ``k`` workers, until
    ``deadline`` (a ``time.monotonic()`` value). Returns counts of done/failed/unfinished."""
    import torch.multiprocessing as tmp

    from search.store.sink import ParquetSink
    from search.study import write_study_json

    runs = [{"group": g, "seed": s, "source_trial_id": "defaults"}
            for g in config.groups for s in config.reproduce_seeds()]
    if plan is not None:  # longest first, so the last wave is short
        runs.sort(key=lambda r: -plan.run_s.get(r["group"], 0.0))
    ctx = tmp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(config, tasks, results), daemon=True)
             for _ in range(k)]
    for p in procs:
        p.start()
    counts = {"done": 0, "failed": 0, "unfinished": len(runs)}
    try:
        t0 = time.monotonic()
        data = config.load_data()
        _log(f"data {config.data}: {len(data.train_y)}/{len(data.val_y)}/{len(data.test_y)} "
             f"images, fingerprint {data.fingerprint} ({time.monotonic() - t0:.1f}s)")
        about = {"data_fingerprint": data.fingerprint, "runner": "search.bench.ministudy",
                 "plan": asdict(plan) if plan else None}
        write_study_json(config, **about)  # first without the teacher: a report can be made
        write_study_json(config, **about, **_teacher(config, data))
        for run in runs:
            tasks.put(run)
        for _ in procs:
            tasks.put(None)
        sink = ParquetSink(config.study_dir)
        host = socket.gethostname()
        while counts["done"] + counts["failed"] < len(runs):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                kind, payload = results.get(timeout=min(left, 2.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # every worker is gone and nothing is left to read
                continue
            _receive(kind, payload, config, data, plan, sink, host, counts)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        counts["unfinished"] = len(runs) - counts["done"] - counts["failed"]
    return counts


def _receive(kind: str, payload: dict, config, data, plan: Plan | None, sink, host: str,
             counts: dict[str, int]) -> None:
    """Handle one message of a worker: ``ready`` (its data must be the driver's), ``failed``
    (counted and logged), or a finished run (its rows written, counted, logged)."""
    from search.engine.reproduce import write_run

    if kind == "ready":
        if payload["fingerprint"] != data.fingerprint:
            raise RuntimeError(f"worker {payload['pid']} loaded other data "
                               f"({payload['fingerprint']} != {data.fingerprint})")
        return
    tag = f"{payload['group']} seed {payload['seed']}"
    if kind == "failed":
        counts["failed"] += 1
        _log(f"run {tag} FAILED: {payload['error']}")
        return
    write_run(sink, config.study, {**payload, "node": host})
    sink.append("epochs", payload["group"], epoch_rows(config.study, payload, host))
    counts["done"] += 1
    est = plan.run_s.get(payload["group"]) if plan else None
    _log(f"run {tag}: test_acc {payload['test_acc']:.4f}, best_val_acc "
         f"{payload['best_val_acc']:.4f} at epoch {payload['best_epoch']}, "
         f"{payload['wall_seconds']:.1f}s (train {payload['train_seconds']:.1f}s"
         + (f", estimated {est:.1f}s)" if est else ")"))


def study_config(args: argparse.Namespace, plan: Plan):
    """The paper preset with this call's data, sizes, device and the plan's epochs and K."""
    from search.study import load_study_config

    teacher = {"epochs": max(1, plan.teacher_epochs)}
    overrides: dict[str, Any] = {
        "study": STUDY, "data": args.data, "storage": args.storage, "device": args.device,
        "max_epochs": plan.epochs, "grace_period": 1, "seeds": args.seeds,
        "val_size": args.val_size, "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class, "max_concurrent": plan.k,
        "gpus_per_trial": 1.0 / plan.k if args.device.startswith("cuda") else 0.0,
        "cpus_per_trial": float(max(1, (os.cpu_count() or 1) // plan.k)),
    }
    if args.width != 1.0:
        overrides["student_width"] = args.width
        teacher["width"] = args.width
    if args.batch:
        overrides["batch_size"] = args.batch
        teacher["batch_size"] = args.batch
    overrides["teacher"] = teacher
    return load_study_config("paper", None, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.budget_s
    rows = [json.loads(line) for line in Path(args.bench).read_text().splitlines() if line.strip()]
    sizes = Sizes(*args.sizes) if args.sizes else Sizes()
    ks = tuple(int(k) for k in args.k_choices.split(","))
    # The plan leaves room for loading the data and starting the workers.
    try:
        plan = plan_study(bench_rates(rows), args.budget_s - args.startup_s, seeds=args.seeds,
                          sizes=sizes, max_epochs=args.max_epochs, k_choices=ks)
    except ValueError as exc:  # the bench stage wrote nothing usable: the smallest study
        _log(f"{exc}; planning 1 epoch, 1 teacher epoch, K = 1")
        plan = Plan(k=1, epochs=1, teacher_epochs=1, est_teacher_s=math.nan,
                    est_runs_s=math.nan, run_s={}, rates={})
    _log("plan: " + json.dumps(asdict(plan)))
    config = study_config(args, plan)
    counts = run_study(config, plan.k, deadline, plan)
    _log(f"study {config.study_dir}: {json.dumps(counts)}")
    return 0 if counts["done"] == len(config.groups) * config.seeds else 1


def cmd_report(args: argparse.Namespace) -> int:
    """The analyze report of the study plus flat copies for a folder with few files."""
    from analysis import write_report
    from search.store.sink import read_table

    study_dir = Path(args.storage) / STUDY
    report = write_report(study_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ministudy-report.md").write_text(report.read_text())
    read_table(str(study_dir), "runs").to_csv(out / "ministudy-runs.csv", index=False)
    with tarfile.open(out / "ministudy.tar.gz", "w:gz") as tar:
        tar.add(study_dir, arcname=STUDY)
    _log(f"report {report}; copies in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m search.bench.ministudy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="plan from bench rows, then teacher and runs")
    p.add_argument("--data", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--bench", required=True, help="kdsearch bench --json rows (JSON lines)")
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--startup-s", type=float, default=15.0,
                   help="seconds of the budget for loading data and starting workers")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--k-choices", default="1,2,4")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--width", type=float, default=1.0, help="width of student and teacher")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="images per split for the plan (default 45000 5000 10000)")
    p = sub.add_parser("report", help="write the analyze report and flat copies")
    p.add_argument("--storage", required=True)
    p.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
