"""The Ray Tune function trainable: one trial = one ``kdcore.fit`` with per-epoch reports.

Each epoch reports fit's metrics plus ``attempt``, ``node``, ``seed``, the trial's ``cfg_*``
values, ``epochs_run``, ``best_val_acc``/``best_epoch`` (highest validation accuracy so far)
and ``wall_seconds``, with a checkpoint directory holding ``state.pt`` (fit's resumable
state saved with ``torch.save``). A restarted trial loads that state and continues;
``attempt`` is 1 for a fresh start and grows by one with every restore.

A diverged trial (``DivergedError``) is not an error to Ray: the trainable reports one last
result with ``diverged=True``, ``val_acc=0.0`` and the message in ``error``, then returns.
So Ray does not retry it (it would diverge again), Optuna is told a worst-possible value,
and the sink records a ``diverged`` trial whose ``epochs_run`` counts the finished epochs.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcore.config import GROUP_TERMS, TrialConfig
from kdcore.data import Dataset
from kdcore.features import Size
from kdcore.teacher import build_teacher, load_weights
from kdcore.train import DivergedError, best_epoch_of, fit, image_shape
from search.engine.simulated import simulated_fit
from search.study import PARAMS, StudyConfig, typed

STATE_FILE = "state.pt"


def cfg_columns(config: TrialConfig) -> dict[str, Any]:
    """The ``cfg_*`` columns of a trial: every searchable value it actually trains with."""
    return {f"cfg_{p}": typed(p, getattr(config, p)) for p in PARAMS}


def trial_settings(study: StudyConfig, config: dict[str, Any]) -> TrialConfig:
    """The ``TrialConfig`` of a Tune trial config ``{"group", "seed"?, <params>}``."""
    params = {k: config[k] for k in PARAMS if k in config}
    return study.trial_config(config["group"], params, int(config.get("seed", study.seed)))


def best_of(history: list[dict]) -> tuple[float, int]:
    """(val_acc, epoch) of fit's best epoch (``kdcore.train.best_epoch_of``); (NaN, 0) if none."""
    best = best_epoch_of(history)
    if best is None:
        return math.nan, 0
    return float(best["val_acc"]), int(best["epoch"])


def usable_checkpoint(checkpoint):
    """Tune's checkpoint, or where it is gone, the newest one beside it that holds a state.

    A driver killed after a trial wrote newer checkpoints, and before Tune saved its own
    state, restores the trial from the checkpoint that state names; Tune may meanwhile have
    deleted it (it keeps ``num_to_keep``). The newer ones of the same trial continue it
    exactly (training is deterministic given the state), so the newest existing one is used.
    """
    import pyarrow.fs as pafs
    from ray import tune

    fs, path = checkpoint.filesystem, checkpoint.path
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return checkpoint
    parent = posixpath.dirname(path.rstrip("/"))
    found = [i.path for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
             if i.base_name.startswith("checkpoint_")
             and fs.get_file_info(posixpath.join(i.path, STATE_FILE)).type == pafs.FileType.File]
    return tune.Checkpoint(max(found), filesystem=fs) if found else None


def _restore() -> tuple[dict | None, int, float]:
    """(fit state, attempt, wall seconds so far) from Tune's checkpoint, if any."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint = usable_checkpoint(checkpoint)
    if checkpoint is None:
        return None, 1, 0.0
    with checkpoint.as_directory() as d:
        blob = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    return blob["state"], int(blob["attempt"]) + 1, float(blob["wall_seconds"])


def teacher_stages(study: StudyConfig) -> tuple[tuple[str, ...] | None, int]:
    """(stages, count) the study's teacher is built with (``kdcore.teacher.build_teacher``):
    None when no group distils features, else its stage setting for the trials."""
    if not any(t in ("at", "fa") for g in study.groups for t in GROUP_TERMS[g]):
        return None, 0
    trial = study.trial_config(study.groups[-1], {}, study.seed)  # the stages of every group
    return trial.given_stages("teacher"), trial.auto_count("teacher")


def frozen_teacher(study: StudyConfig, state: dict, num_classes: int,
                   image_size: Size = 32) -> torch.nn.Module:
    """The study's teacher with weights ``state`` (its classifier's state dict), in eval mode,
    no parameter requiring grad; ``image_size`` is the data's (``kdcore.features``)."""
    stages, count = teacher_stages(study)
    model = build_teacher(study.teacher, num_classes, image_size, stages, count or 3)
    return load_weights(model, state, "the study's teacher", study.teacher.arch)


def check_models(study: StudyConfig, data: Dataset) -> tuple[tuple[str, str], ...]:
    """Build the study's student and teacher once, on the driver, before anything runs.

    A spec that cannot be built, a stage a model does not have or stage lists that do not
    pair up is a ``ValueError`` here rather than in every trial. Returns the stage pairs AT
    and FA use (empty when no group distils features).
    """
    from kdcore.objective import stage_pairs
    from kdcore.train import build_student, needs_features

    stages, count = teacher_stages(study)
    group = next((g for g in study.groups if "at" in GROUP_TERMS[g] or "fa" in GROUP_TERMS[g]),
                 study.groups[0])
    trial = study.trial_config(group, {}, study.seed)
    student = build_student(trial, data.num_classes, image_shape(data))
    if not any(t != "ce" for g in study.groups for t in GROUP_TERMS[g]):
        return ()
    teacher = build_teacher(study.teacher, data.num_classes, image_shape(data), stages,
                            count or 3)
    return stage_pairs(trial, student, teacher) if needs_features(trial) else ()


def trial_teacher(study: StudyConfig, config: TrialConfig, state: dict | None,
                  data: Dataset) -> torch.nn.Module | None:
    """The frozen teacher of one trial or run, None when its group needs none."""
    if not config.needs_teacher:
        return None
    if state is None:
        raise ValueError(f"teacher: group {config.group!r} needs a teacher, none was given")
    return frozen_teacher(study, state, data.num_classes, image_shape(data))


@dataclass(frozen=True)
class SharedInputs:
    """What every trial of a study shares, as refs into Ray's object store.

    A worker process fetches each ref once (``fetch_shared``) and keeps the result for every
    later trial it runs (Tune reuses the process), so the dataset and the teacher reach a
    worker once, not once per trial. ``simulate`` (seconds per epoch) replaces training by a
    sleeping stand-in with a synthetic learning curve (``kdsearch bench --scheduler``).
    """

    data: Any  # ObjectRef of a kdcore Dataset
    teacher_state: Any = None  # ObjectRef of the teacher's state_dict, or None
    simulate: float | None = None


# Per worker process: the key (ref ids) of the inputs held, the dataset, the built teacher,
# and how many trials this process has run with them.
_FETCHED: dict[str, Any] = {}


def fetch_shared(inputs: SharedInputs, study: StudyConfig,
                 ) -> tuple[Dataset, torch.nn.Module | None]:
    """(dataset, frozen teacher or None) of ``inputs``, fetched once per worker process."""
    import ray

    key = (inputs.data.hex(), inputs.teacher_state.hex() if inputs.teacher_state else "")
    if _FETCHED.get("key") != key:
        _FETCHED.clear()  # another study's inputs: drop the old ones
        data = ray.get(inputs.data)
        teacher = None
        if inputs.teacher_state is not None:
            teacher = frozen_teacher(study, ray.get(inputs.teacher_state), data.num_classes,
                                     image_shape(data))
        _FETCHED.update(key=key, data=data, teacher=teacher, fetches=0)
    _FETCHED["fetches"] += 1
    return _FETCHED["data"], _FETCHED["teacher"]


def quiet_normal_stop() -> None:
    """Do not print a trace when Ray stops this worker process normally.

    Tune ends an idle worker with SIGTERM; Ray's handler raises ``SystemExit``, and when that
    lands inside a weakref callback Python prints it as an "Exception ignored" trace. Only
    that case is dropped; every other unraisable exception is still printed.
    """
    if getattr(sys.unraisablehook, "kdsearch", False):
        return
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    hook.kdsearch = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def train_trial(config: dict[str, Any], study: StudyConfig, inputs: SharedInputs) -> None:
    """Run one trial (``study`` and ``inputs`` come via ``tune.with_parameters``)."""
    import ray
    from ray import tune

    quiet_normal_stop()

    torch.set_num_threads(max(1, int(study.cpus_per_trial)))
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial = trial_settings(study, config)
    data, teacher = fetch_shared(inputs, study)
    if trial.needs_teacher and teacher is None and not inputs.simulate:
        raise ValueError(f"teacher: group {trial.group!r} needs a teacher, none was given")
    teacher = teacher if trial.needs_teacher else None
    state, attempt, wall_before = _restore()
    start = time.monotonic()
    static = {"attempt": attempt, "node": ray.util.get_node_ip_address(), "seed": trial.seed,
              "pid": os.getpid(), "process_trials": _FETCHED["fetches"], **cfg_columns(trial)}
    last: dict[str, Any] = {"history": state["history"] if state else []}

    def summary(history: list[dict], epochs_run: int) -> dict[str, Any]:
        best_acc, best_epoch = best_of(history)
        return {**static, "epochs_run": epochs_run, "best_val_acc": best_acc,
                "best_epoch": best_epoch, "wall_seconds": wall_before + time.monotonic() - start}

    def report(metrics: dict, fit_state: dict) -> None:
        last["history"] = fit_state["history"]
        out = {**metrics, **summary(fit_state["history"], metrics["epoch"]), "diverged": False}
        with tempfile.TemporaryDirectory(prefix="kdsearch-ckpt-") as d:
            torch.save({"state": fit_state, "attempt": attempt,
                        "wall_seconds": out["wall_seconds"]}, Path(d) / STATE_FILE)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
        last["reported"] = True

    try:
        if inputs.simulate:
            simulated_fit(trial, inputs.simulate, report=report, checkpoint=state)
        else:
            fit(trial, data, teacher, report=report, checkpoint=state)
    except DivergedError as exc:
        history = last["history"]
        tune.report({**summary(history, len(history)), "epoch": exc.epoch, "val_acc": 0.0,
                     "diverged": True, "error": str(exc), "early_stopped": False})
        return
    if not last.get("reported") and state is not None and state["history"]:
        # Restored from the trial's final checkpoint: fit had nothing left to run, so repeat
        # its last result (marked ``replayed``: the sink writes no epoch row for it).
        history = state["history"]
        tune.report({**history[-1], **summary(history, len(history)), "diverged": False,
                     "replayed": True})
