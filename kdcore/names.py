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

# A model spec (``kdcore.zoo``): a built-in name, or "<source>:<name>".
MODEL_SOURCES = ("torchvision", "timm")  # any other "MODULE:CALLABLE" is the user's own code


def model_kind(spec: str) -> str:
    """``builtin``, ``torchvision``, ``timm`` or ``module`` for a well-formed spec.

    Raises ``ValueError`` (without a field name: the caller adds it) for anything else.
    """
    if isinstance(spec, str):
        if spec in ARCHITECTURE_NAMES:
            return "builtin"
        source, sep, name = spec.partition(":")
        if sep and name and source in MODEL_SOURCES:
            return source
        if sep and name.isidentifier() and all(p.isidentifier() for p in source.split(".")):
            return "module"
    raise ValueError(
        f"unknown architecture {spec!r}: expected one of {list(ARCHITECTURE_NAMES)}, "
        "torchvision:NAME, timm:NAME or MODULE:CALLABLE"
    )
