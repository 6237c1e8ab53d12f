"""``kdsearch tune``: every group of a study searched at once in one Ray Tune experiment.

One ``Tuner`` runs all groups: ``GroupSearcher`` (one Optuna TPE study per group, in an RDB
storage) proposes the trials, ``GroupASHA`` (one ASHA per group) stops weak ones, and a
``ConcurrencyLimiter`` keeps the number of live trials at the study's slots plus a few
queued ones, so a finished trial's worker process is handed to a queued trial instead of a
new process being started (``reuse_actors=True``). The dataset and the teacher's weights go
into Ray's object store once and are fetched once per worker process
(``trainable.SharedInputs``). The teacher trains as a Ray task with a trial's resources
(``teacher_task``). The driver's ``SinkCallback`` writes the ``epochs`` and ``trials``
tables; ``--resume`` restores the experiment with ``Tuner.restore``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from kdcore.config import GROUP_TERMS

from . import fsutil
from .sink import STATUSES, ParquetSink, part_files, read_table
from .study import (
    RUNTIME_FIELDS,
    StudyConfig,
    config_from_study_json,
    environment_settings,
    load_study_config,
    overrides_from_args,
    read_study_json,
    write_study_json,
)

RAY_DIR = "ray"
EXPERIMENT = "search"  # <study>/ray/search: the Tune experiment of all groups


# ---------------------------------------------------------------------------------------------
# Ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a one-line ValueError when ``host:port`` accepts no connection."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address: expected HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(f"address: cannot reach a Ray cluster at {address} ({exc})") from None


def quiet_ray() -> None:
    """Our own progress view instead of Ray's result dumps; no per-trial warnings."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(config: StudyConfig, address: str | None = None, num_cpus: int | None = None
             ) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a private Ray here.

    ``num_cpus`` sets the logical CPU slots of a private instance (default: this machine's
    cores; ``kdsearch bench --scheduler`` simulates more).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise ValueError(f"address: cannot join Ray at {address}: {first}") from None
        return
    # address="local": never join a cluster that someone else started with `ray start`.
    # Token authentication stays on (Ray's default for a new local instance); only Ray's
    # warning that it turned that default on is kept off the console.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 dashboard_host="127.0.0.1", logging_level="warning")
    finally:
        notice.setLevel(level)


def cluster_slots(config: StudyConfig) -> int:
    """How many trials the cluster can run at once with the study's per-trial resources."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    slots = math.floor(cpus / config.cpus_per_trial + 1e-9)
    if config.gpus_per_trial > 0:
        slots = min(slots, math.floor(gpus / config.gpus_per_trial + 1e-9))
    if slots < 1:
        raise ValueError(f"resources: the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, not "
                         f"enough for one trial ({config.cpus_per_trial:g} CPUs, "
                         f"{config.gpus_per_trial:g} GPUs)")
    return slots


def live_trials(config: StudyConfig, slots: int) -> tuple[int, int]:
    """(trials running at most, trials alive at most: running plus queued).

    With every slot in use, a few trials wait in the queue: when a trial ends, Tune hands its
    worker process to a queued trial rather than stopping it and starting a new one.
    """
    running = min(config.max_concurrent or slots, slots)
    queued = max(1, running // 4) if running >= slots else 0
    return running, running + queued


def optuna_storage_url(config: StudyConfig, url: str | None = None) -> str:
    """``url``, else SQLite at ``<study>/optuna.db`` (URI storage: a local cache file)."""
    if url:
        return url
    if fsutil.is_uri(config.storage):
        from kdcore.data import _cache_dir

        path = _cache_dir() / "optuna" / f"{config.study}.db"
    else:
        path = Path(config.study_dir) / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


# ---------------------------------------------------------------------------------------------
# The teacher


def needs_teacher(config: StudyConfig) -> bool:
    return any(t != "ce" for g in config.groups for t in GROUP_TERMS[g])


def prepare_teacher(config: StudyConfig, data, address: str | None = None,
                    cached: tuple[dict, dict] | None = None) -> tuple[dict | None, dict]:
    """The study's teacher ``(state_dict, metadata)``: from storage, else trained on the cluster.

    Loading happens before Ray starts (a bad file is refused in one line); training is a Ray
    task with a trial's resources (``teacher_task``), started here if needed.
    """
    if not needs_teacher(config):
        return None, {}
    from .teacher_task import describe, load_cached, train_on_cluster

    cached = cached or load_cached(config, data)
    if cached is None:
        import ray

        quiet_ray()
        init_ray(config, address)
        cluster_slots(config)  # refuses a cluster that cannot run the task at all
        t0 = time.monotonic()
        info = train_on_cluster(config, ray.put(data))
        cached = load_cached(config, data)
        where = (f"trained on {info['node']} in {time.monotonic() - t0:.0f}s" if info["trained"]
                 else "trained meanwhile by another study")
        print(describe(cached[1], where), flush=True)
    else:
        print(describe(cached[1], "from storage"), flush=True)
    state, meta = cached
    return state, {"teacher_hash": meta.get("hash"), "teacher_val_acc": meta.get("val_acc")}


# ---------------------------------------------------------------------------------------------
# The search


def trial_dirname(trial) -> str:
    """Short trial directory names (Ray's default spells out every parameter)."""
    return f"trial_{trial.trial_id}"


def make_tuner(config: StudyConfig, trainable, slots: int, optuna_url: str,
               sink: ParquetSink):
    """One ``Tuner`` for every group of ``config`` (see the module docstring)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .callback import SinkCallback
    from .progress import StudyProgress
    from .scheduler import GroupASHA
    from .searcher import GroupSearcher

    _, alive = live_trials(config, slots)
    searcher = ConcurrencyLimiter(GroupSearcher(config, optuna_url), max_concurrent=alive)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=GroupASHA(config),
            num_samples=config.samples * len(config.groups),
            trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=fsutil.join(config.study_dir, RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[SinkCallback(config, sink)],
            progress_reporter=StudyProgress(config, slots),
            verbose=1,
        ),
    )


def _done_marker(config: StudyConfig) -> str:
    return fsutil.join(config.study_dir, RAY_DIR, f"{EXPERIMENT}.done.json")


def has_search_results(config: StudyConfig) -> bool:
    """Whether the study already holds a Tune experiment or search rows."""
    if fsutil.exists(fsutil.join(config.study_dir, RAY_DIR)):
        return True
    return any(part_files(config.study_dir, t)[2] for t in ("epochs", "trials"))


def check_resumable(config: StudyConfig, stored: dict[str, Any]) -> None:
    """A resumed study keeps its stored settings (resources and device may change)."""
    saved = config_from_study_json(stored).to_dict()
    for key, value in config.to_dict().items():
        if key in RUNTIME_FIELDS:
            continue
        if json.dumps(value, sort_keys=True) != json.dumps(saved.get(key), sort_keys=True):
            raise ValueError(f"{key}: {value!r} differs from the resumed study's "
                             f"{saved.get(key)!r} (a study keeps its settings)")


def _forget_unsaved_search(config: StudyConfig, sink: ParquetSink, optuna_url: str) -> None:
    """Drop rows and Optuna studies of a search whose Tune state was never saved."""
    import optuna

    for group in config.groups:
        for table in ("epochs", "trials"):
            sink.drop_group(table, group)
        try:
            optuna.delete_study(study_name=group, storage=optuna_url)
        except KeyError:
            pass


def run_search(config: StudyConfig, trainable, resume: bool, slots: int, optuna_url: str):
    """Run (or continue) the study's search; returns Tune's ``ResultGrid`` (None if done)."""
    from ray import tune

    from .callback import SinkCallback

    sink = ParquetSink(config.study_dir)
    exp_path = fsutil.join(config.study_dir, RAY_DIR, EXPERIMENT)
    if fsutil.exists(_done_marker(config)):
        print("search already finished: skipped", flush=True)
        return None
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"resuming {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        # The restored RunConfig carries the pickled callback; point it at this study's sink.
        local = getattr(tuner, "_local_tuner", None)
        for cb in (local.get_run_config().callbacks or []) if local else []:
            if isinstance(cb, SinkCallback):
                cb.sink, cb.study = sink, config
    else:
        if resume:
            _forget_unsaved_search(config, sink, optuna_url)
        tuner = make_tuner(config, trainable, slots, optuna_url, sink)
    results = tuner.fit()
    finished = (len(results) >= config.samples * len(config.groups)
                and results.num_terminated + results.num_errors == len(results))
    if not finished:
        raise KeyboardInterrupt("search interrupted; continue with --resume")
    compact_search_tables(config)
    fsutil.write_bytes(_done_marker(config), json.dumps(
        {"groups": list(config.groups), "trials": len(results), "errors": results.num_errors,
         "finished_at": time.time()}).encode())
    return results


def compact_search_tables(config: StudyConfig) -> None:
    """Merge each group's epoch and trial part files into one file per table and group."""
    from .compact import compact_group

    for group in config.groups:
        compact_group(config.study_dir, group, tables=("epochs", "trials"))


def run_tune(config: StudyConfig, resume: bool = False, address: str | None = None,
             optuna_storage: str | None = None, simulate: float | None = None,
             num_cpus: int | None = None) -> dict:
    """Search every group of ``config``; returns the per-group summary (see ``summarize``).

    ``simulate`` (seconds per epoch) runs sleeping trials with synthetic learning curves
    instead of training, and ``num_cpus`` sets the slots of a private Ray instance: together
    they make ``kdsearch bench --scheduler``.
    """
    fsutil.check_storage(config.storage)
    stored = read_study_json(config.storage, config.study)
    if resume and stored is not None:
        check_resumable(config, stored)
    elif has_search_results(config):
        raise ValueError(f"study: {config.study!r} already has search results in "
                         f"{config.study_dir}; pass --resume to continue it, or another --study")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)  # fail fast, before the data is decoded
    data = config.load_data()
    if stored and resume and stored.get("data_fingerprint") not in (None, data.fingerprint):
        raise ValueError(f"data: {config.data!r} is not the dataset the study started with "
                         f"(fingerprint {data.fingerprint} != {stored['data_fingerprint']})")
    cached = None
    if needs_teacher(config) and not simulate:
        from .teacher_task import load_cached

        cached = load_cached(config, data)  # a bad teacher file is refused before Ray starts
    quiet_ray()
    init_ray(config, address, num_cpus)
    import ray
    from ray import tune

    from .trainable import SharedInputs, train_trial

    slots = cluster_slots(config)
    teacher_state, teacher_meta = (None, {}) if simulate else prepare_teacher(
        config, data, address, cached)
    write_study_json(config, data_fingerprint=data.fingerprint, data_spec=data.spec,
                     **teacher_meta)
    inputs = SharedInputs(data=ray.put(data),
                          teacher_state=ray.put(teacher_state) if teacher_state else None,
                          simulate=simulate)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, study=config, inputs=inputs),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    running, alive = live_trials(config, slots)
    url = optuna_storage_url(config, optuna_storage)
    print(f"search: {len(config.groups)} groups x {config.samples} trials on {slots} slots "
          f"({running} running at most, {alive - running} queued); Optuna storage {url}",
          flush=True)
    t0 = time.monotonic()
    results = run_search(config, trainable, resume, slots, url)
    summary = summarize(config)
    summary["wall_seconds"] = time.monotonic() - t0
    summary["slots"] = slots
    if results is not None:
        pids = [r.metrics.get("pid") for r in results if r.metrics]
        summary["worker_processes"] = len({p for p in pids if p is not None})
    return summary


def summarize(config: StudyConfig) -> dict:
    """Per group: trial counts by status and the best configuration, chosen by the rule the
    report and ``reproduce`` use (``analysis.best_configs``: full-budget trials only)."""
    from analysis.stats import best_configs

    trials = read_table(config.study_dir, "trials")
    best = best_configs(trials, config.max_epochs) if len(trials) else trials
    out: dict[str, Any] = {"study": config.study, "groups": {}}
    for group in config.groups:
        sub = trials[trials["group"] == group] if not trials.empty else trials
        counts = {s: int((sub["status"] == s).sum()) for s in STATUSES} if len(sub) else {}
        entry: dict[str, Any] = {"trials": len(sub), "status": counts}
        row = best[best["group"] == group] if len(best) else best
        if len(row):
            row = row.iloc[0]
            entry["best"] = {
                "trial_id": row["trial_id"], "val_acc": float(row["best_val_acc"]),
                "epoch": int(row["best_epoch"]),
                "config": {**{p: float(row[f"cfg_{p}"]) for p in config.group_space(group)},
                           "seed": int(row["seed"])},
            }
        out["groups"][group] = entry
    return out


def print_summary(summary: dict) -> None:
    print(f"\nstudy {summary['study']}: search summary", flush=True)
    for group, entry in summary["groups"].items():
        counts = ", ".join(f"{n} {s}" for s, n in entry["status"].items() if n) or "no trials"
        line = f"  {group:<9} {entry['trials']:>3} trials ({counts})"
        if "best" in entry:
            b = entry["best"]
            cfg = " ".join(f"{k}={v:.4g}" for k, v in b["config"].items())
            line += f"; best full-budget val_acc {b['val_acc']:.4f} (epoch {b['epoch']}, {cfg})"
        print(line, flush=True)


def cmd_tune(args) -> int:
    """``kdsearch tune``: resolve the study config, run the search, print the summary."""
    overrides = overrides_from_args(args)
    environment = environment_settings()
    stored = None
    if args.resume:
        where = {"study": overrides["study"], "storage": overrides["storage"]}
        base = load_study_config(args.preset, args.config, where, environment)
        stored = read_study_json(base.storage, base.study)
    if stored is not None:
        config = config_from_study_json(stored, {**overrides, "storage": base.storage})
        for key, value in overrides.items():
            if value is None or key in RUNTIME_FIELDS or key == "study":
                continue
            if key == "groups":
                if value not in ("all", *stored["groups"]) or (
                        value != "all" and len(stored["groups"]) > 1):
                    raise ValueError(f"--group {value}: a resumed study searches all its "
                                     f"groups {stored['groups']} together")
            elif value != stored.get(key):
                flag = "epochs" if key == "max_epochs" else key.replace("_", "-")
                raise ValueError(f"--{flag}: {value!r} differs from the resumed "
                                 f"study's {stored.get(key)!r} (a study keeps its settings)")
    else:
        config = load_study_config(args.preset, args.config, overrides, environment)
    summary = run_tune(config, resume=bool(args.resume), address=args.address,
                       optuna_storage=args.optuna_storage)
    print_summary(summary)
    return 0
