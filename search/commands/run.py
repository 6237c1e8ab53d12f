"""``kdsearch run`` (teacher -> tune -> reproduce -> analyze) and ``kdsearch analyze``.

``run`` is resumable: the teacher comes from its cache, a group whose search finished is
skipped, a (group, seed) already in the ``runs`` table is not trained again, and the report
is rewritten from the tables at the end.
"""

from __future__ import annotations

import time

from search.commands.tune import print_summary, run_tune, tracking_from_args
from search.engine.reproduce import run_reproduce
from search.study import StudyConfig, read_study_json, record_if_changed, resolve_study


def _stage(name: str, t_start: float) -> None:
    print(f"\n=== {name} (t+{time.monotonic() - t_start:.0f}s) ===", flush=True)


def run_pipeline(config: StudyConfig, address: str | None = None,
                 optuna_storage: str | None = None, callbacks: list | None = None) -> str:
    """All four stages for ``config``; returns the path of the written report.

    ``callbacks``: more Tune callbacks for the search stage (``--log``)."""
    from analysis import write_report

    t0 = time.monotonic()
    resume = read_study_json(config.storage, config.study) is not None
    _stage(
        f"tune: study {config.study} in {config.study_dir}" + (" (continuing)" if resume else ""),
        t0,
    )
    print_summary(run_tune(config, resume=resume, address=address,
                           optuna_storage=optuna_storage, callbacks=callbacks))
    _stage("reproduce", t0)
    run_reproduce(config, address)
    _stage("analyze", t0)
    report = write_report(config.study_dir)
    print(f"\nreport: {report}  (total {time.monotonic() - t0:.0f}s)", flush=True)
    return str(report)


def cmd_run(args) -> int:
    """``kdsearch run``: a stored study continues with the settings given now (more samples
    or seeds grow it; ``study.settle``), else a new one starts."""
    config, stored = resolve_study(args)
    callbacks = tracking_from_args(config, args)  # before anything runs: a missing mlflow
    if stored is not None:
        record_if_changed(config, stored)
    run_pipeline(config, args.address, args.optuna_storage, callbacks)
    return 0
