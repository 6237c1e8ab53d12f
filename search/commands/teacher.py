"""``kdsearch teacher``: the study's teacher, trained once (or loaded from the cache)."""

from __future__ import annotations


def cmd_teacher(args) -> int:
    """Train the study's teacher once (or load it from the cache) and print where it is."""
    from search.engine.teacher_task import prepare_teacher
    from search.study import resolve_study

    config, _ = resolve_study(args)
    data = config.load_data()
    _, meta = prepare_teacher(config, data, args.address)
    if not meta:
        print("teacher: no group of this study needs a teacher")
    return 0
