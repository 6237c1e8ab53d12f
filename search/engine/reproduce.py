"""``kdsearch reproduce``: each group's best configuration, trained with the same N seeds.

The best configuration of a group is its trial with the highest validation accuracy among
trials that ran the full budget (``analysis.best_configs``: never chosen by a test metric).
The baseline has nothing tuned and runs at the study's defaults. Every (group, seed) run is
one Ray Tune trial — so runs spread over a cluster like the search — that trains with
``kdcore.fit`` (selecting the best validation epoch), then measures test accuracy,
accuracy under corruptions (severities 1-5), parameters, latency and throughput. The driver
writes one ``runs`` row and the ``robustness`` rows of each run as it finishes; a run already
in the table is not repeated, so an interrupted reproduce continues where it stopped.

The teacher is measured once on the same test set (``teacher.json``: test accuracy and loss,
parameters, latency), so the report can put the teacher-student gap next to the groups.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from analysis.constants import SPEED_FILE
from analysis.stats import best_configs
from kdcore.evaluate import evaluate_student
from kdcore.train import fit, image_shape
from search.engine.speed import measure_architectures
from search.engine.trainable import (
    cfg_columns,
    check_models,
    frozen_teacher,
    quiet_normal_stop,
    trial_settings,
    trial_teacher,
)
from search.store import files as fsutil
from search.store.files import RAY_DIR
from search.store.sink import CFG, ParquetSink, read_table
from search.study import (
    StudyConfig,
    check_same_data,
    read_study_json,
    typed,
)


def planned_runs(config: StudyConfig, groups: tuple[str, ...]) -> list[dict[str, Any]]:
    """One entry per (group, seed) still missing from the ``runs`` table."""
    trials = read_table(config.study_dir, "trials")
    best = best_configs(trials, config.max_epochs) if len(trials) else trials
    done = read_table(config.study_dir, "runs")
    done_keys = set(zip(done["group"], done["seed"], strict=True)) if len(done) else set()
    runs = []
    for group in groups:
        params: dict[str, float] = {}
        source = ""
        if config.group_space(group):
            row = best[best["group"] == group] if len(best) else best
            if not len(row):
                raise ValueError(
                    f"group: no finished full-budget trial of {group!r} to reproduce; "
                    "run `kdsearch tune` for it first"
                )
            row = row.iloc[0]
            params = {p: typed(p, row[f"cfg_{p}"]) for p in config.group_space(group)}
            source = str(row["trial_id"])
        for seed in config.reproduce_seeds():
            if (group, seed) not in done_keys:
                runs.append({"group": group, "seed": seed, **params, "source_trial_id": source})
    return runs


RUN_COLUMNS = ("group", "seed", "source_trial_id", "test_acc", "test_loss", "corrupt_acc_mean",
               "params", "latency_ms_bs1", "images_per_s_bs256", "best_val_acc", "best_epoch",
               "epochs_run", "train_seconds", "node", *CFG)


def evaluate_run(
    run: dict[str, Any], study: StudyConfig, data, teacher_state: dict | None = None,
    report: Callable[[dict, dict], None] | None = None,
) -> dict[str, Any]:
    """Train one (group, seed) run and evaluate it, without Ray; ``node`` is left to the caller.

    Returns the flat result ``write_run`` turns into rows (robustness as a JSON string);
    ``report`` is handed to ``fit`` (called after every epoch).
    """
    import torch

    torch.set_num_threads(max(1, int(study.cpus_per_trial)))
    trial = trial_settings(study, run)
    teacher = trial_teacher(study, trial, teacher_state, data)
    t0 = time.monotonic()
    result = fit(trial, data, teacher, report=report)
    evaluation = evaluate_student(result.student, data, study.device, precision=study.precision)
    return {
        "group": trial.group,
        "seed": trial.seed,
        "source_trial_id": run["source_trial_id"],
        **evaluation["metrics"],
        **cfg_columns(trial),
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": time.monotonic() - t0,
        "robustness_json": json.dumps(evaluation["robustness"]),
    }


def reproduce_trial(
    run: dict[str, Any], study: StudyConfig, data, teacher_state: dict | None = None
) -> dict[str, Any]:
    """``evaluate_run`` inside a Ray Tune trial: the result Ray records, with its node."""
    import ray

    result = evaluate_run(run, study, data, teacher_state)
    return {**result, "node": ray.util.get_node_ip_address()}


def write_run(sink: ParquetSink, study: str, result: dict[str, Any]) -> None:
    """Write one finished run's ``runs`` row and its ``robustness`` rows (on the driver)."""
    now = time.time()
    row = {k: result[k] for k in RUN_COLUMNS}
    sink.append("runs", row["group"], [{**row, "study": study, "timestamp": now}])
    robustness = [
        {"study": study, "group": row["group"], "seed": row["seed"], **r, "timestamp": now}
        for r in json.loads(result["robustness_json"])
    ]
    sink.append("robustness", row["group"], robustness)


def teacher_json_path(config: StudyConfig) -> str:
    return fsutil.join(config.study_dir, "teacher.json")


def stored_teacher_evaluation(config: StudyConfig, teacher_hash: str | None) -> dict | None:
    """``teacher.json`` if it measured the teacher with ``teacher_hash``, else None."""
    raw = fsutil.read_bytes(teacher_json_path(config))
    try:
        doc = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # damaged: measured again
    return doc if isinstance(doc, dict) and doc.get("hash") == teacher_hash else None


def evaluate_teacher(config: StudyConfig, data, teacher_state: dict,
                     teacher_hash: str | None) -> dict:
    """Validation and test accuracy, loss, size and speed of the study's teacher; written to
    ``teacher.json``.

    Measured like a student (``evaluate_student``, the study's precision) on the same test
    set, without the corruption sweep.
    """
    from kdcore.evaluate import accuracy

    model = frozen_teacher(config, teacher_state, data.num_classes, image_shape(data))
    metrics = evaluate_student(model, data, config.device, with_robustness=False,
                               precision=config.precision)["metrics"]
    _, val_acc = accuracy(model, data.val_x.to(config.device), data.val_y.to(config.device),
                          data.mean, data.std, precision=config.precision)
    t = config.teacher
    doc = {"hash": teacher_hash, "arch": t.arch, "width": t.width, "cbam": t.cbam,
           "epochs": None if t.checkpoint else t.epochs, "checkpoint": t.checkpoint,
           "val_acc": val_acc, **{k: v for k, v in metrics.items() if k != "corrupt_acc_mean"}}
    fsutil.write_bytes(teacher_json_path(config), json.dumps(doc, indent=2).encode())
    return doc


def _callback(config: StudyConfig):
    from ray.tune import Callback

    class RunsSink(Callback):
        """Writes each finished run's ``runs`` and ``robustness`` rows on the driver."""

        def __init__(self):
            self.sink = ParquetSink(config.study_dir)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "test_acc" in result:
                write_run(self.sink, config.study, result)

    return RunsSink()


def run_reproduce(
    config: StudyConfig, address: str | None = None, groups: tuple[str, ...] | None = None
) -> int:
    """Run every missing (group, seed) of ``config``, measure the teacher on the test set and
    size and speed per architecture; returns how many runs were executed."""
    from search.engine.ray_start import init_ray, quiet_ray
    from search.engine.teacher_task import needs_teacher, prepare_teacher

    groups = groups or config.groups
    runs = planned_runs(config, groups)
    seeds = config.reproduce_seeds()
    print(
        f"reproduce: {len(runs)} runs to do ({len(groups)} groups x seeds {list(seeds)}; "
        "finished runs are kept)",
        flush=True,
    )
    stored = read_study_json(config.storage, config.study) or {}
    measured = (not needs_teacher(config)
                or stored_teacher_evaluation(config, stored.get("teacher_hash")))
    timed = fsutil.exists(fsutil.join(config.study_dir, SPEED_FILE))
    if not runs and measured and timed:
        return 0
    data = config.load_data()
    check_same_data(stored, data.fingerprint, config.data)
    check_models(config, data)  # a bad model or stage: refused before Ray starts
    teacher_state, meta = prepare_teacher(config, data, address)  # a bad file: refused before Ray
    if runs:
        quiet_ray()
        init_ray(config, address)  # a bad address: refused before anything is written
    if teacher_state is not None and not stored_teacher_evaluation(config, meta["teacher_hash"]):
        doc = evaluate_teacher(config, data, teacher_state, meta["teacher_hash"])
        print(f"reproduce: teacher test_acc {doc['test_acc']:.4f} (teacher.json)", flush=True)
    if runs:
        _run_all(config, runs, groups, data, teacher_state)
    # Size and speed once per architecture, interleaved, while no run competes for the CPUs.
    measure_architectures(config, data, teacher_state,
                          threads=max(1, int(config.cpus_per_trial)))
    print(f"reproduce: size and speed per architecture in {SPEED_FILE}", flush=True)
    return len(runs)


def _run_all(config: StudyConfig, runs: list[dict], groups: tuple[str, ...], data,
             teacher_state: dict | None) -> None:
    """Every run of ``runs`` as one Tune trial; rows written as runs finish, then compacted."""
    from ray import tune

    from search.engine.progress import RunsProgress
    from search.engine.ray_start import cluster_slots

    trainable = tune.with_resources(
        tune.with_parameters(_tune_entry, study=config, data=data, teacher_state=teacher_state),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(runs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=config.max_concurrent),
        run_config=tune.RunConfig(
            name=f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=fsutil.join(config.study_dir, RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=2),
            callbacks=[_callback(config)],
            progress_reporter=RunsProgress(groups, cluster_slots(config)),
            verbose=1,
        ),
    )
    results = tuner.fit()
    from search.store.compact import (
        compact_groups,  # the runs are written: one file per table and group
    )

    compact_groups(config.study_dir, groups, ("runs", "robustness"))
    if results.num_errors:
        raise ValueError(
            f"reproduce: {results.num_errors} of {len(runs)} runs failed; "
            "rerun `kdsearch reproduce` to retry them"
        )


def _tune_entry(config: dict, study: StudyConfig, data, teacher_state=None) -> None:
    from ray import tune

    quiet_normal_stop()
    tune.report(reproduce_trial(config["run"], study, data, teacher_state))
