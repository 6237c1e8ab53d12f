"""Commands that need only kdcore: ``train``, ``teacher`` and ``bench`` (no Ray)."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path

from .storage import study_dir


def _parse_overrides(pairs: list[str]) -> dict:
    """``["T=4", "stages=layer3,layer4"]`` -> ``{"T": 4, "stages": ("layer3", "layer4")}``."""
    from kdcore.config import TrialConfig

    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD a TrialConfig field")
        if name == "stages":
            out[name] = tuple(s for s in raw.split(",") if s)
            continue
        try:
            out[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[name] = raw  # plain strings such as cpu or resnet18
    return out


def _progress(prefix: str):
    def report(metrics: dict, state: dict) -> None:
        print(
            f"{prefix} epoch {metrics['epoch']:>3}  train_loss {metrics['train_loss']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  val_acc {100 * metrics['val_acc']:.2f}%  "
            f"{metrics['images_per_s']:.0f} img/s",
            flush=True,
        )

    return report


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_train(args) -> int:
    """Train one trial without Ray; checkpoints every epoch under <storage>/<study>/train/."""
    from kdcore import TrialConfig, fit, load_data
    from kdcore.teacher import TeacherConfig, get_teacher
    from kdcore.train import load_checkpoint

    config = TrialConfig.for_group(args.group, **_parse_overrides(args.set))
    out = (
        study_dir(args.storage, args.study or "train")
        / "train"
        / f"{config.group}-seed{config.seed}"
    )
    data = load_data(args.data, val_size=args.val_size, train_per_class=args.train_per_class)
    teacher = None
    if config.needs_teacher:
        tcfg = TeacherConfig(
            arch=config.teacher,
            width=config.teacher_width,
            cbam=config.teacher_cbam,
            stem=config.stem,
            device=config.device,
            epochs=args.teacher_epochs or TeacherConfig.epochs,
        )
        print(
            f"teacher {tcfg.arch} (width {tcfg.width}): training or loading from cache", flush=True
        )
        teacher, digest, meta = get_teacher(
            tcfg, data, Path(args.storage) / "teachers", report=_progress("teacher")
        )
        print(f"teacher {digest}: val_acc {100 * meta.get('val_acc', float('nan')):.2f}%")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    checkpoint = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    progress = _progress(f"{config.group}")

    def report(metrics: dict, state: dict) -> None:
        progress(metrics, state)
        _atomic_torch_save(state, ckpt_path)

    t0 = time.perf_counter()
    result = fit(config, data, teacher, report=report, checkpoint=checkpoint)
    summary = {
        "group": config.group,
        "status": result.status,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc,
        "seconds": time.perf_counter() - t0,
        "checkpoint": str(ckpt_path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


def bench_precisions(flag: str, device: str) -> list[str]:
    """The resolved precisions of ``--precision`` (comma-separated), duplicates dropped."""
    from kdcore.precision import PRECISIONS, resolve_precision

    names = [p.strip() for p in flag.split(",") if p.strip()]
    if not names or not set(names) <= set(PRECISIONS):
        raise ValueError(f"--precision: expected a list of {', '.join(PRECISIONS)}, got {flag!r}")
    return list(dict.fromkeys(resolve_precision(p, device) for p in names))


def cmd_bench(args) -> int:
    """Print images/s of each group's training step for the device and DataLoader feeds."""
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


def cmd_teacher(args) -> int:
    """Train the study's teacher once (or load it from the cache) and print where it is."""
    from .study import resolve_study
    from .tune import prepare_teacher

    config, _ = resolve_study(args)
    data = config.load_data()
    _, meta = prepare_teacher(config, data, args.address)
    if not meta:
        print("teacher: no group of this study needs a teacher")
    return 0
