"""``kdsearch reproduce``: each group's best configuration trained with the study's seeds
(``search.engine.reproduce``)."""

from __future__ import annotations

from search.engine.reproduce import run_reproduce
from search.study import (
    resolve_study,
)
from search.study.stored import record_if_changed


def cmd_reproduce(args) -> int:
    """``kdsearch reproduce``: the stored study with the settings given now (``--seeds`` may
    grow it; ``study.settle``), recorded in ``study.json``, then every missing run."""
    config, stored = resolve_study(args, ignore=("groups",))  # --group filters, not a setting
    if stored is None:
        raise ValueError(
            f"study: {config.study!r} has no study.json under {config.storage}; "
            "run `kdsearch tune` first"
        )
    record_if_changed(config, stored)
    groups = None if args.group in (None, "all") else (args.group,)
    n = run_reproduce(config, args.address, groups)
    print(f"reproduce: {n} runs written to {config.study_dir}/runs", flush=True)
    return 0
