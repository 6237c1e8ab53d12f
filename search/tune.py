"""``kdsearch tune``: one Ray Tune ``Tuner`` per group (OptunaSearch TPE + ASHA).

The dataset and the teacher's weights go into Ray's object store once
(``tune.with_parameters``); every trial reports each epoch with a checkpoint; the driver's
``SinkCallback`` writes the ``epochs`` and ``trials`` tables. ``--resume`` restores each
unfinished group's experiment with ``Tuner.restore`` and skips finished groups.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from typing import Any

from kdcore.config import GROUP_TERMS

from . import fsutil
from .sink import STATUSES, ParquetSink, part_files, read_table
from .study import (
    RUNTIME_FIELDS,
    StudyConfig,
    config_from_study_json,
    load_study_config,
    overrides_from_args,
    read_study_json,
    write_study_json,
)

RAY_DIR = "ray"


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
    """Ray's legacy status table (``make_reporter``) instead of a result dump per trial."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(config: StudyConfig, address: str | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start Ray on this machine."""
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
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             dashboard_host="127.0.0.1", logging_level="warning")


# ---------------------------------------------------------------------------------------------
# Search pieces


def make_searcher(config: StudyConfig, group: str):
    """OptunaSearch (multivariate TPE, seeded) over the group's parameters, concurrency-limited."""
    import optuna
    from optuna.distributions import FloatDistribution
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space = {p: FloatDistribution(r.low, r.high, log=r.log, step=r.step)
             for p, r in config.group_space(group).items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True,
                                             seed=config.seed)
    search = OptunaSearch(space=space, metric="val_acc", mode="max", sampler=sampler)
    return ConcurrencyLimiter(search, max_concurrent=config.max_concurrent)


def make_scheduler(config: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max",
                         max_t=config.max_epochs, grace_period=config.grace_period,
                         reduction_factor=config.reduction_factor)


def trial_dirname(trial) -> str:
    """Short trial directory names (Ray's default spells out every parameter)."""
    return f"trial_{trial.trial_id}"


def make_reporter(config: StudyConfig, group: str):
    """A compact status table: parameters, epoch, val_acc, best val_acc; every 30 s at most."""
    from ray.tune import CLIReporter

    return CLIReporter(
        parameter_columns=list(config.group_space(group)) or ["seed"],
        metric_columns={"epoch": "epoch", "val_acc": "val_acc", "best_val_acc": "best"},
        max_report_frequency=30, max_progress_rows=12, metric="val_acc", mode="max",
        sort_by_metric=True,
    )


def make_tuner(config: StudyConfig, group: str, trainable, sink: ParquetSink):
    """A fresh ``Tuner`` for one group. The baseline has nothing to tune: it runs ``samples``
    seeds at the default settings, without a searcher and without ASHA."""
    from ray import tune

    from .callback import SinkCallback

    run_config = tune.RunConfig(
        name=group,
        storage_path=fsutil.join(config.study_dir, RAY_DIR),
        failure_config=tune.FailureConfig(max_failures=2),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[SinkCallback(config, group, sink)],
        progress_reporter=make_reporter(config, group),
        verbose=1,
    )
    if group == "baseline":
        seeds = list(range(config.seed, config.seed + config.samples))
        return tune.Tuner(
            trainable, param_space={"group": group, "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=config.max_concurrent,
                                        trial_dirname_creator=trial_dirname, reuse_actors=True),
            run_config=run_config,
        )
    return tune.Tuner(
        trainable, param_space={"group": group},
        tune_config=tune.TuneConfig(search_alg=make_searcher(config, group),
                                    scheduler=make_scheduler(config), num_samples=config.samples,
                                    trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=run_config,
    )


def prepare_teacher(config: StudyConfig, data) -> tuple[dict | None, dict]:
    """Train or load the study's teacher once, on the driver; (state_dict, metadata)."""
    if not any(t != "ce" for g in config.groups for t in GROUP_TERMS[g]):
        return None, {}
    from kdcore.teacher import get_teacher

    def progress(metrics: dict, state: dict) -> None:
        print(f"teacher epoch {metrics['epoch']}/{config.teacher.epochs}: "
              f"val_acc {metrics['val_acc']:.4f} ({metrics['epoch_seconds']:.1f}s)", flush=True)

    import torch

    cached = (config.teacher_cache / f"teacher-{config.teacher.content_hash(data)}.pt").exists()
    if not cached and config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: the teacher trains on this machine (the driver), which has no "
                         f"CUDA; run the driver on a GPU node or copy a trained teacher into "
                         f"{config.teacher_cache}")
    # As many threads as a trial gets: on a shared CPU more threads than free cores make
    # OpenMP spin and can be 10x slower (measured on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.cpus_per_trial)))
    t0 = time.monotonic()
    try:
        model, digest, meta = get_teacher(config.teacher, data, config.teacher_cache,
                                          report=progress)
    finally:
        torch.set_num_threads(threads)
    print(f"teacher {digest}: val_acc {meta.get('val_acc', math.nan):.4f} "
          f"({time.monotonic() - t0:.1f}s, cache {config.teacher_cache})", flush=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, {"teacher_hash": digest, "teacher_val_acc": meta.get("val_acc")}


# ---------------------------------------------------------------------------------------------
# Running a study


def _done_marker(config: StudyConfig, group: str) -> str:
    return fsutil.join(config.study_dir, RAY_DIR, f"{group}.done.json")


def has_search_results(config: StudyConfig) -> bool:
    """Whether the study already holds Tune experiments or search rows."""
    if fsutil.exists(fsutil.join(config.study_dir, RAY_DIR)):
        return True
    return any(part_files(config.study_dir, t)[2] for t in ("epochs", "trials"))


def check_resumable(config: StudyConfig, stored: dict[str, Any]) -> None:
    """A resumed study keeps its stored settings (resources, device and groups may change)."""
    saved = config_from_study_json(stored).to_dict()
    for key, value in config.to_dict().items():
        if key in RUNTIME_FIELDS or key == "groups":
            continue
        if json.dumps(value, sort_keys=True) != json.dumps(saved.get(key), sort_keys=True):
            raise ValueError(f"{key}: {value!r} differs from the resumed study's "
                             f"{saved.get(key)!r} (a study keeps its settings)")


def run_group(config: StudyConfig, group: str, trainable, resume: bool) -> bool:
    """Run (or continue) one group's search; True when every trial has finished."""
    from ray import tune

    from .callback import SinkCallback

    sink = ParquetSink(config.study_dir)
    exp_path = fsutil.join(config.study_dir, RAY_DIR, group)
    if fsutil.exists(_done_marker(config, group)):
        print(f"[{group}] already finished: skipped", flush=True)
        return True
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"[{group}] resuming {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        # The restored RunConfig carries the pickled callback; point it at this study's sink.
        local = getattr(tuner, "_local_tuner", None)
        for cb in (local.get_run_config().callbacks or []) if local else []:
            if isinstance(cb, SinkCallback):
                cb.sink, cb.study = sink, config
    else:
        if resume:  # rows of a search that never saved its state cannot be continued
            for table in ("epochs", "trials"):
                sink.drop_group(table, group)
        tuner = make_tuner(config, group, trainable, sink)
    results = tuner.fit()
    expected = config.samples
    finished = (len(results) >= expected
                and results.num_terminated + results.num_errors == len(results))
    if finished:
        fsutil.write_bytes(_done_marker(config, group), json.dumps(
            {"group": group, "trials": len(results), "errors": results.num_errors,
             "finished_at": time.time()}).encode())
    return finished


def run_tune(config: StudyConfig, resume: bool = False, address: str | None = None) -> dict:
    """Search every group of ``config``; returns the per-group summary (see ``summarize``)."""
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
    # The teacher is read (or trained) before Ray starts: a bad teacher file is refused in one
    # line, without starting (and printing from) a Ray instance.
    teacher_state, teacher_meta = prepare_teacher(config, data)
    quiet_ray()
    init_ray(config, address)
    from ray import tune

    from .trainable import train_trial

    write_study_json(config, data_fingerprint=data.fingerprint, data_spec=data.spec,
                     **teacher_meta)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, study=config, data=data, teacher_state=teacher_state),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    t0 = time.monotonic()
    for group in config.groups:
        if not run_group(config, group, trainable, resume):
            raise KeyboardInterrupt(f"search of {group!r} interrupted; continue with --resume")
    summary = summarize(config)
    summary["wall_seconds"] = time.monotonic() - t0
    return summary


def summarize(config: StudyConfig) -> dict:
    """Per group: trial counts by status, best val_acc, its trial and configuration."""
    trials = read_table(config.study_dir, "trials")
    out: dict[str, Any] = {"study": config.study, "groups": {}}
    for group in config.groups:
        sub = trials[trials["group"] == group] if not trials.empty else trials
        counts = {s: int((sub["status"] == s).sum()) for s in STATUSES} if len(sub) else {}
        entry: dict[str, Any] = {"trials": len(sub), "status": counts}
        usable = sub[sub["status"].isin(("completed", "asha_stopped", "early_stopped"))]
        usable = usable[usable["best_val_acc"].notna()] if len(usable) else usable
        if len(usable):
            best = usable.loc[usable["best_val_acc"].idxmax()]
            entry["best"] = {
                "trial_id": best["trial_id"], "val_acc": float(best["best_val_acc"]),
                "epoch": int(best["best_epoch"]),
                "config": {**{p: float(best[f"cfg_{p}"]) for p in config.group_space(group)},
                           "seed": int(best["seed"])},
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
            line += f"; best val_acc {b['val_acc']:.4f} (epoch {b['epoch']}, {cfg})"
        print(line, flush=True)


def cmd_tune(args) -> int:
    """``kdsearch tune``: resolve the study config, run the search, print the summary."""
    overrides = overrides_from_args(args)
    stored = None
    if args.resume:
        where = {"study": overrides["study"], "storage": overrides["storage"]}
        base = load_study_config(args.preset, args.config, where)
        stored = read_study_json(base.storage, base.study)
    if stored is not None:
        config = config_from_study_json(stored, {**overrides, "storage": base.storage})
        for key, value in overrides.items():
            if value is None or key in RUNTIME_FIELDS or key == "study":
                continue
            if key == "groups":
                groups = stored["groups"] if value == "all" else [value]
                if not set(groups) <= set(stored["groups"]):
                    raise ValueError(f"--group {value}: not a group of this study")
                config = StudyConfig.from_dict({**config.to_dict(), "groups": groups})
            elif value != stored.get(key):
                flag = "epochs" if key == "max_epochs" else key.replace("_", "-")
                raise ValueError(f"--{flag}: {value!r} differs from the resumed "
                                 f"study's {stored.get(key)!r} (a study keeps its settings)")
    else:
        config = load_study_config(args.preset, args.config, overrides)
    summary = run_tune(config, resume=bool(args.resume), address=args.address)
    print_summary(summary)
    return 0
