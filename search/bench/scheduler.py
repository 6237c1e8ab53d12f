"""``kdsearch bench --scheduler``: how well the search keeps a cluster's slots busy.

Two measurements of the same scheduling (all five groups, per-group TPE and ASHA):

- **real**: ``run_tune`` on a private Ray instance with ``--slots`` logical CPUs, where every
  trial sleeps ``--epoch-seconds`` per epoch and reports a synthetic learning curve that
  depends on its configuration (``search.engine.simulated``). Everything else is the real path of
  ``kdsearch tune``: searcher, scheduler, callbacks, sink, storage layout, worker reuse. The
  numbers come from the ``epochs`` table it writes (``slot_usage``).
- **simulated** (``--simulate``): a discrete-event simulation with the same ``GroupASHA`` and
  curves and no Ray, for cluster sizes this machine cannot host (64, 256 slots), comparing
  one shared queue for all groups with the groups searched one after another.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import tempfile
import time
from types import SimpleNamespace

import pandas as pd

from search.study import StudyConfig, load_study_config


def bench_config(args, storage: str) -> StudyConfig:
    """A study of all five groups with the bench's budget; tiny data (trials only sleep)."""
    return load_study_config(None, None, {
        "study": "bench-scheduler", "data": "synthetic:4", "val_size": 10, "storage": storage,
        "samples": args.samples, "max_epochs": args.epochs, "grace_period": args.grace,
        "reduction_factor": args.reduction_factor, "cpus_per_trial": 1.0,
        "student_width": 0.125, "teacher": {"width": 0.125, "epochs": 1},
    })


# ---------------------------------------------------------------------------------------------
# Slot usage from an epochs table


def slot_usage(epochs: pd.DataFrame, slots: int) -> dict:
    """Busy and idle slot time of a finished search, from its ``epochs`` rows.

    An epoch occupies its slot from ``timestamp - epoch_seconds`` to ``timestamp`` (the
    driver's time of the report). ``span`` runs from the first epoch's start to the last
    epoch's end; ``tail_idle_slot_s`` is the idle slot time after the last trial started
    (nothing left to start); the rest of the idle time, per trial, is ``overhead_per_trial_s``.
    """
    end = epochs["timestamp"].astype(float)
    start = end - epochs["epoch_seconds"].astype(float)
    t0, t1 = float(start.min()), float(end.max())
    span = t1 - t0
    busy = float(epochs["epoch_seconds"].sum())
    last_start = float(start.groupby(epochs["trial_id"]).min().max())
    events = sorted([(float(s), 1) for s in start] + [(float(e), -1) for e in end])
    tail_idle, running, previous = 0.0, 0, t0
    for t, step in events:
        if t > last_start:
            tail_idle += (slots - running) * (t - max(previous, last_start))
        running += step
        previous = t
    trials = epochs["trial_id"].nunique()
    windows = [(float(start[epochs["group"] == g].min()), float(end[epochs["group"] == g].max()))
               for g in epochs["group"].unique()]
    return {
        "slots": slots, "trials": int(trials), "epochs": int(len(epochs)),
        "span_s": span, "busy_slot_s": busy, "utilization": busy / (slots * span),
        "tail_idle_slot_s": tail_idle,
        "overhead_per_trial_s": max(slots * span - busy - tail_idle, 0.0) / max(trials, 1),
        "groups_interleave": all(a0 < b1 and b0 < a1 for a0, a1 in windows
                                 for b0, b1 in windows),
    }


def run_real(args) -> dict:
    """The real search path with sleeping trials on ``args.slots`` logical CPUs."""
    from search.commands.tune import run_tune
    from search.store.sink import read_table

    storage = args.storage or tempfile.mkdtemp(prefix="kdsearch-bench-")
    config = bench_config(args, str(storage))
    t0 = time.monotonic()
    summary = run_tune(config, simulate=args.epoch_seconds, num_cpus=args.slots)
    wall = time.monotonic() - t0
    usage = slot_usage(read_table(config.study_dir, "epochs"), summary["slots"])
    return {"mode": "real", "epoch_seconds": args.epoch_seconds, "wall_s": wall, **usage,
            "worker_processes": summary.get("worker_processes"),
            "study_dir": config.study_dir}


# ---------------------------------------------------------------------------------------------
# Discrete-event simulation


def _sample(config: StudyConfig, group: str, rng: random.Random) -> dict[str, float]:
    params = {}
    for name, r in config.group_space(group).items():
        if r.categorical:
            value = rng.choice(r.choices)
        elif r.log:
            value = math.exp(rng.uniform(math.log(r.low), math.log(r.high)))
        elif r.step:
            value = r.low + r.step * rng.randint(0, int(round((r.high - r.low) / r.step)))
        else:
            value = rng.uniform(r.low, r.high)
        params[name] = value
    return params


def simulate_schedule(config: StudyConfig, slots: int, epoch_seconds: float = 1.0,
                      shared: bool = True, seed: int = 0) -> dict:
    """Utilization of ``slots`` for the study's search, all groups at once (``shared``) or one
    group after another (each group's search must end before the next starts).

    Trials sample their configuration at random; ASHA decisions come from ``GroupASHA``
    applied to ``synthetic_val_acc``; there is no start-up or reporting overhead.
    """
    from ray.tune.schedulers import TrialScheduler

    from search.engine.scheduler import GroupASHA
    from search.engine.simulated import synthetic_val_acc

    rng = random.Random(seed)
    scheduler = GroupASHA(config)
    todo = {g: config.samples for g in config.groups}
    unfinished = dict(todo)
    order = list(config.groups)
    running: list[tuple[float, int, SimpleNamespace]] = []
    now, busy, epochs, counter = 0.0, 0.0, 0, 0

    def next_group() -> str | None:
        if shared:
            open_groups = [g for g in order if todo[g]]
            return max(open_groups, key=lambda g: todo[g]) if open_groups else None
        current = next((g for g in order if unfinished[g]), None)
        return current if current is not None and todo[current] else None

    while True:
        while len(running) < slots and (group := next_group()) is not None:
            todo[group] -= 1
            counter += 1
            trial = SimpleNamespace(trial_id=str(counter), config={"group": group}, epoch=0,
                                    params=_sample(config, group, rng))
            scheduler.on_trial_add(None, trial)
            heapq.heappush(running, (now + epoch_seconds, counter, trial))
        if not running:
            break
        now, _, trial = heapq.heappop(running)
        trial.epoch += 1
        busy += epoch_seconds
        epochs += 1
        result = {"epoch": trial.epoch, "val_acc": synthetic_val_acc(trial.params, trial.epoch)}
        action = scheduler.on_trial_result(None, trial, result)
        if trial.epoch >= config.max_epochs or action == TrialScheduler.STOP:
            scheduler.on_trial_complete(None, trial, result)
            unfinished[trial.config["group"]] -= 1
        else:
            heapq.heappush(running, (now + epoch_seconds, int(trial.trial_id), trial))
    return {"mode": "simulated", "queue": "shared" if shared else "groups one after another",
            "slots": slots, "trials": counter, "epochs": epochs, "span_s": now,
            "busy_slot_s": busy, "utilization": busy / (slots * now) if now else math.nan}


def cmd_bench_scheduler(args) -> int:
    """Print one JSON line per measurement (see the module docstring)."""
    args.slots = int(args.slots)
    args.samples = 16 if args.samples is None else args.samples
    args.grace = 2 if args.grace is None else args.grace
    args.reduction_factor = 2.0 if args.reduction_factor is None else args.reduction_factor
    if args.slots <= 0 or args.samples <= 0 or args.epochs <= 0 or args.grace <= 0:
        raise ValueError("--slots, --samples, --epochs and --grace must be > 0")
    if args.epoch_seconds <= 0:
        raise ValueError("--epoch-seconds must be > 0")
    if args.simulate:
        config = bench_config(args, tempfile.gettempdir())
        for shared in (True, False):
            print(json.dumps(simulate_schedule(config, args.slots, args.epoch_seconds, shared)),
                  flush=True)
        return 0
    print(json.dumps(run_real(args)), flush=True)
    return 0
