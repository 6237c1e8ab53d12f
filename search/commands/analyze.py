"""``kdsearch analyze``: the study's report from its tables alone.

Light on purpose: this module imports neither torch, Ray, ``kdcore`` nor ``search.study.config``
(which imports ``kdcore``), so a report — or a refusal of bad input — takes no longer than
reading the tables and drawing the figures.
"""

from __future__ import annotations

from search.store.files import existing_study


def cmd_analyze(args) -> int:
    study_dir = existing_study(args.storage, args.study)
    versus = args.versus
    if versus is not None:
        if args.format != "md":
            raise ValueError("--versus: only with --format md (the report)")
        if versus == args.study:
            raise ValueError("--versus: a study compared with itself")
        try:
            versus = existing_study(args.storage, versus)
        except ValueError as err:
            raise ValueError(f"--versus: {err}") from None
    from analysis import export_comparison, write_report

    if args.format in ("csv", "json"):
        print(export_comparison(study_dir, args.format))
        return 0
    print(f"report: {write_report(study_dir, args.out, versus=versus)}")
    return 0
