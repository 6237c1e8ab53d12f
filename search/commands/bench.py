"""``kdsearch bench``: images/s of one training step per group (``kdcore.bench``), no Ray.

``--scheduler``, ``--search`` and ``--tables`` are the benchmarks of ``search.bench``."""

from __future__ import annotations

import itertools
import json
import math
import os


def bench_precisions(flag: str, device: str) -> list[str]:
    """The resolved precisions of ``--precision`` (comma-separated), duplicates dropped."""
    from kdcore.precision import PRECISIONS, resolve_precision

    names = [p.strip() for p in flag.split(",") if p.strip()]
    if not names or not set(names) <= set(PRECISIONS):
        raise ValueError(f"--precision: expected a list of {', '.join(PRECISIONS)}, got {flag!r}")
    return list(dict.fromkeys(resolve_precision(p, device) for p in names))


def cmd_bench(args) -> int:
    """Print images/s of each group's training step for the device and DataLoader feeds."""
    if args.scheduler:
        from search.bench.scheduler import cmd_bench_scheduler

        return cmd_bench_scheduler(args)
    if args.search:
        from search.bench.search_efficiency import cmd_bench_search

        return cmd_bench_search(args)
    if args.tables is not None:
        from search.bench.tables import cmd_bench_tables

        return cmd_bench_tables(args)
    import torch

    from kdcore import load_data
    from kdcore.bench import BenchSpec, run_bench, run_concurrent

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch <= 0 or args.steps <= 0 or args.concurrent <= 0:
        raise ValueError("--batch, --steps and --concurrent must be > 0")
    feeds = [f for f in args.feeds.split(",") if f]
    precisions = bench_precisions(args.precision, args.device)
    groups = ["baseline", "kd", "fa", "at", "combined"] if args.group == "all" else [args.group]
    # The benchmark measures speed only: a synthetic set of CIFAR-sized images unless --data is set.
    spec = args.data if "KDSEARCH_DATA" in os.environ or args.data != "cifar10" else "synthetic:100"
    data = load_data(spec, val_size=10)
    header = False
    for group, feed, precision in itertools.product(groups, feeds, precisions):
        bench = BenchSpec(
            group=group,
            feed=feed,
            student=args.student,
            teacher=args.teacher,
            width=args.width,
            batch=args.batch,
            device=args.device,
            steps=args.steps,
            warmup=args.warmup,
            workers=args.workers,
            compile=args.compile,
            precision=precision,
        )
        if args.concurrent > 1:
            row = run_concurrent(bench, data, args.concurrent, args.threads)
        else:
            row = run_bench(bench, data)
        row["data"] = spec
        if args.json:
            print(json.dumps(row), flush=True)
            continue
        if not header:
            print(
                f"{'group':<10}{'feed':<12}{'precision':<10}{'images/s':>10}{'step ms':>10}"
                f"{'GFLOP/img':>11}  device={args.device} batch={args.batch} "
                f"{args.student}<-{args.teacher} width={args.width} "
                f"threads={torch.get_num_threads()}"
            )
            header = True
        print(
            f"{group:<10}{feed:<12}{row['precision']:<10}{row['images_per_s']:>10.1f}"
            f"{row.get('step_ms', math.nan):>10.1f}"
            f"{row.get('gflop_per_image', math.nan):>11.3f}",
            flush=True,
        )
    return 0
