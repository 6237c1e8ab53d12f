"""``kdsearch tune``: every group of a study searched at once (``search.engine.experiment``).

The dataset and the teacher's weights go into Ray's object store once and are fetched once
per worker process (``trainable.SharedInputs``). The teacher trains as a Ray task with a
trial's resources (``engine.teacher_task``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from search.engine.experiment import (
    budget_spent,
    has_search_results,
    optuna_storage_url,
    run_search,
    searched_seconds,
)
from search.engine.ray_start import check_reachable, cluster_slots, init_ray, live_trials, quiet_ray
from search.engine.teacher_task import needs_teacher, prepare_teacher
from search.store import files as fsutil
from search.store.sink import STATUSES, read_table
from search.study import (
    StudyConfig,
    check_same_data,
    environment_settings,
    load_study_config,
    overrides_from_args,
    read_study_json,
    resolve_study,
    settle,
    typed,
    write_study_json,
)


def run_tune(config: StudyConfig, resume: bool = False, address: str | None = None,
             optuna_storage: str | None = None, simulate: float | None = None,
             num_cpus: int | None = None, callbacks: list | None = None) -> dict:
    """Search every group of ``config``; returns the per-group summary (see ``summarize``).

    ``callbacks``: more Tune callbacks for the search (``search.engine.tracking``: ``--log``).

    ``simulate`` (seconds per epoch) runs sleeping trials with synthetic learning curves
    instead of training, and ``num_cpus`` sets the slots of a private Ray instance: together
    they make ``kdsearch bench --scheduler``.
    """
    fsutil.check_storage(config.storage)
    stored = read_study_json(config.storage, config.study)
    if resume and stored is not None:
        settle(stored, config.to_dict())  # refuses a change to what was measured
    elif has_search_results(config):
        raise ValueError(f"study: {config.study!r} already has search results in "
                         f"{config.study_dir}; pass --resume to continue it, or another --study")
    if config.warm_start and not has_search_results(config):
        from search.engine.warm_start import plan_lines

        for line in plan_lines(config):  # a missing study or a refused value: before Ray
            print(line, flush=True)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)  # fail fast, before the data is decoded
    data = config.load_data()
    check_same_data(stored if resume else None, data.fingerprint, config.data)
    if not simulate:
        from search.engine.trainable import check_models

        pairs = check_models(config, data)  # a bad model or stage is refused before Ray starts
        if pairs:
            print("distilled stages (student <- teacher): "
                  + ", ".join(f"{s} <- {t}" for s, t in pairs), flush=True)
    cached = None
    if needs_teacher(config) and not simulate:
        from search.engine.teacher_task import load_cached

        cached = load_cached(config, data)  # a bad teacher file is refused before Ray starts
    quiet_ray()
    init_ray(config, address, num_cpus)
    import ray
    from ray import tune

    from search.engine.private_api import restoring_trainable
    from search.engine.trainable import SharedInputs, train_trial, usable_checkpoint

    slots = cluster_slots(config)
    teacher_state, teacher_meta = (None, {}) if simulate else prepare_teacher(
        config, data, address, cached)
    write_study_json(config, data_fingerprint=data.fingerprint, data_spec=data.spec,
                     data_classes=list(data.classes), group_spaces=group_spaces(config),
                     **teacher_meta)
    inputs = SharedInputs(data=ray.put(data),
                          teacher_state=ray.put(teacher_state) if teacher_state else None,
                          simulate=simulate)
    # Resources on the function (Tune's class wrapper would rename the worker processes).
    trainable = restoring_trainable(tune.with_resources(
        tune.with_parameters(train_trial, study=config, inputs=inputs),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}), usable_checkpoint)
    running, alive = live_trials(config, slots)
    url = optuna_storage_url(config, optuna_storage)
    print(f"search: {len(config.groups)} groups x {config.samples} trials on {slots} slots "
          f"({running} running at most, {alive - running} queued); Optuna storage {url}",
          flush=True)
    if callbacks:
        from search.engine.tracking import print_tracking

        print_tracking(callbacks)
    t0 = time.monotonic()
    workers = run_search(config, trainable, resume, slots, url, callbacks)
    summary = summarize(config)
    summary["wall_seconds"] = time.monotonic() - t0
    summary["slots"] = slots
    if workers is not None:
        summary["worker_processes"] = workers
    return summary


def group_spaces(config: StudyConfig) -> dict[str, dict]:
    """Each group's search ranges as plain values (``study.json``: the analysis reads them)."""
    return {g: {p: r.to_dict() for p, r in config.group_space(g).items()} for g in config.groups}


def summarize(config: StudyConfig) -> dict:
    """Per group: trial counts by status and the best configuration, chosen by the rule the
    report and ``reproduce`` use (``analysis.best_configs``: full-budget trials only)."""
    from analysis.stats import best_configs, proposal_counts

    trials = read_table(config.study_dir, "trials")
    best = best_configs(trials, config.max_epochs) if len(trials) else trials
    proposals = proposal_counts(trials)
    short = any(int((trials["group"] == g).sum()) < config.samples if len(trials) else True
                for g in config.groups)
    out: dict[str, Any] = {
        "study": config.study, "groups": {}, "time_budget": config.time_budget,
        "search_seconds": searched_seconds(config),
        "stopped_by_time_budget": short and budget_spent(config)}
    for group in config.groups:
        sub = trials[trials["group"] == group] if not trials.empty else trials
        counts = {s: int((sub["status"] == s).sum()) for s in STATUSES} if len(sub) else {}
        entry: dict[str, Any] = {"trials": len(sub), "status": counts}
        if group in proposals:
            entry["proposals"] = proposals[group]
        row = best[best["group"] == group] if len(best) else best
        if len(row):
            row = row.iloc[0]
            entry["best"] = {
                "trial_id": row["trial_id"], "val_acc": float(row["best_val_acc"]),
                "epoch": int(row["best_epoch"]),
                "config": {**{p: typed(p, row[f"cfg_{p}"]) for p in config.group_space(group)},
                           "seed": int(row["seed"])},
            }
        out["groups"][group] = entry
    return out


def print_summary(summary: dict) -> None:
    from analysis.stats import proposal_words

    print(f"\nstudy {summary['study']}: search summary", flush=True)
    if summary.get("stopped_by_time_budget"):
        print(f"  stopped by its time budget of {summary['time_budget']:.0f} s (searched "
              f"{summary['search_seconds']:.0f} s): no trial started after it", flush=True)
    for group, entry in summary["groups"].items():
        counts = ", ".join(f"{n} {s}" for s, n in entry["status"].items() if n) or "no trials"
        line = f"  {group:<9} {entry['trials']:>3} trials ({counts})"
        if "best" in entry:
            b = entry["best"]
            cfg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in b["config"].items())
            line += f"; best full-budget val_acc {b['val_acc']:.4f} (epoch {b['epoch']}, {cfg})"
        print(line, flush=True)
        if entry.get("proposals"):
            print(f"  {'':<9} proposals: {proposal_words(entry['proposals'])}", flush=True)


def cmd_tune(args) -> int:
    """``kdsearch tune``: resolve the study config, run the search, print the summary.

    With ``--resume`` a stored study keeps its settings: what the flags, ``--config`` or
    ``--preset`` give is checked against ``study.json`` (``study.settle``).
    """
    if args.resume:
        config, _ = resolve_study(args)
    else:
        config = load_study_config(args.preset, args.config, overrides_from_args(args),
                                   environment_settings())
    callbacks = tracking_from_args(config, args)  # before Ray starts: a missing mlflow
    summary = run_tune(config, resume=bool(args.resume), address=args.address,
                       optuna_storage=args.optuna_storage, callbacks=callbacks)
    print_summary(summary)
    return 0


def tracking_from_args(config: StudyConfig, args) -> list:
    """The Tune callbacks of ``--log`` and ``--mlflow-uri`` (which implies ``--log mlflow``);
    runtime options: not study settings, not in ``study.json``."""
    logs = list(getattr(args, "log", None) or [])
    uri = getattr(args, "mlflow_uri", None)
    if uri and "mlflow" not in logs:
        logs.append("mlflow")
    if not logs:
        return []
    from search.engine.tracking import tracking_callbacks

    return tracking_callbacks(config, logs, uri)
