"""The search experiment: every group of a study in one Ray Tune experiment, resumable.

One ``Tuner`` runs all groups: ``GroupSearcher`` (one Optuna study per group, in an RDB
storage) proposes the trials, ``GroupScheduler`` (one trial scheduler per group: ASHA,
Hyperband, the median rule or none) stops weak ones, and a
``ConcurrencyLimiter`` keeps the number of live trials at the study's slots plus a few
queued ones, so a finished trial's worker process is handed to a queued trial instead of a
new process being started (``reuse_actors=True``). The driver's ``SinkCallback`` writes the
``epochs`` and ``trials`` tables; ``--resume`` restores the experiment with
``Tuner.restore``. A search that grew continues in one more experiment (below).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from search.engine.ray_start import live_trials
from search.store import files as fsutil
from search.store.files import RAY_DIR
from search.store.sink import ParquetSink, part_files, read_table
from search.study import (
    StudyConfig,
)

EXPERIMENT = "search"  # <study>/ray/search: the Tune experiment of all groups


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


def trial_dirname(trial) -> str:
    """Short trial directory names (Ray's default spells out every parameter)."""
    return f"trial_{trial.trial_id}"


def make_tuner(config: StudyConfig, trainable, slots: int, optuna_url: str,
               sink: ParquetSink, name: str = EXPERIMENT, started: dict[str, int] | None = None,
               callbacks: list | None = None, searched: float = 0.0):
    """One ``Tuner`` for every group of ``config`` (see the module docstring), named ``name``.

    ``started``: trials per group that earlier experiments of the study already ran; this one
    runs the rest up to ``samples``. ``callbacks``: more Tune callbacks after the sink's
    (``search.engine.tracking``). ``searched``: seconds those experiments searched (the
    time budget counts them).
    """
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search.engine.algorithms import make_scheduler
    from search.engine.callback import SinkCallback
    from search.engine.progress import StudyProgress
    from search.engine.scheduler import GroupScheduler
    from search.engine.searcher import GroupSearcher

    started = started or {}
    _, alive = live_trials(config, slots)
    searcher = ConcurrencyLimiter(GroupSearcher(config, optuna_url, started, searched),
                                  max_concurrent=alive)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=GroupScheduler(config, make_scheduler),
            num_samples=sum(config.samples - started.get(g, 0) for g in config.groups),
            trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=fsutil.join(config.study_dir, RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[SinkCallback(config, sink), *(callbacks or [])],
            progress_reporter=StudyProgress(config, slots, before=started),
            verbose=1,
        ),
    )




# A study's search is one Tune experiment, ``search``; a search that grew (more ``samples``
# on a stored study, or a longer ``time_budget``) continues in one more experiment per
# growth, ``search-<samples>`` (``-2``, ``-3`` … when that name is taken), with the same
# Optuna studies. ``<name>.plan.json`` records how many trials an experiment was started
# for, ``<name>.done.json`` that it finished, with the study's search seconds by then
# (``search_seconds``) and whether its time budget ended it (``budget_reached``).


def _marker(config: StudyConfig, name: str, kind: str) -> str:
    return fsutil.join(config.study_dir, RAY_DIR, f"{name}.{kind}.json")


def _read_marker(config: StudyConfig, name: str, kind: str) -> dict | None:
    raw = fsutil.read_bytes(_marker(config, name, kind))
    return json.loads(raw) if raw is not None else None


def _write_marker(config: StudyConfig, name: str, kind: str, doc: dict) -> None:
    fsutil.write_bytes(_marker(config, name, kind), json.dumps(doc).encode())


def experiment_names(config: StudyConfig) -> list[str]:
    """``search`` and every experiment a growth planned (``search-*.plan.json``)."""
    names = [EXPERIMENT]
    fs, root = fsutil.resolve(fsutil.join(config.study_dir, RAY_DIR))
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type == pafs.FileType.Directory:
        for info in fs.get_file_info(pafs.FileSelector(root)):
            base = info.base_name
            if base.startswith(f"{EXPERIMENT}-") and base.endswith(".plan.json"):
                names.append(base[: -len(".plan.json")])
    return names


def _started(config: StudyConfig, name: str) -> bool:
    return (_read_marker(config, name, "plan") is not None
            or fsutil.exists(fsutil.join(config.study_dir, RAY_DIR, name)))


def unfinished_experiment(config: StudyConfig) -> str | None:
    """The experiment a ``--resume`` continues: one that was started (its folder or its plan
    exists) and never finished; None when every started one finished."""
    for name in experiment_names(config):
        if _started(config, name) and _read_marker(config, name, "done") is None:
            return name
    return None


def searched_seconds(config: StudyConfig) -> float:
    """Seconds the study's finished experiments searched (what its time budget counts)."""
    done = [_read_marker(config, n, "done") or {} for n in experiment_names(config)]
    return max((float(d.get("search_seconds", 0.0)) for d in done), default=0.0)


def budget_spent(config: StudyConfig) -> bool:
    """Whether the study has a time budget and its finished experiments used it up."""
    return config.time_budget is not None and searched_seconds(config) >= config.time_budget


def _new_name(config: StudyConfig, counts: dict[str, int]) -> str:
    """The next experiment's name: ``search`` first, then ``search-<samples>[-k]``; the
    first not done (one started whose state was never saved is started again)."""
    names = [] if any(counts.values()) else [EXPERIMENT]
    names += [f"{EXPERIMENT}-{config.samples}"] + [
        f"{EXPERIMENT}-{config.samples}-{k}" for k in range(2, 1000)]
    return next(n for n in names if _read_marker(config, n, "done") is None)


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
    searcher = _group_searcher(tuner)
    clock = {} if searcher is None else {"search_seconds": searcher.search_seconds(),
                                         "budget_reached": searcher.budget_reached}
    planned = (_read_marker(config, name, "plan") or {}).get("trials", len(results))
    short = len(results) < planned and not clock.get("budget_reached")
    if short or results.num_terminated + results.num_errors < len(results):
        raise KeyboardInterrupt("search interrupted; continue with --resume")
    _write_marker(config, name, "done", {
        "groups": list(config.groups), "trials": len(results), "errors": results.num_errors,
        "finished_at": time.time(), **clock})
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


def repoint(tuner, config: StudyConfig, sink: ParquetSink, optuna_url: str) -> None:
    """Point a restored experiment's pickled callback and searcher at this study as it is
    now: its sink, its settings, its Optuna storage (a study that moved keeps working)."""
    from search.engine.callback import SinkCallback
    from search.engine.private_api import restored_parts

    callbacks, _ = restored_parts(tuner)
    for cb in callbacks:
        if isinstance(cb, SinkCallback):
            cb.sink, cb.study = sink, config
    searcher = _group_searcher(tuner)
    if searcher is not None:
        searcher.config, searcher.optuna_storage = config, optuna_url
        searcher._store, searcher._studies, searcher._trials = None, {}, {}


def _group_searcher(tuner):
    """The ``GroupSearcher`` a ``tuner`` (new or restored) runs with, or None."""
    from search.engine.private_api import restored_parts
    from search.engine.searcher import GroupSearcher

    search_alg = restored_parts(tuner)[1]
    searcher = getattr(search_alg, "searcher", search_alg)  # inside the ConcurrencyLimiter
    return searcher if isinstance(searcher, GroupSearcher) else None


def run_search(config: StudyConfig, trainable, resume: bool, slots: int, optuna_url: str,
               callbacks: list | None = None) -> int | None:
    """Run (or continue) the study's search until every group has ``samples`` trials.

    Returns the number of worker processes the last experiment used (None when there was
    nothing to run). An interrupted experiment continues first (``--resume``); then, while a
    group has fewer trials than ``samples`` (the study grew) and the time budget is not
    spent, one more experiment runs them.
    Optuna is then made to agree with the ``trials`` table (``searcher.reconcile``).
    ``callbacks`` go to a new experiment's ``make_tuner``; a restored one keeps its own.
    """
    from ray import tune

    from search.engine.searcher import reconcile

    quiet_gone_checkpoints()
    sink = ParquetSink(config.study_dir)
    workers = None
    name = unfinished_experiment(config)
    if name is not None and resume:
        exp_path = fsutil.join(config.study_dir, RAY_DIR, name)
        if tune.Tuner.can_restore(exp_path):
            print(f"resuming {exp_path}", flush=True)
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
            repoint(tuner, config, sink, optuna_url)
            workers = _fit(config, tuner, name)
        elif name == EXPERIMENT:
            _forget_unsaved_search(config, sink, optuna_url)
        # An extension whose state was never saved wrote no rows (Tune saves its state at the
        # end of its first step, before any result); its Optuna trials are orphans (reconcile).
    counts = trials_per_group(config)
    short = any(counts[g] < config.samples for g in config.groups)
    if short and budget_spent(config):
        print(f"search stopped by its time budget: {searched_seconds(config):.0f} s of "
              f"{config.time_budget:.0f} s searched, no more trials start (a larger "
              "--time-budget continues it)", flush=True)
    elif short:
        name = _new_name(config, counts)
        if any(counts.values()):
            grow = ", ".join(f"{g} {counts[g]} -> {config.samples}" for g in config.groups)
            print(f"search grows: {grow} trials", flush=True)
        tuner = make_tuner(config, trainable, slots, optuna_url, sink, name, counts, callbacks,
                           searched=searched_seconds(config))
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
    from search.store.compact import compact_group

    for group in config.groups:
        compact_group(config.study_dir, group, tables=("epochs", "trials"))
