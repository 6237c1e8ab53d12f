"""``kdsearch run`` (teacher -> tune -> reproduce -> analyze) and ``kdsearch analyze``.

``run`` is resumable: the teacher comes from its cache, a group whose search finished is
skipped, a (group, seed) already in the ``runs`` table is not trained again, and the report
is rewritten from the tables at the end.
"""

from __future__ import annotations

import time

from . import fsutil
from .reproduce import resolve_study, run_reproduce
from .study import StudyConfig, check_study_name, read_study_json
from .tune import print_summary, run_tune


def _stage(name: str, t_start: float) -> None:
    print(f"\n=== {name} (t+{time.monotonic() - t_start:.0f}s) ===", flush=True)


def run_pipeline(config: StudyConfig, address: str | None = None) -> str:
    """All four stages for ``config``; returns the path of the written report."""
    from analysis import write_report

    t0 = time.monotonic()
    resume = read_study_json(config.storage, config.study) is not None
    _stage(
        f"tune: study {config.study} in {config.study_dir}" + (" (continuing)" if resume else ""),
        t0,
    )
    print_summary(run_tune(config, resume=resume, address=address))
    _stage("reproduce", t0)
    run_reproduce(config, address)
    _stage("analyze", t0)
    report = write_report(config.study_dir)
    print(f"\nreport: {report}  (total {time.monotonic() - t0:.0f}s)", flush=True)
    return str(report)


def cmd_run(args) -> int:
    run_pipeline(resolve_study(args), args.address)
    return 0


def cmd_analyze(args) -> int:
    from analysis import export_comparison, write_report

    if not args.study:
        raise ValueError("--study: required")
    check_study_name(args.study)
    study_dir = fsutil.join(args.storage, args.study)
    if read_study_json(args.storage, args.study) is None:
        raise ValueError(f"study: no study.json in {study_dir}")
    if args.format in ("csv", "json"):
        print(export_comparison(study_dir, args.format))
        return 0
    print(f"report: {write_report(study_dir, args.out)}")
    return 0
