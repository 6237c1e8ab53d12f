"""``StudyProgress``: one compact progress view of a whole study for Ray Tune's console.

Every ``interval`` seconds (and once at the end) it prints one line per group — trials
running, finished, stopped by ASHA, failed, still to start, and the best validation accuracy
so far — under a header with the elapsed time and a rough estimate of what is left::

    tune 3m12s, ~5m left, 8 slots
      group     running  done  stopped  failed  to start  best val_acc
      kd              2     3        4       0         7       0.4123
"""

from __future__ import annotations

import math
import time

import numpy as np
from ray.tune import ProgressReporter

from search.engine.callback import classify
from search.study import StudyConfig


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def group_counts(trials: list, config: StudyConfig, before: dict[str, int] | None = None,
                 ) -> dict[str, dict]:
    """Per group: running, done, stopped, failed, to_start, best (val_acc), trial_seconds.

    ``before``: trials per group that earlier experiments of the study finished (a search
    that grew), which count towards ``samples`` but are not in ``trials``."""
    counts = {g: {"running": 0, "done": 0, "stopped": 0, "failed": 0, "best": math.nan,
                  "trial_seconds": []} for g in config.groups}
    for trial in trials:
        entry = counts.get(trial.config.get("group"))
        if entry is None:
            continue
        result = trial.last_result or {}
        best = result.get("best_val_acc")
        if best is not None and not result.get("diverged"):
            entry["best"] = float(np.nanmax([entry["best"], best]))
        if trial.status == "RUNNING":
            entry["running"] += 1
        elif trial.status == "ERROR":
            entry["failed"] += 1
        elif trial.status == "TERMINATED":
            status = classify(result, config.max_epochs)
            key = {"asha_stopped": "stopped", "failed": "failed", "diverged": "failed"}
            entry[key.get(status, "done")] += 1
            if result.get("wall_seconds"):
                entry["trial_seconds"].append(float(result["wall_seconds"]))
    for group, entry in counts.items():
        entry["to_start"] = max(config.samples - (before or {}).get(group, 0) - entry["running"]
                                - entry["done"] - entry["stopped"] - entry["failed"], 0)
    return counts


def estimate_left(counts: dict[str, dict], slots: int) -> float | None:
    """Seconds left if the unfinished trials take as long as the finished ones, on ``slots``."""
    seconds = [s for e in counts.values() for s in e["trial_seconds"]]
    if not seconds:
        return None
    mean = sum(seconds) / len(seconds)
    left = sum(e["to_start"] + 0.5 * e["running"] for e in counts.values())
    return left * mean / max(slots, 1)


class IntervalView(ProgressReporter):
    """A Tune progress reporter that prints ``render(trials)`` every ``interval`` seconds
    (Tune asks at its events) and once at the end; subclasses write ``render``."""

    def __init__(self, slots: int, interval: float = 30.0):
        self.slots = slots
        self.interval = interval
        self.start = time.monotonic()
        self.last = -math.inf

    def should_report(self, trials: list, done: bool = False) -> bool:
        return done or time.monotonic() - self.last >= self.interval

    def render(self, trials: list) -> str:
        raise NotImplementedError

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        self.last = time.monotonic()
        print(self.render(trials), flush=True)


class StudyProgress(IntervalView):
    """The console view of ``kdsearch tune`` (see the module docstring)."""

    def __init__(self, config: StudyConfig, slots: int, interval: float = 30.0,
                 before: dict[str, int] | None = None):
        super().__init__(slots, interval)
        self.config = config
        self.before = before or {}

    def render(self, trials: list) -> str:
        # a reporter pickled by a study written before ``before`` existed has none
        counts = group_counts(trials, self.config, getattr(self, "before", None))
        elapsed = time.monotonic() - self.start
        left = estimate_left(counts, self.slots)
        head = f"tune {_duration(elapsed)}"
        head += f", ~{_duration(left)} left" if left is not None else ""
        lines = [f"{head}, {self.slots} slots",
                 "  group     running  done  stopped  failed  to start  best val_acc"]
        for group, e in counts.items():
            best = "—" if math.isnan(e["best"]) else f"{e['best']:.4f}"
            lines.append(f"  {group:<9} {e['running']:>7} {e['done']:>5} {e['stopped']:>8} "
                         f"{e['failed']:>7} {e['to_start']:>9}  {best:>11}")
        return "\n".join(lines)


class RunsProgress(IntervalView):
    """The console view of ``kdsearch reproduce``: one line per group — runs running,
    done, failed, still to start, and the mean test accuracy so far — every ``interval``
    seconds and once at the end::

        reproduce 4m03s, 2 slots
          group     running  done  failed  to start  mean test_acc
          kd              1     3       0         1         0.5120
    """

    def __init__(self, groups: tuple[str, ...], slots: int, interval: float = 30.0):
        super().__init__(slots, interval)
        self.groups = tuple(groups)

    def render(self, trials: list) -> str:
        counts = {g: {"RUNNING": 0, "done": 0, "ERROR": 0, "to start": 0, "acc": []}
                  for g in self.groups}
        for trial in trials:
            entry = counts.get(trial.config.get("run", {}).get("group"))
            if entry is None:
                continue
            acc = (trial.last_result or {}).get("test_acc")
            if acc is not None:
                entry["done"] += 1
                entry["acc"].append(float(acc))
            elif trial.status in ("RUNNING", "ERROR"):
                entry[trial.status] += 1
            else:
                entry["to start"] += 1
        lines = [f"reproduce {_duration(time.monotonic() - self.start)}, {self.slots} slots",
                 "  group     running  done  failed  to start  mean test_acc"]
        for group, e in counts.items():
            mean = f"{sum(e['acc']) / len(e['acc']):.4f}" if e["acc"] else "—"
            lines.append(f"  {group:<9} {e['RUNNING']:>7} {e['done']:>5} {e['ERROR']:>7} "
                         f"{e['to start']:>9}  {mean:>13}")
        return "\n".join(lines)
