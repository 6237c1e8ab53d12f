"""The teacher: trained once with the same loop (CE only) and cached by a content hash.

The hash (``TeacherConfig.content_hash``) covers the whole ``TrialConfig`` the teacher trains
with (its own settings and the ``TrialConfig`` defaults it inherits: momentum, weight decay,
...), its precision resolved on its device (``auto`` on a CPU with bf16 is ``bf16``) and the
dataset fingerprint, so a study (or several) with the same teacher and data reuses one file
and an fp32 study never reuses a bf16 teacher; only ``device`` is left out. Keys written
before precision and the defaults were hashed (``legacy_hash``) stay readable: a stored
study keeps the teacher it recorded (``TeacherConfig.cache_keys``, ``search.teacher_task``).
Files load with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import TrialConfig
from .data import Dataset
from .models import build_model
from .precision import PRECISIONS, resolve_precision
from .train import fit


@dataclass(frozen=True)
class TeacherConfig:
    """How to build and train the teacher."""

    arch: str = "resnet50"
    width: float = 1.0
    cbam: bool = True
    stem: str = "cifar"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    lr_schedule: str = "cosine"
    patience: int = 0
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # auto, fp32 or bf16 autocast (kdcore.precision)

    def trial_config(self) -> TrialConfig:
        """The CE-only ``TrialConfig`` that trains this teacher as a 'student'."""
        return TrialConfig(
            group="baseline",
            student=self.arch,
            student_width=self.width,
            student_cbam=self.cbam,
            stem=self.stem,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            patience=self.patience,
            seed=self.seed,
            device=self.device,
            precision=self.precision,
        )

    def content_hash(self, data: Dataset) -> str:
        """Hash of everything that determines the teacher's weights: the cache key.

        It hashes every field of ``trial_config()`` except ``device`` (no hand list: the
        ``TrialConfig`` defaults the teacher trains with, such as momentum and weight decay,
        and any field added later are in), with ``precision`` resolved to what it means on
        the teacher's device (``kdcore.precision.resolve_precision``: ``auto`` on a CPU with
        bf16, or on CUDA, is ``bf16``), and the dataset fingerprint. Precision goes in: it is
        part of the recipe (a study setting), and bf16 autocast rounds the inputs of every
        convolution and matrix product to 8 significant bits, so the teacher trains along
        another trajectory to other weights; an fp32 study must not silently get a bf16
        teacher. ``device`` stays out: it says where the recipe runs, not what it is; at one
        precision two devices run the same computation and differ only in numerics (the
        order of floating-point sums, cuDNN's choice of kernels), as two runs on one GPU
        already do, so a teacher trained on a GPU serves the same study on a CPU.
        """
        return self._hash_with(resolve_precision(self.precision, self.device), data)

    def legacy_hash(self, data: Dataset) -> str:
        """The cache key before issue 16 (precision and the ``TrialConfig`` defaults left out).

        Only for finding the teacher of a study stored with it; new files never use it.
        """
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("device", "precision")}
        blob = json.dumps({"teacher": fields, "data": data.fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cache_keys(self, data: Dataset) -> tuple[str, ...]:
        """Every key a stored teacher of this config can carry, ``content_hash`` first.

        ``auto`` also accepts the other resolution (a teacher trained on a node whose CPU
        resolves ``auto`` differently from this one's), then ``legacy_hash``.
        """
        keys = [self.content_hash(data)]
        if self.precision == "auto":
            keys += [self._hash_with(p, data) for p in PRECISIONS if p != "auto"]
        keys.append(self.legacy_hash(data))
        return tuple(dict.fromkeys(keys))

    def _hash_with(self, precision: str, data: Dataset) -> str:
        fields = self.trial_config().to_dict()
        del fields["device"]
        fields["precision"] = precision
        blob = json.dumps({"trial": fields, "data": data.fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_teacher(config: TeacherConfig, num_classes: int) -> nn.Module:
    return build_model(config.arch, num_classes, config.stem, config.width, config.cbam)


def save_teacher(path: Path, model: nn.Module, meta: dict) -> None:
    """Write the teacher atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    path = Path(cache_dir) / f"teacher-{digest}.pt"
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
