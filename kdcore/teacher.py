"""The teacher: trained once with the same loop (CE only) and cached by a content hash.

The hash (``TeacherConfig.content_hash``) covers the whole ``TrialConfig`` the teacher trains
with (its own settings and the ``TrialConfig`` defaults it inherits: momentum, weight decay,
...), its precision resolved on its device (``auto`` on a CPU with bf16 is ``bf16``) and the
dataset fingerprint, so a study (or several) with the same teacher and data reuses one file
and an fp32 study never reuses a bf16 teacher; only ``device`` is left out. Keys written
before precision and the defaults were hashed (``legacy_hash``) stay readable: a stored
study keeps the teacher it recorded (``TeacherConfig.cache_keys``, ``search.engine.teacher_task``).
Files load with ``weights_only=True``.

A teacher may instead come from a checkpoint of the user's (``TeacherConfig.checkpoint``): a
state dict saved by ``torch.save``, or a dict holding it under ``model`` or ``state_dict``
(RepDistiller, mdistiller and torchdistill write these), loaded strictly into the teacher's
classifier (``read_state_dict``, ``load_weights``) and never trained.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .atomic import atomic_torch_save
from .config import TeacherConfig, teacher_file
from .data import Dataset
from .features import DEFAULT_COUNT, Size, distillable, network
from .train import fit, image_shape


def build_teacher(
    config: TeacherConfig, num_classes: int, image_size: Size = 32,
    stages: tuple[str, ...] | None = None, count: int = DEFAULT_COUNT,
) -> nn.Module:
    """The teacher's model with fresh weights (``kdcore.features.distillable``).

    ``stages``: its distilled features (None: logits only, as when it trains; ``()``: chosen
    automatically, ``count`` of them).
    """
    return distillable(config.arch, num_classes, stages, image_size=image_size, count=count,
                       stem=config.stem, width=config.width, cbam=config.cbam,
                       field="teacher.stages")


def save_teacher(path: Path, model: nn.Module, meta: dict) -> None:
    """Write the teacher atomically: a reader sees the old file or the whole new one."""
    atomic_torch_save({"state_dict": network(model).state_dict(), "meta": meta}, path)


def read_state_dict(source: str | Path | bytes, name: str | None = None) -> dict[str, Tensor]:
    """The state dict in a checkpoint file (or its bytes), read with ``weights_only=True``.

    Accepts a state dict itself or a dict holding one under ``model`` or ``state_dict``; a
    ``module.`` prefix (``DataParallel``) is stripped. ``ValueError`` in one line otherwise.
    """
    name = name or str(source)
    try:
        blob = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                          map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged, foreign or pickled-object files
        raise ValueError(f"cannot read teacher checkpoint {name}: "
                         f"{exc.__class__.__name__}") from None
    for key in ("model", "state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not (isinstance(blob, dict) and blob and all(isinstance(v, Tensor) for v in blob.values())):
        raise ValueError(f"teacher checkpoint {name} holds no state dict (a dict of tensors, "
                         "or one under 'model' or 'state_dict')")
    if all(k.startswith("module.") for k in blob):
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob


def load_weights(model: nn.Module, state: dict[str, Tensor], name: str, spec: str) -> nn.Module:
    """``state`` loaded strictly into ``model``'s classifier; frozen, in eval mode.

    A mismatch is one ``ValueError`` naming the first missing and unexpected keys.
    """
    net = network(model)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("other shapes at", wrong)) if keys]
        raise ValueError(f"teacher checkpoint {name} does not fit {spec}: {'; '.join(parts)}")
    net.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load_teacher(
    path: str | Path, config: TeacherConfig, num_classes: int, image_size: Size = 32,
    stages: tuple[str, ...] | None = None, count: int = DEFAULT_COUNT,
) -> nn.Module:
    """Load teacher weights for ``config``; a corrupt or mismatched file raises ``ValueError``."""
    state = read_state_dict(path)
    model = build_teacher(config, num_classes, image_size, stages, count)
    spec = (f"{config.arch} (width {config.width}, cbam {config.cbam}, stem {config.stem})"
            if model is network(model) else config.arch)
    return load_weights(model, state, str(path), spec)


def get_teacher(
    config: TeacherConfig,
    data: Dataset,
    cache_dir: str | Path,
    report: Callable[[dict, dict], None] | None = None,
    stages: tuple[str, ...] | None = None,
    count: int = DEFAULT_COUNT,
) -> tuple[nn.Module, str, dict]:
    """Load the cached teacher for (config, data) or train and cache it.

    Returns ``(model, content_hash, meta)``; ``meta`` holds the teacher's validation accuracy.
    The model returns the features of ``stages`` (``build_teacher``).
    """
    digest = config.content_hash(data)
    path = Path(cache_dir) / teacher_file(digest)
    size = image_shape(data)
    if path.exists():
        model = load_teacher(path, config, data.num_classes, size, stages, count)
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
    save_teacher(path, result.student.cpu(), meta)
    model = build_teacher(config, data.num_classes, size, stages, count)
    model = load_weights(model, network(result.student).state_dict(), str(path), config.arch)
    return model, digest, meta
