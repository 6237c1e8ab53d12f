"""``kdsearch train``: one trial from a config, no Ray; checkpoints every epoch, ``--resume``."""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path

from search.store.files import local_study_dir


def _parse_overrides(pairs: list[str]) -> dict:
    """``["T=4", "stages=layer3,layer4"]`` -> ``{"T": 4, "stages": ("layer3", "layer4")}``."""
    from kdcore.config import TrialConfig

    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD a TrialConfig field")
        if name in ("stages", "student_stages", "teacher_stages"):
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


def cmd_train(args) -> int:
    """Train one trial without Ray; checkpoints every epoch under <storage>/<study>/train/."""
    from kdcore import TrialConfig, fit, load_data
    from kdcore.atomic import atomic_torch_save
    from kdcore.config import TEACHERS, TeacherConfig
    from kdcore.teacher import get_teacher
    from kdcore.train import load_checkpoint, needs_features

    config = TrialConfig.for_group(args.group, **_parse_overrides(args.set))
    out = (
        local_study_dir(args.storage, args.study or "train")
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
            tcfg, data, Path(args.storage) / TEACHERS, report=_progress("teacher"),
            stages=config.given_stages("teacher") if needs_features(config) else None,
            count=config.auto_count("teacher"),
        )
        print(f"teacher {digest}: val_acc {100 * meta.get('val_acc', float('nan')):.2f}%")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    checkpoint = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    progress = _progress(f"{config.group}")

    def report(metrics: dict, state: dict) -> None:
        progress(metrics, state)
        atomic_torch_save(state, ckpt_path)

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
