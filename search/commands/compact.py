"""``kdsearch compact``: merge a study's part files into one file per table and group."""

from __future__ import annotations

import time

from search.store.compact import MIN_AGE_S, compact_study
from search.store.files import existing_study


def cmd_compact(args) -> int:
    """``kdsearch compact --study S``: compact every partition older than the margin."""
    study_dir = existing_study(args.storage, args.study)
    min_age = getattr(args, "min_age", None)
    min_age = MIN_AGE_S if min_age is None else float(min_age)
    if min_age < 0:
        raise ValueError(f"--min-age: {min_age} must be >= 0 seconds")
    t0 = time.monotonic()
    done = compact_study(study_dir, min_age)
    for item in done:
        print(item.line(), flush=True)
    merged = sum(d.merged for d in done)
    print(f"compact: {study_dir}: {merged} files merged into "
          f"{sum(1 for d in done if d.merged)} in {time.monotonic() - t0:.1f}s "
          f"(files newer than {min_age:g}s are left for a later run)", flush=True)
    return 0
