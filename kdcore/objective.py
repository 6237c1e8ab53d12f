"""The distillation objective: only the terms with a non-zero weight are computed.

AT and FA compare the student's and the teacher's features stage by stage, paired in order
(``stage_pairs``): a ``kdcore.features.FeatureNet`` knows its stages, a built-in ResNet takes
them from the config. FA connectors are keyed by the student's stage.

``baseline`` never runs the teacher; Grad-CAM masks are computed only when a masked term
(AT or FA) is active with ``mask_pct > 0`` (at 0 the mask keeps everything, so it is skipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrialConfig
from .losses import attention_transfer, feature_alignment, kd_kl, make_connector
from .masks import teacher_forward_with_masks


def stage_pairs(
    config: TrialConfig, student: nn.Module, teacher: nn.Module | None
) -> tuple[tuple[str, str], ...]:
    """(student stage, teacher stage) pairs of the AT and FA terms, in order."""
    student_stages = getattr(student, "stages", None) or config.given_stages("student")
    teacher_stages = getattr(teacher, "stages", None) or config.given_stages("teacher")
    if len(student_stages) != len(teacher_stages):
        raise ValueError(f"student_stages: {list(student_stages)} and teacher stages "
                         f"{list(teacher_stages)} are paired in order and need equal lengths")
    return tuple(zip(student_stages, teacher_stages, strict=True))


def connector_key(stage: str) -> str:
    """A stage name as a ``ModuleDict`` key (no dots); ``layer2`` stays ``layer2``."""
    return stage.replace(".", "_")


def build_connectors(
    config: TrialConfig, student: nn.Module, teacher: nn.Module | None
) -> nn.ModuleDict:
    """One FA connector per distilled stage when the FA term is active, else an empty dict."""
    if config.w_fa <= 0:
        return nn.ModuleDict()
    if teacher is None:
        raise ValueError(
            f"teacher: group {config.group!r} uses feature alignment and needs a teacher"
        )
    return nn.ModuleDict({
        connector_key(s): make_connector(student.stage_channels[s], teacher.stage_channels[t])
        for s, t in stage_pairs(config, student, teacher)
    })


def loss_terms(
    config: TrialConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    connectors: nn.ModuleDict,
    x: Tensor,
    y: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Student logits and the unweighted value of every active term."""
    logits, s_feats = student(x)
    terms: dict[str, Tensor] = {}
    if config.w_ce > 0:
        terms["ce"] = F.cross_entropy(logits.float(), y)
    if not config.needs_teacher:
        return logits, terms
    if teacher is None:
        raise ValueError(f"teacher: group {config.group!r} needs a teacher")

    pairs = stage_pairs(config, student, teacher) if config.w_at or config.w_fa else ()
    teacher_stages = tuple(t for _, t in pairs)
    masks: dict[str, Tensor | None] = dict.fromkeys(teacher_stages)
    if config.needs_masks:
        t_logits, t_feats, cam_masks = teacher_forward_with_masks(
            teacher, x, y, teacher_stages, config.mask_pct, config.mask_target
        )
        masks.update(cam_masks)
    else:
        with torch.no_grad():
            t_logits, t_feats = teacher(x)

    if config.w_kl > 0:
        terms["kl"] = kd_kl(logits, t_logits, config.T)
    if config.w_at > 0:
        terms["at"] = sum(
            attention_transfer(s_feats[s], t_feats[t], masks[t]) for s, t in pairs
        ) / len(pairs)
    if config.w_fa > 0:
        terms["fa"] = sum(
            feature_alignment(s_feats[s], t_feats[t], connectors[connector_key(s)], masks[t])
            for s, t in pairs
        ) / len(pairs)
    return logits, terms


def weighted_total(config: TrialConfig, terms: dict[str, Tensor]) -> Tensor:
    """Sum of weight * term over the active terms."""
    return sum(config.weight(t) * v for t, v in terms.items())


def gradient_shares(
    config: TrialConfig, terms: dict[str, Tensor], params: list[nn.Parameter]
) -> dict[str, Tensor]:
    """Each weighted term's share of the summed per-term gradient norms over ``params``.

    A term that does not reach these parameters gets a share of 0. Costs one extra backward
    pass per term, so the training loop calls it once per epoch.
    """
    norms = {}
    for t, v in terms.items():
        if not v.requires_grad:  # fully detached (no graph at all): it cannot reach the student
            norms[t] = torch.zeros((), device=v.device)
            continue
        grads = torch.autograd.grad(
            config.weight(t) * v, params, retain_graph=True, allow_unused=True
        )
        sq = [g.float().pow(2).sum() for g in grads if g is not None]
        norms[t] = torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=v.device)
    total = torch.stack(list(norms.values())).sum().clamp_min(1e-30)
    return {t: n / total for t, n in norms.items()}
