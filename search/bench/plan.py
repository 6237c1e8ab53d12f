"""The mini-study's plan: how many epochs and concurrent runs fit a time budget, from the
throughput ``kdsearch bench --json`` measured (``plan_study``), teacher included."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from kdcore.config import GROUP_TERMS, GROUPS

N_CORRUPTED = 35  # evaluate_student: 7 corruptions x 5 severities, each over the test set
# Estimates the bench does not measure (replace them once a device run has timed a study):
INFER_PER_TRAIN = 3.0  # inference images/s per training images/s of the same model
RUN_OVERHEAD_S = 6.0  # per run: model build, first-step autotuning, speed() timing
TEACHER_SHARE = 0.35  # most of the budget the teacher may take
CBAM_SLOWDOWN = 1.3  # the bench's ResNet-50 row has no CBAM; the teacher has


@dataclass(frozen=True)
class Sizes:
    """Images per split: the paper's 45,000 / 5,000 / 10,000 by default."""

    train: int = 45000
    val: int = 5000
    test: int = 10000


@dataclass(frozen=True)
class Plan:
    k: int
    epochs: int
    teacher_epochs: int
    est_teacher_s: float
    est_runs_s: float
    run_s: dict[str, float]  # estimated seconds of one run per group at this K and epochs
    rates: dict[str, float]  # images/s per group (K = 1), "teacher", and "speedup_K" entries


def bench_rates(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Throughputs the plan needs, from ``kdsearch bench --json`` rows (device feed only).

    ``<group>``: one process's training images/s with the ResNet-18 student; ``teacher``: the
    ResNet-50 student's (baseline group); ``speedup_<K>``: total images/s of K processes over
    one process's, for the group measured both ways.
    """
    device = [r for r in rows if r.get("feed") == "device" and "images_per_s" in r]
    single = [r for r in device if int(r.get("concurrent", 1)) == 1 and not r.get("compile")]
    rates = {r["group"]: float(r["images_per_s"]) for r in single
             if r.get("student", "resnet18") == "resnet18"}
    for r in single:
        if r.get("student") == "resnet50" and r["group"] == "baseline":
            rates["teacher"] = float(r["images_per_s"]) / CBAM_SLOWDOWN
    for r in device:
        k = int(r.get("concurrent", 1))
        if k > 1 and r["group"] in rates and not r.get("compile"):
            rates[f"speedup_{k}"] = float(r["images_per_s"]) / rates[r["group"]]
    return rates


def makespan(durations: list[float], k: int) -> float:
    """Finishing time of ``durations`` on ``k`` slots, longest first (what the queue does)."""
    slots = [0.0] * k
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(slots, slots[0] + d)
    return max(slots)


def plan_study(rates: dict[str, float], budget_s: float, groups: tuple[str, ...] = GROUPS,
               seeds: int = 2, sizes: Sizes = Sizes(), max_epochs: int = 30,
               k_choices: tuple[int, ...] = (1, 2, 4)) -> Plan:
    """The largest student epoch count (then the fastest K) that fits ``budget_s``.

    The teacher gets as many epochs as fit in ``TEACHER_SHARE`` of the budget (at least 1,
    at most ``max_epochs``). A run of group g at K processes trains at
    ``rate[g] * speedup_K / K`` images/s and infers ``INFER_PER_TRAIN`` times faster than
    its group's training rate (validation each epoch, then the test set clean and under 35
    corruptions), plus ``RUN_OVERHEAD_S``. Where nothing fits, 1 epoch at the fastest K.
    A group without a bench row is planned at the slowest measured group's rate.
    """
    measured = [rates[g] for g in GROUPS if g in rates]
    if not measured:
        raise ValueError("bench: no single-process device-feed row to plan from")
    rates = {**{g: min(measured) for g in groups}, **rates}  # a group not measured: the slowest
    teacher_rate = rates.get("teacher", rates["baseline"] / 3)
    teacher_epoch_s = sizes.train / teacher_rate + sizes.val / (INFER_PER_TRAIN * teacher_rate)
    teacher_epochs = int(min(max_epochs, max(1, TEACHER_SHARE * budget_s // teacher_epoch_s)))
    if not any(GROUP_TERMS[g] != ("ce",) for g in groups):
        teacher_epochs = 0
    est_teacher = teacher_epochs * teacher_epoch_s
    ks = [k for k in k_choices if k == 1 or f"speedup_{k}" in rates]

    def runs_at(k: int, epochs: int) -> dict[str, float]:
        share = rates.get(f"speedup_{k}", 1.0) / k
        out = {}
        for g in groups:
            train, infer = rates[g] * share, rates[g] * share * INFER_PER_TRAIN
            out[g] = (epochs * (sizes.train / train + sizes.val / infer)
                      + sizes.test * (1 + N_CORRUPTED) / infer + RUN_OVERHEAD_S)
        return out

    def total(k: int, epochs: int) -> float:
        per_group = runs_at(k, epochs)
        return makespan([per_group[g] for g in groups for _ in range(seeds)], k)

    epochs, k = 1, min(ks, key=lambda k_: total(k_, 1))
    for e in range(max_epochs, 0, -1):
        fitting = [k_ for k_ in ks if est_teacher + total(k_, e) <= budget_s]
        if fitting:
            epochs, k = e, min(fitting, key=lambda k_: total(k_, e))
            break
    return Plan(k=k, epochs=epochs, teacher_epochs=teacher_epochs, est_teacher_s=est_teacher,
                est_runs_s=total(k, epochs), run_s=runs_at(k, epochs), rates=dict(rates))
