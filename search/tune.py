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
    StudyConfig,
    check_same_data,
    environment_settings,
    load_study_config,
    overrides_from_args,
    read_study_json,
    resolve_study,
    settle,
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

    Token authentication (Ray 2.60; docs/SEARCH.md, "Running on a cluster"): joining, the
    driver presents the token Ray finds (``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and, with ``RAY_AUTH_MODE`` unset, turns
    token mode on for itself (Ray never does for an explicit address; a token-mode driver
    still joins a cluster without authentication). A cluster that refuses the driver is one
    line naming authentication and the fix. A private instance keeps authentication on (its
    GCS and raylet listen on every interface) with the token found, else with a random one
    that only this process's environment holds: nothing is written to ``~/.ray``.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    mode = os.environ.get("RAY_AUTH_MODE")
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    files = [Path(token_path).expanduser()] if token_path else []
    files.append(Path.home() / ".ray" / "auth_token")
    source = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN")
              else next((str(f) for f in files if f.is_file()), None))
    if address:
        _check_reachable(address)
        import sys
        import tempfile

        from ray.exceptions import AuthenticationError

        if mode is None and source:
            os.environ["RAY_AUTH_MODE"] = "token"
            # Private (Ray 2.60): a process reads RAY_AUTH_MODE once, when Ray is imported.
            from ray._raylet import Config

            Config.initialize("")
        failure = None
        sys.stderr.flush()
        saved = os.dup(2)
        # Ray's core prints a warning on fd 2 for every refused connection attempt (about 20
        # in 20 s): held back, and replayed without them once ray.init returns.
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                ray.init(address=address, logging_level="warning")
            except (AuthenticationError, ConnectionError, RuntimeError, ValueError,
                    TimeoutError) as exc:
                failure = exc
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                lines = held.read().decode(errors="replace").splitlines(keepends=True)
                sys.stderr.write("".join(x for x in lines if "InvalidAuthToken" not in x))
                sys.stderr.flush()
        if failure is None:
            return
        chain, exc = [], failure
        while exc is not None and len(chain) < 8:
            chain.append(f"{type(exc).__name__}: {exc}")
            exc = exc.__cause__ or exc.__context__
        if any("AuthenticationError" in c or "InvalidAuthToken" in c for c in chain):
            now = os.environ.get("RAY_AUTH_MODE", "disabled")
            why = (f"RAY_AUTH_MODE={now} here" if now != "token"
                   else f"the cluster refused the token from {source}" if source
                   else "RAY_AUTH_MODE=token but this driver has no token")
            if mode is None and not source:
                why = "this driver has no token"
            raise ValueError(
                f"address: token authentication failed joining Ray at {address} ({why}): give "
                "this driver the cluster's token (the head's ~/.ray/auth_token copied here, or "
                "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and leave RAY_AUTH_MODE unset or "
                "'token' (docs/SEARCH.md, Running on a cluster)") from None
        first = (str(failure).strip().splitlines() or [failure.__class__.__name__])[0]
        raise ValueError(f"address: cannot join Ray at {address}: {first}") from None
    # address="local": never join a cluster that someone else started with `ray start`.
    # Its GCS and raylet listen on every interface, so token authentication stays on (Ray's
    # default for a new local instance). Without a token Ray would write a new one to
    # ~/.ray/auth_token, which then turns authentication on for every later `ray start
    # --head` of this user: a random token in this process's environment instead (the
    # instance's processes inherit it). Only Ray's warning that it turned the default on is
    # kept off the console.
    if mode != "disabled" and source is None:
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
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
    task with a trial's resources (``teacher_task``), started here if needed. A stored study
    loads the teacher its ``study.json`` records (``teacher_hash``, even under a key of an
    older version), else the current key's.
    """
    if not needs_teacher(config):
        return None, {}
    from .teacher_task import describe, load_cached, recorded_hash, train_on_cluster

    cached = cached or load_cached(config, data, recorded_hash(config))
    if cached is None:
        import ray

        quiet_ray()
        init_ray(config, address)
        cluster_slots(config)  # refuses a cluster that cannot run the task at all
        t0 = time.monotonic()
        info = train_on_cluster(config, ray.put(data))
        cached = load_cached(config, data, info.get("hash"))  # the key where it trained
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
               sink: ParquetSink, name: str = EXPERIMENT, started: dict[str, int] | None = None):
    """One ``Tuner`` for every group of ``config`` (see the module docstring), named ``name``.

    ``started``: trials per group that earlier experiments of the study already ran; this one
    runs the rest up to ``samples``.
    """
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .callback import SinkCallback
    from .progress import StudyProgress
    from .scheduler import GroupASHA
    from .searcher import GroupSearcher

    started = started or {}
    _, alive = live_trials(config, slots)
    searcher = ConcurrencyLimiter(GroupSearcher(config, optuna_url, started),
                                  max_concurrent=alive)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=GroupASHA(config),
            num_samples=sum(config.samples - started.get(g, 0) for g in config.groups),
            trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=fsutil.join(config.study_dir, RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[SinkCallback(config, sink)],
            progress_reporter=StudyProgress(config, slots, before=started),
            verbose=1,
        ),
    )


# A study's search is one Tune experiment, ``search``; a search that grew (more ``samples``
# on a stored study) continues in one more experiment per growth, ``search-<samples>``, with
# the same Optuna studies. ``<name>.plan.json`` records how many trials an experiment was
# started for, ``<name>.done.json`` that it finished.


def _marker(config: StudyConfig, name: str, kind: str) -> str:
    return fsutil.join(config.study_dir, RAY_DIR, f"{name}.{kind}.json")


def _read_marker(config: StudyConfig, name: str, kind: str) -> dict | None:
    raw = fsutil.read_bytes(_marker(config, name, kind))
    return json.loads(raw) if raw is not None else None


def _write_marker(config: StudyConfig, name: str, kind: str, doc: dict) -> None:
    fsutil.write_bytes(_marker(config, name, kind), json.dumps(doc).encode())


def unfinished_experiment(config: StudyConfig) -> str | None:
    """The experiment a ``--resume`` continues: one that was started (its folder or its plan
    exists) and never finished; None when every started one finished."""
    names = [EXPERIMENT]
    fs, root = fsutil.resolve(fsutil.join(config.study_dir, RAY_DIR))
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type == pafs.FileType.Directory:
        for info in fs.get_file_info(pafs.FileSelector(root)):
            base = info.base_name
            if base.startswith(f"{EXPERIMENT}-") and base.endswith(".plan.json"):
                names.append(base[: -len(".plan.json")])
    for name in names:
        started = (_read_marker(config, name, "plan") is not None
                   or fsutil.exists(fsutil.join(config.study_dir, RAY_DIR, name)))
        if started and _read_marker(config, name, "done") is None:
            return name
    return None


def trials_per_group(config: StudyConfig) -> dict[str, int]:
    """Trials the ``trials`` table holds per group (each trial once)."""
    trials = read_table(config.study_dir, "trials")
    return {g: int((trials["group"] == g).sum()) if len(trials) else 0 for g in config.groups}


def has_search_results(config: StudyConfig) -> bool:
    """Whether the study already holds a Tune experiment or search rows."""
    if fsutil.exists(fsutil.join(config.study_dir, RAY_DIR)):
        return True
    return any(part_files(config.study_dir, t)[2] for t in ("epochs", "trials"))


def _forget_unsaved_search(config: StudyConfig, sink: ParquetSink, optuna_url: str) -> None:
    """Drop rows and Optuna studies of a first search whose Tune state was never saved."""
    import optuna

    for group in config.groups:
        for table in ("epochs", "trials"):
            sink.drop_group(table, group)
        try:
            optuna.delete_study(study_name=group, storage=optuna_url)
        except KeyError:
            pass


def _fit(config: StudyConfig, tuner, name: str) -> int:
    """Run ``tuner`` to the end and mark experiment ``name`` done (or raise
    KeyboardInterrupt); returns how many worker processes ran its trials."""
    results = tuner.fit()
    planned = (_read_marker(config, name, "plan") or {}).get("trials", len(results))
    if len(results) < planned or results.num_terminated + results.num_errors < len(results):
        raise KeyboardInterrupt("search interrupted; continue with --resume")
    _write_marker(config, name, "done", {
        "groups": list(config.groups), "trials": len(results), "errors": results.num_errors,
        "finished_at": time.time()})
    pids = [r.metrics.get("pid") for r in results if r.metrics]
    return len({p for p in pids if p is not None})


class _GoneCheckpoint(logging.Filter):
    """One line instead of a trace when Tune cannot delete a checkpoint that is already gone.

    After ``--resume`` Tune's record of a trial's checkpoints can predate the interruption;
    the folders it then deletes may have been deleted before it (``num_to_keep``). The new
    checkpoint is registered before the deletion fails, so nothing is lost.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FileNotFoundError) and "Error handling checkpoint" in str(
                record.msg):
            record.msg, record.args, record.exc_info = (
                "%s: an old checkpoint was already deleted before the interruption (harmless)",
                (record.args[0] if record.args else "trial",), None)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_gone_checkpoints() -> None:
    """Install ``_GoneCheckpoint`` on Tune's controller logger (once)."""
    log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _GoneCheckpoint) for f in log.filters):
        log.addFilter(_GoneCheckpoint())


def run_search(config: StudyConfig, trainable, resume: bool, slots: int, optuna_url: str
               ) -> int | None:
    """Run (or continue) the study's search until every group has ``samples`` trials.

    Returns the number of worker processes the last experiment used (None when there was
    nothing to run). An interrupted experiment continues first (``--resume``); then, while a
    group has fewer trials than ``samples`` (the study grew), one more experiment runs them.
    Optuna is then made to agree with the ``trials`` table (``searcher.reconcile``).
    """
    from ray import tune

    from .callback import SinkCallback
    from .searcher import reconcile

    quiet_gone_checkpoints()
    sink = ParquetSink(config.study_dir)
    workers = None
    name = unfinished_experiment(config)
    if name is not None and resume:
        exp_path = fsutil.join(config.study_dir, RAY_DIR, name)
        if tune.Tuner.can_restore(exp_path):
            print(f"resuming {exp_path}", flush=True)
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
            # The restored RunConfig carries the pickled callback; point it at this study's sink.
            local = getattr(tuner, "_local_tuner", None)
            for cb in (local.get_run_config().callbacks or []) if local else []:
                if isinstance(cb, SinkCallback):
                    cb.sink, cb.study = sink, config
            workers = _fit(config, tuner, name)
        elif name == EXPERIMENT:
            _forget_unsaved_search(config, sink, optuna_url)
        # An extension whose state was never saved wrote no rows (Tune saves its state at the
        # end of its first step, before any result); its Optuna trials are orphans (reconcile).
    counts = trials_per_group(config)
    if any(counts[g] < config.samples for g in config.groups):
        name = EXPERIMENT if not any(counts.values()) else f"{EXPERIMENT}-{config.samples}"
        if any(counts.values()):
            grow = ", ".join(f"{g} {counts[g]} -> {config.samples}" for g in config.groups)
            print(f"search grows: {grow} trials", flush=True)
        tuner = make_tuner(config, trainable, slots, optuna_url, sink, name, counts)
        _write_marker(config, name, "plan", {
            "trials": sum(config.samples - counts[g] for g in config.groups),
            "samples": config.samples, "started": counts})
        workers = _fit(config, tuner, name)
    elif workers is None and name is None:
        print("search already finished: skipped", flush=True)
    compact_search_tables(config)
    fixed = reconcile(config, optuna_url, read_table(config.study_dir, "trials"))
    if fixed:
        print(f"optuna: {fixed} trials brought in line with the trials table", flush=True)
    return workers


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
        settle(stored, config.to_dict())  # refuses a change to what was measured
    elif has_search_results(config):
        raise ValueError(f"study: {config.study!r} already has search results in "
                         f"{config.study_dir}; pass --resume to continue it, or another --study")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)  # fail fast, before the data is decoded
    data = config.load_data()
    check_same_data(stored if resume else None, data.fingerprint, config.data)
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
    workers = run_search(config, trainable, resume, slots, url)
    summary = summarize(config)
    summary["wall_seconds"] = time.monotonic() - t0
    summary["slots"] = slots
    if workers is not None:
        summary["worker_processes"] = workers
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
    """``kdsearch tune``: resolve the study config, run the search, print the summary.

    With ``--resume`` a stored study keeps its settings: what the flags, ``--config`` or
    ``--preset`` give is checked against ``study.json`` (``study.settle``).
    """
    if args.resume:
        config, _ = resolve_study(args)
    else:
        config = load_study_config(args.preset, args.config, overrides_from_args(args),
                                   environment_settings())
    summary = run_tune(config, resume=bool(args.resume), address=args.address,
                       optuna_storage=args.optuna_storage)
    print_summary(summary)
    return 0
