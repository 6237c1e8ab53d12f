"""Grad-CAM causal masks: shapes, exact kept counts, hand-computed Grad-CAM, frozen teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdcore.masks import gradcam_masks, keep_count, teacher_forward_with_masks, top_positions_mask
from kdcore.models import build_model

STAGES3 = ("layer2", "layer3", "layer4")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = build_model("resnet18", width=0.125).eval().requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=g), torch.tensor([1, 4, 7])


def test_keep_count_is_ceiling_of_kept_share():
    assert keep_count(0, 64) == 64
    assert keep_count(50, 64) == 32
    assert keep_count(90, 64) == 7  # ceil(6.4)
    assert keep_count(90, 16) == 2  # ceil(1.6)
    assert keep_count(75, 16) == 4  # exactly 4, no float round-up to 5
    assert keep_count(99.9, 16) == 1  # never empty
    for pct in (10, 30, 50, 70, 90):
        for n in (1, 4, 16, 64, 256):
            assert keep_count(pct, n) == max(1, math.ceil(round((1 - pct / 100) * n, 9)))


def test_gradcam_masks_shapes_and_binary(teacher, batch):
    x, y = batch
    logits, masks = gradcam_masks(teacher, x, y, STAGES3, 50.0)
    assert logits.shape == (3, 10) and not logits.requires_grad
    assert set(masks) == set(STAGES3)
    for stage, side in zip(STAGES3, (16, 8, 4), strict=True):
        m = masks[stage]
        assert m.shape == (3, side, side), stage
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert m.flatten(1).sum(1).tolist() == [side * side / 2] * 3


def test_mask_pct_zero_keeps_everything(teacher, batch):
    x, y = batch
    _, masks = gradcam_masks(teacher, x, y, STAGES3, 0.0)
    for m in masks.values():
        assert torch.equal(m, torch.ones_like(m))


def test_mask_pct_90_keeps_exact_count_from_gradcam(teacher, batch):
    x, y = batch
    _, masks = gradcam_masks(teacher, x, y, ("layer3", "layer4"), 90.0)
    assert masks["layer3"].shape[1:] == (8, 8) and masks["layer4"].shape[1:] == (4, 4)
    assert masks["layer3"].flatten(1).sum(1).tolist() == [7.0] * 3  # ceil(0.1 * 64)
    assert masks["layer4"].flatten(1).sum(1).tolist() == [2.0] * 3  # ceil(0.1 * 16)


@pytest.mark.parametrize("side", [8, 4])
def test_top_positions_mask_exact_with_zeros_and_ties(side):
    n = side * side
    k = math.ceil(0.1 * n)
    cam = torch.zeros(4, side, side)
    cam[0, 0, 0] = 1.0  # one positive value, everything else a zero tie
    cam[1].fill_(0.5)  # all tied
    cam[2, 1, :2] = torch.tensor([0.9, 0.3])  # two positives, rest zero
    cam[3] = torch.arange(n, dtype=torch.float32).view(side, side) / n  # strictly ordered
    mask = top_positions_mask(cam, 90.0)
    assert mask.shape == (4, side, side)
    assert mask.flatten(1).sum(1).tolist() == [float(k)] * 4
    assert mask[0, 0, 0] == 1
    assert mask[2, 1, 0] == 1 and mask[2, 1, 1] == 1
    # Strictly ordered: exactly the k largest (the last k in row-major order) are kept.
    expected = torch.zeros(n)
    expected[n - k:] = 1
    assert torch.equal(mask[3].flatten(), expected)


class TinyNet(nn.Module):
    """Two conv stages and a linear head on the flattened map, so gradients vary spatially."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 10)

    def forward(self, x):
        f3 = torch.relu(self.conv1(x))  # (B, 6, 8, 8)
        f4 = torch.relu(self.conv2(f3))  # (B, 5, 4, 4)
        return self.fc(f4.flatten(1)), {"layer3": f3, "layer4": f4}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    return TinyNet().eval().requires_grad_(False)


def _np_gradcam(model, x, y, stage):
    """Grad-CAM by hand: d(target logit)/d(stage), channel weights = spatial mean, ReLU."""
    xr = x.clone().requires_grad_(True)
    logits, feats = model(xr)
    score = logits[torch.arange(len(y)), y].sum()
    (grad,) = torch.autograd.grad(score, feats[stage])
    g = grad.numpy().astype(np.float64)
    f = feats[stage].detach().numpy().astype(np.float64)
    weights = g.mean(axis=(2, 3))  # (B, C)
    return np.maximum((weights[:, :, None, None] * f).sum(axis=1), 0.0)  # (B, H, W)


@pytest.mark.parametrize(("stage", "mask_pct"), [("layer3", 50.0), ("layer3", 90.0),
                                                 ("layer4", 75.0), ("layer4", 90.0)])
def test_kept_positions_are_highest_gradcam_values(tiny, stage, mask_pct):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 3, 5, 9])
    cam = _np_gradcam(tiny, x, y, stage)
    _, masks = gradcam_masks(tiny, x, y, (stage,), mask_pct)
    mask = masks[stage].numpy()
    h, w = cam.shape[1:]
    k = math.ceil((1 - mask_pct / 100) * h * w - 1e-9)
    assert mask.shape == (4, h, w)
    exact_checks = 0
    for b in range(len(y)):
        c = cam[b].ravel()
        kept = mask[b].ravel() == 1
        assert kept.sum() == k
        assert (c > 0).sum() >= 2, "degenerate Grad-CAM: the check would be vacuous"
        # Every kept value is >= every dropped value (ties at the boundary are allowed).
        assert c[kept].min() >= c[~kept].max() - 1e-6 * c.max()
        # Without a tie at the boundary the kept set is exactly the hand-computed top-k.
        order = np.sort(c)[::-1]
        if order[k - 1] - order[k] > 1e-6 * c.max():
            assert set(np.flatnonzero(kept)) == set(np.argsort(-c)[:k])
            exact_checks += 1
    assert exact_checks >= 2


def test_target_prediction_uses_teacher_argmax(tiny):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pred = tiny(x)[0].argmax(1)
    other = (pred + 1) % 10
    _, by_pred = gradcam_masks(tiny, x, other, ("layer3",), 80.0, target="prediction")
    _, by_label = gradcam_masks(tiny, x, pred, ("layer3",), 80.0, target="label")
    _, by_other = gradcam_masks(tiny, x, other, ("layer3",), 80.0, target="label")
    assert torch.equal(by_pred["layer3"], by_label["layer3"])
    assert not torch.equal(by_other["layer3"], by_label["layer3"])  # the target matters
    with pytest.raises(ValueError, match="^target"):
        gradcam_masks(tiny, x, pred, ("layer3",), 80.0, target="logits")


def test_teacher_parameters_never_get_gradients(batch):
    torch.manual_seed(1)
    # Even a teacher whose parameters still require grad gets no .grad: only activation
    # gradients are formed.
    model = build_model("resnet18", width=0.125).eval()
    x, y = batch
    logits, feats, masks = teacher_forward_with_masks(model, x, y, STAGES3, 50.0)
    assert all(p.grad is None for p in model.parameters())
    assert not logits.requires_grad
    assert all(not f.requires_grad for f in feats.values())
    assert all(not m.requires_grad for m in masks.values())
    frozen = model.requires_grad_(False)
    _, masks2 = gradcam_masks(frozen, x, y, STAGES3, 50.0)
    assert all(p.grad is None for p in frozen.parameters())
    for s in STAGES3:
        assert torch.equal(masks[s], masks2[s])
    assert x.grad is None  # the caller's input is not turned into a leaf with gradient
