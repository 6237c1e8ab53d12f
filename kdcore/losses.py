"""Distillation losses, each a plain function of tensors; the objective applies the weights.

Teacher tensors arrive without gradient (the teacher is frozen); the student tensors keep
theirs, so every term here reaches the student's parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def kd_kl(s_logits: Tensor, t_logits: Tensor, T: float) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)), mean over the batch, times T² (Hinton et al., 2015)."""
    log_p_s = F.log_softmax(s_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(t_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def attention_map(f: Tensor, p: float = 2) -> Tensor:
    """Spatial attention of a (B, C, H, W) feature map: mean over channels of |f|^p -> (B, H, W)."""
    return f.float().abs().pow(p).mean(dim=1)


def _to_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool a (B, H, W) or (B, C, H, W) tensor down to ``size`` when it is larger."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.dim() == 3
    y = F.adaptive_avg_pool2d(x.unsqueeze(1) if squeeze else x, size)
    return y.squeeze(1) if squeeze else y


def _common_size(*shapes: tuple[int, ...]) -> tuple[int, int]:
    return min(s[-2] for s in shapes), min(s[-1] for s in shapes)


def attention_transfer(fs: Tensor, ft: Tensor, mask: Tensor | None = None, p: float = 2) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017), optionally restricted by a mask.

    Both attention maps (and the mask) are brought to the smaller spatial size, multiplied
    by the mask, flattened and L2-normalized per sample; the loss is the mean squared
    difference over batch and positions.
    """
    a_s, a_t = attention_map(fs, p), attention_map(ft, p)
    size = _common_size(a_s.shape, a_t.shape)
    a_s, a_t = _to_size(a_s, size), _to_size(a_t, size)
    if mask is not None:
        mask = _to_size(mask.float(), size)
        a_s, a_t = a_s * mask, a_t * mask
    q_s = F.normalize(a_s.flatten(1), dim=1)
    q_t = F.normalize(a_t.flatten(1), dim=1)
    return (q_s - q_t).pow(2).mean()


def make_connector(student_channels: int, teacher_channels: int) -> nn.Module:
    """FitNets-style regressor: 1x1 convolution + BatchNorm from student to teacher channels."""
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
        nn.BatchNorm2d(teacher_channels),
    )


def feature_alignment(
    fs: Tensor, ft: Tensor, connector: nn.Module, mask: Tensor | None = None
) -> Tensor:
    """Feature alignment (FitNets; Heo et al., 2019): squared error of connector(fs) against ft.

    Averaged over channels and the positions the mask keeps (a plain mean without a mask).
    """
    out = connector(fs).float()
    size = _common_size(out.shape, ft.shape)
    out, ft = _to_size(out, size), _to_size(ft.float(), size)
    sq = (out - ft).pow(2)
    if mask is None:
        return sq.mean()
    mask = _to_size(mask.float(), size).unsqueeze(1)
    return (sq * mask).sum() / (mask.sum() * sq.shape[1]).clamp_min(1.0)
