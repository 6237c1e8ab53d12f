"""Causal masks: Grad-CAM of the frozen teacher at each distilled stage (Selvaraju et al., 2017).

Only activation gradients are computed: the teacher's parameters never require grad, and
``torch.autograd.grad`` differentiates with respect to the stage outputs alone, so no
weight gradient is ever formed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .names import MASK_TARGETS


def keep_count(mask_pct: float, positions: int) -> int:
    """Positions a mask keeps: ceil((1 - mask_pct/100) * positions), at least one."""
    return max(1, min(positions, math.ceil((1 - mask_pct / 100) * positions - 1e-9)))


def top_positions_mask(cam: Tensor, mask_pct: float) -> Tensor:
    """Binary (B, H, W) mask keeping exactly ``keep_count`` highest-valued positions per sample."""
    b, h, w = cam.shape
    k = keep_count(mask_pct, h * w)
    mask = torch.zeros(b, h * w, device=cam.device, dtype=torch.float32)
    if k == h * w:
        return mask.add_(1.0).view(b, h, w)
    idx = cam.flatten(1).float().topk(k, dim=1).indices
    return mask.scatter_(1, idx, 1.0).view(b, h, w)


def gradcam(
    score: Tensor, features: dict[str, Tensor], stages: tuple[str, ...]
) -> dict[str, Tensor]:
    """Grad-CAM maps (B, H, W) in [0, 1] of ``score`` (a scalar) at each stage."""
    grads = torch.autograd.grad(score, [features[s] for s in stages])
    cams = {}
    for stage, grad in zip(stages, grads, strict=True):
        weights = grad.float().mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * features[stage].float()).sum(dim=1))
        cams[stage] = cam / cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return cams


def teacher_forward_with_masks(teacher: nn.Module, x: Tensor, y: Tensor, stages: tuple[str, ...],
                               mask_pct: float, target: str = "label",
                               ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """One teacher pass giving detached logits, detached stage features and Grad-CAM masks."""
    if target not in MASK_TARGETS:
        raise ValueError(f"target: expected 'label' or 'prediction', got {target!r}")
    with torch.enable_grad():
        # The teacher's weights are frozen, so make the input the leaf that carries the graph.
        logits, features = teacher(x.detach().requires_grad_(True))
        cls = y if target == "label" else logits.argmax(dim=1)
        score = logits.gather(1, cls[:, None]).sum()
        cams = gradcam(score, features, stages)
    masks = {s: top_positions_mask(cams[s], mask_pct) for s in stages}
    return logits.detach(), {k: v.detach() for k, v in features.items()}, masks


def gradcam_masks(teacher: nn.Module, x: Tensor, y: Tensor, stages: tuple[str, ...],
                  mask_pct: float, target: str = "label") -> tuple[Tensor, dict[str, Tensor]]:
    """Teacher logits and a {stage: (B, H, W) binary mask} from the teacher's Grad-CAM."""
    logits, _, masks = teacher_forward_with_masks(teacher, x, y, stages, mask_pct, target)
    return logits, masks
