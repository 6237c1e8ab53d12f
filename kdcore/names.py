"""The names kdcore's parts go by: groups, loss terms, stages, architectures, settings.

Plain tuples and dicts, no torch: a study config (``kdcore.config``, ``search``) checks names
against these without importing the models. The modules that implement the names
(``kdcore.models``, ``kdcore.masks``, ``kdcore.precision``) import them from here.
"""

from __future__ import annotations

# The paper's five groups and the loss terms each may use.
GROUPS = ("baseline", "kd", "fa", "at", "combined")
TERMS = ("ce", "kl", "at", "fa")
GROUP_TERMS: dict[str, tuple[str, ...]] = {
    "baseline": ("ce",),
    "kd": ("ce", "kl"),
    "fa": ("ce", "kl", "fa"),
    "at": ("ce", "kl", "at"),
    "combined": ("ce", "kl", "fa", "at"),
}
MASKED_TERMS = ("at", "fa")  # the terms a causal mask applies to

# The built-in models (``kdcore.models.ARCHITECTURES`` builds them) and their parts.
ARCHITECTURE_NAMES = ("resnet18", "resnet34", "resnet50")
STAGES = ("layer1", "layer2", "layer3", "layer4")
STEMS = ("cifar", "imagenet")

MASK_TARGETS = ("label", "prediction")  # the class whose Grad-CAM makes the mask
PRECISIONS = ("auto", "fp32", "bf16")  # ``kdcore.precision``
