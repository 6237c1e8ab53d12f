"""kdcore: the pure-PyTorch distillation core (data, models, losses, masks, training, teacher).

The modules, in the order they build on each other:

- ``names``: groups, loss terms, stages, architecture names, model specs (no torch);
- ``config``: ``TrialConfig``, one validated trial (no torch);
- ``atomic``: atomic local-file writes (no torch);
- ``images``: image files: decoding, the ImageFolder listing, ``DataError``;
- ``jpegpack``: an ImageFolder tree's JPEG bytes in one ``.npz`` file;
- ``data``: ``load_data``, the validation split, the device-resident loader;
- ``models``: ResNet-18/34/50 (CIFAR or ImageNet stem, width, CBAM);
- ``zoo``: models by spec (built-in, ``torchvision:``, ``timm:``, the user's ``MODULE:CALLABLE``);
- ``features``: any model's distilled features by node name (torch.fx), ``FeatureNet``;
- ``losses``, ``masks``, ``objective``: the distillation terms, Grad-CAM masks, their sum;
- ``precision``, ``memory``: bf16 autocast where it pays; glibc's freed-memory thresholds;
- ``train``: ``fit``, the one training loop; ``teacher``: trained once, cached by hash, or
  read from the user's checkpoint;
- ``evaluate``: test accuracy, corruptions, size and speed; ``bench``: training-step speed.

The names below are imported on first use, so ``import kdcore.config`` (or ``kdcore.names``)
does not import torch.
"""

from __future__ import annotations

import importlib

# Exported name -> the module that defines it.
_EXPORTS = {
    "GROUPS": "config",
    "GROUP_TERMS": "config",
    "TERMS": "config",
    "TrialConfig": "config",
    "DataError": "data",
    "Dataset": "data",
    "load_data": "data",
    "DivergedError": "train",
    "FitResult": "train",
    "fit": "train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
