"""Models by spec: kdcore's ResNets, torchvision and timm classifiers, and the user's own code.

A spec (``kdcore.names.model_kind`` checks its form without torch) is one of:

- ``resnet18``, ``resnet34``, ``resnet50``: the built-in ResNets (``kdcore.models``), which take
  a stem, a width and CBAM and return their stage outputs explicitly;
- ``torchvision:NAME``: a classification builder of ``torchvision.models`` (``get_model``);
- ``timm:NAME``: ``timm.create_model`` (the optional ``timm`` extra);
- ``MODULE:CALLABLE``: the user's code, importable where it runs, called as
  ``CALLABLE(num_classes=N)``.

Every model is built with fresh weights (nothing is downloaded); a teacher's trained weights
come from a checkpoint (``kdcore.teacher``). ``build_network`` returns the plain classifier;
``kdcore.features`` makes its distilled features explicit outputs.
"""

from __future__ import annotations

import importlib

from torch import nn

from .models import build_model
from .names import model_kind


def build_network(
    spec: str, num_classes: int, stem: str = "cifar", width: float = 1.0, cbam: bool = False
) -> nn.Module:
    """The classifier of ``spec`` with ``num_classes`` outputs; ``ValueError`` in one line.

    ``stem``, ``width`` and ``cbam`` apply to the built-in ResNets only (the configs refuse a
    width or CBAM for another model).
    """
    kind = model_kind(spec)
    if kind == "builtin":
        return build_model(spec, num_classes, stem, width, cbam)
    source, _, name = spec.partition(":")
    if kind == "torchvision":
        return _torchvision(name, num_classes)
    if kind == "timm":
        return _timm(name, num_classes)
    return _user_code(source, name, num_classes)


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)  # the classification builders only
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:5] or names[:5]
        raise ValueError(f"torchvision:{name} is not a torchvision classification model "
                         f"(e.g. {', '.join(close)})")
    return tvm.get_model(name, weights=None, num_classes=num_classes)


def _timm(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm:{name} needs timm: pip install -e '.[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"timm:{name} is not a timm model (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _user_code(module: str, name: str, num_classes: int) -> nn.Module:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # the user's module may raise anything while importing
        raise ValueError(f"{module}:{name}: cannot import {module} "
                         f"({exc.__class__.__name__}: {exc})") from None
    builder = getattr(mod, name, None)
    if not callable(builder):
        raise ValueError(f"{module}:{name}: {module} has no callable {name!r}")
    try:
        model = builder(num_classes=num_classes)
    except Exception as exc:
        raise ValueError(f"{module}:{name}(num_classes={num_classes}) raised "
                         f"{exc.__class__.__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{module}:{name}(num_classes={num_classes}) returned "
                         f"{type(model).__name__}, not a torch.nn.Module")
    return model


def user_module(spec: str) -> str | None:
    """The module a ``MODULE:CALLABLE`` spec imports; None for the other kinds."""
    return spec.partition(":")[0] if model_kind(spec) == "module" else None
