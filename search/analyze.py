"""``kdsearch analyze``: the study's report from its tables alone.

Light on purpose: this module imports neither torch, Ray, ``kdcore`` nor ``search.study``
(which imports ``kdcore``), so a report — or a refusal of bad input — takes no longer than
reading the tables and drawing the figures.
"""

from __future__ import annotations

from . import fsutil


def existing_study(storage: str, study: str | None) -> str:
    """The location of an existing study (one with a ``study.json``); bad input raises
    ``ValueError`` naming the flag."""
    if not study:
        raise ValueError("--study: required")
    fsutil.check_study_name(study)
    study_dir = fsutil.join(storage, study)
    if not fsutil.exists(fsutil.join(study_dir, "study.json")):
        raise ValueError(f"study: no study.json in {study_dir}")
    return study_dir


def cmd_analyze(args) -> int:
    study_dir = existing_study(args.storage, args.study)
    from analysis import export_comparison, write_report

    if args.format in ("csv", "json"):
        print(export_comparison(study_dir, args.format))
        return 0
    print(f"report: {write_report(study_dir, args.out)}")
    return 0
