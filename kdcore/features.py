"""Distilled features by node name: any classifier made to return ``(logits, {stage: output})``.

The objective (``kdcore.objective``) needs, from the student and the teacher alike, the logits
and the outputs of the layers whose features AT, FA and Grad-CAM use, paired in order. The
built-in ResNets return them explicitly (``layer1..layer4``). Any other model is wrapped in a
``FeatureNet``: torchvision's feature extraction (``create_feature_extractor``, torch.fx)
rewrites its forward to return the named nodes' outputs as values, beside the logits; nothing
is captured by hooks and nothing is detached. A stage is a node name of
``get_graph_node_names`` or a module name (``layer3``, ``blocks.2``): that module's last node.

A model torch.fx cannot trace (data-dependent control flow, say) falls back, with one line on
stderr, to forward hooks on modules: its stages must then be module names.

Stages not given are chosen automatically (``default_stages``): the last node at each of the
last ``count`` spatial resolutions larger than 1x1 of the model's (B, C, H, W) outputs, at the
data's image size; for a ResNet at 32x32 that is the end of ``layer1``, ``layer2`` and
``layer3`` (``layer4`` is 1x1 after an ImageNet stem) -- ``kdsearch models SPEC`` prints the
candidates and the choice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import ResNet
from .names import STAGES
from .zoo import build_network

LOGITS = "_kdsearch_logits"  # the extractor's key for the model's own output
DEFAULT_COUNT = 3  # stages chosen automatically when the other side does not set the number
_WARNED: set[str] = set()
Size = int | tuple[int, int]  # an image side, or (height, width)


def hw(size: Size) -> tuple[int, int]:
    """(height, width) of an image ``size``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class FeatureNet(nn.Module):
    """``net`` with a forward returning ``(logits, {stage: output})`` for ``stages``.

    ``net`` stays the one registered child, so ``state_dict`` is the classifier's own under a
    ``net.`` prefix (``network(model)`` gives the classifier, whose keys a checkpoint has).
    The traced extractor shares ``net``'s modules (moving or freezing one moves or freezes
    the other) and is kept out of the module tree so its parameters are not listed twice.
    ``stage_channels`` gives each stage's channel count (the FA connectors need it).
    """

    def __init__(self, net: nn.Module, stages: tuple[str, ...], extractor: nn.Module | None):
        super().__init__()
        self.net = net
        self.stages = tuple(stages)
        self.stage_channels: dict[str, int] = {}
        object.__setattr__(self, "_extractor", extractor)

    def _apply(self, fn, recurse: bool = True):
        """``to``/``cuda``/``half``... then point the extractor at ``net``'s new tensors.

        torch.fx keeps its own reference to a tensor the traced forward reads directly (a
        buffer of a module it traced through, e.g. a blur filter), which moving ``net``
        replaces.
        """
        super()._apply(fn, recurse)
        if self._extractor is not None:
            tensors = {**dict(self.net.named_buffers()), **dict(self.net.named_parameters())}
            for name in [n for n, _ in self._extractor.named_buffers()] + [
                    n for n, _ in self._extractor.named_parameters()]:
                path, _, attr = name.rpartition(".")
                owner = self._extractor.get_submodule(path) if path else self._extractor
                table = owner._buffers if attr in owner._buffers else owner._parameters
                table[attr] = tensors[name]
        return self

    def train(self, mode: bool = True) -> FeatureNet:
        super().train(mode)
        if self._extractor is not None:
            self._extractor.train(mode)  # it keeps one traced graph per mode
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.stages:
            return self.net(x), {}
        if self._extractor is not None:
            out = dict(self._extractor(x))
            return out.pop(LOGITS), out
        return _hooked_forward(self.net, self.stages, x)


def _hooked_forward(net: nn.Module, stages: tuple[str, ...], x: Tensor):
    """The fallback for untraceable models: stage outputs recorded by forward hooks."""
    modules = dict(net.named_modules())
    feats: dict[str, Tensor] = {}
    handles = [modules[s].register_forward_hook(
        lambda _m, _i, out, s=s: feats.__setitem__(s, out)) for s in stages]
    try:
        logits = net(x)
    finally:
        for h in handles:
            h.remove()
    return logits, {s: feats[s] for s in stages}


def network(model: nn.Module) -> nn.Module:
    """The plain classifier inside ``model`` (a ``FeatureNet``'s ``net``, else ``model``)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module
    return model.net if isinstance(model, FeatureNet) else model


# ---------------------------------------------------------------------------------------------
# Node names and their outputs.


def graph_nodes(net: nn.Module) -> tuple[list[str], list[str]] | None:
    """(train, eval) node names of ``net``, or None when torch.fx cannot trace it."""
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        return get_graph_node_names(net)
    except Exception:  # torch.fx raises TraceError, TypeError, NotImplementedError, ...
        return None


@dataclass(frozen=True)
class Candidate:
    """A node (or, untraced, a module) and its output shape for one input image."""

    name: str
    shape: tuple[int, ...]


def candidates(net: nn.Module, image_size: Size) -> list[Candidate]:
    """Every node's tensor output shape (batch of 1 removed), in the order of the forward.

    Untraceable models list their modules instead (the hook fallback's stage names).
    """
    was_training = net.training
    net.eval()
    x = torch.zeros(1, 3, *hw(image_size))
    nodes = graph_nodes(net)
    try:
        with torch.no_grad():
            if nodes is not None:
                from torchvision.models.feature_extraction import create_feature_extractor

                names = nodes[1][1:]  # without the input placeholder
                out = create_feature_extractor(net, return_nodes=names)(x)
            else:
                modules = [n for n, _ in net.named_modules() if n]
                out = _hooked_forward(net, tuple(modules), x)[1]
    finally:
        net.train(was_training)
    return [Candidate(n, tuple(v.shape[1:])) for n, v in out.items() if isinstance(v, Tensor)]


def default_stages(net: nn.Module, image_size: Size, count: int = DEFAULT_COUNT) -> tuple[str, ...]:
    """The last node at each of the last ``count`` spatial resolutions above 1x1.

    Raises ``ValueError`` when the model has fewer such resolutions (say which stages to use).
    """
    last: dict[tuple[int, int], str] = {}
    for c in candidates(net, image_size):
        if len(c.shape) == 3 and c.shape[1] * c.shape[2] > 1:
            last.pop(c.shape[1:], None)  # re-insert: dict order is the resolution's last node
            last[c.shape[1:]] = c.name
    chosen = tuple(last.values())[-count:]
    if len(chosen) < count:
        raise ValueError(f"{count} stages wanted, but at {'x'.join(map(str, hw(image_size)))} "
                         f"the model has "
                         f"{len(chosen)} spatial resolutions above 1x1; name the stages")
    return chosen


def _known(net: nn.Module, stage: str, nodes: tuple[list[str], list[str]] | None) -> bool:
    if nodes is None:
        return stage in dict(net.named_modules())
    return all(stage in names or any(n.startswith(stage + ".") for n in names)
               for names in nodes)


def _some_names(net: nn.Module) -> str:
    names = [n for n, _ in net.named_children()]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


# ---------------------------------------------------------------------------------------------
# Building a model for distillation.


def with_features(
    net: nn.Module, stages: tuple[str, ...], image_size: Size, *, spec: str = "model",
    field: str = "stages",
) -> FeatureNet:
    """``net`` wrapped to return the outputs of ``stages``; checks each on one probe batch.

    ``field`` names the setting in errors (``student_stages``, ``teacher.stages``).
    """
    nodes = graph_nodes(net) if stages else None
    for stage in stages:
        if not _known(net, stage, nodes):
            kind = "node or module" if nodes is not None else "module"
            raise ValueError(f"{field}: {spec} has no {kind} {stage!r} (it has {_some_names(net)}; "
                             f"`kdsearch models {spec}` lists them all)")
    extractor = None
    if stages and nodes is not None:
        for stage in stages:
            last = nodes[1][-1]
            if stage == last or last.startswith(stage + "."):
                raise ValueError(f"{field}: {stage!r} of {spec} is its output (the logits), not "
                                 "a (C, H, W) map; AT, FA and Grad-CAM need spatial features")
        from torchvision.models.feature_extraction import create_feature_extractor

        returns = [{**{s: s for s in stages}, names[-1]: LOGITS} for names in nodes]
        extractor = create_feature_extractor(net, train_return_nodes=returns[0],
                                             eval_return_nodes=returns[1])
    elif stages and spec not in _WARNED:
        _WARNED.add(spec)
        print(f"{spec}: torch.fx cannot trace this model; its features come from forward "
              f"hooks on the modules {list(stages)}", file=sys.stderr)
    model = FeatureNet(net, stages, extractor)
    model.stage_channels.update(_probe(model, image_size, spec, field))
    return model


def _probe(model: FeatureNet, image_size: Size, spec: str, field: str) -> dict[str, int]:
    """Each stage's channel count, from one eval-mode forward; checks the output shapes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, feats = model(torch.zeros(2, 3, *hw(image_size)))
    finally:
        model.train(was_training)
    if not (isinstance(logits, Tensor) and logits.dim() == 2 and len(logits) == 2):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{spec}: its forward must return logits of shape (batch, classes), "
                         f"got {got}")
    for stage, f in feats.items():
        if not (isinstance(f, Tensor) and f.dim() == 4):
            got = tuple(f.shape[1:]) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{field}: {stage!r} of {spec} outputs {got}, not a (C, H, W) map; "
                             "AT, FA and Grad-CAM need spatial features")
    return {s: int(f.shape[1]) for s, f in feats.items()}


def distillable(
    spec: str, num_classes: int, stages: tuple[str, ...] | None, *, image_size: Size = 32,
    count: int = DEFAULT_COUNT, stem: str = "cifar", width: float = 1.0, cbam: bool = False,
    field: str = "stages",
) -> nn.Module:
    """The model of ``spec`` with a forward returning ``(logits, {stage: feature})``.

    ``stages``: the names to distil; ``()`` chooses ``count`` automatically
    (``default_stages`` at ``image_size``); None: no features (a CE-only run, e.g. training
    a teacher). A built-in ResNet is returned as it is (it returns ``layer1..layer4``).
    """
    net = build_network(spec, num_classes, stem, width, cbam)
    if isinstance(net, ResNet):
        bad = [s for s in stages or () if s not in STAGES]
        if bad:
            raise ValueError(f"{field}: {spec} returns {list(STAGES)}, not {bad[0]!r}")
        return net
    if stages is None:
        return FeatureNet(net, (), None)
    if not stages:
        stages = default_stages(net, image_size, count)
    return with_features(net, tuple(stages), image_size, spec=spec, field=field)
