"""The teacher: trained once with the same loop (CE only) and cached by a content hash.

The hash (``TeacherConfig.content_hash``) covers the whole ``TrialConfig`` the teacher trains
with (its own settings and the ``TrialConfig`` defaults it inherits: momentum, weight decay,
...), its precision resolved on its device (``auto`` on a CPU with bf16 is ``bf16``) and the
dataset fingerprint, so a study (or several) with the same teacher and data reuses one file
and an fp32 study never reuses a bf16 teacher; only ``device`` is left out. Keys written
before precision and the defaults were hashed (``legacy_hash``) stay readable: a stored
study keeps the teacher it recorded (``TeacherConfig.cache_keys``, ``search.engine.teacher_task``).
Files load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_torch_save
from .config import TeacherConfig, teacher_file
from .data import Dataset
from .models import build_model
from .train import fit


def build_teacher(config: TeacherConfig, num_classes: int) -> nn.Module:
    return build_model(config.arch, num_classes, config.stem, config.width, config.cbam)


def save_teacher(path: Path, model: nn.Module, meta: dict) -> None:
    """Write the teacher atomically: a reader sees the old file or the whole new one."""
    atomic_torch_save({"state_dict": model.state_dict(), "meta": meta}, path)


def load_teacher(path: str | Path, config: TeacherConfig, num_classes: int) -> nn.Module:
    """Load teacher weights for ``config``; a corrupt or mismatched file raises ``ValueError``."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state = blob["state_dict"]
    except Exception as exc:  # damaged, foreign or pickled-object files
        raise ValueError(
            f"cannot read teacher checkpoint {path}: {exc.__class__.__name__}"
        ) from None
    model = build_teacher(config, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ValueError(
            f"teacher checkpoint {path} does not match architecture {config.arch} "
            f"(width {config.width}, cbam {config.cbam}, stem {config.stem})"
        ) from None
    return model.eval().requires_grad_(False)


def get_teacher(
    config: TeacherConfig,
    data: Dataset,
    cache_dir: str | Path,
    report: Callable[[dict, dict], None] | None = None,
) -> tuple[nn.Module, str, dict]:
    """Load the cached teacher for (config, data) or train and cache it.

    Returns ``(model, content_hash, meta)``; ``meta`` holds the teacher's validation accuracy.
    """
    digest = config.content_hash(data)
    path = Path(cache_dir) / teacher_file(digest)
    if path.exists():
        model = load_teacher(path, config, data.num_classes)
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        return model, digest, meta
    result = fit(config.trial_config(), data, report=report)
    meta = {
        "hash": digest,
        "val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "data": data.fingerprint,
    }
    model = result.student.cpu().eval().requires_grad_(False)
    save_teacher(path, model, meta)
    return model, digest, meta
