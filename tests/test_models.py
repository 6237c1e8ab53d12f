"""ResNet variants: shapes, torchvision compatibility, CBAM, width, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from kdcore.models import CBAM, STAGES, build_model, count_parameters

BASIC = {"resnet18", "resnet34"}


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_logits_and_stage_shapes(arch, stem):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, stem=stem, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
    assert logits.shape == (2, 7)
    assert list(feats) == list(STAGES)
    expansion = 1 if arch in BASIC else 4
    # CIFAR stem keeps 32x32 into layer1; the ImageNet stem (stride-2 conv + max-pool) gives 8x8.
    first = 32 if stem == "cifar" else 8
    for i, stage in enumerate(STAGES):
        channels = 8 * 2**i * expansion  # 64 * 0.125 = 8 base planes
        side = max(first // 2**i, 1)
        assert feats[stage].shape == (2, channels, side, side), stage
        assert model.stage_channels[stage] == channels
    assert model.fc.in_features == model.stage_channels["layer4"]


def test_stage_outputs_are_not_detached():
    model = build_model("resnet18", width=0.125).train()
    logits, feats = model(torch.randn(2, 3, 32, 32))
    for stage, f in feats.items():
        assert f.requires_grad, stage
    # layer4 feeds the logits: the gradient of the logits reaches it.
    (g,) = torch.autograd.grad(logits.sum(), feats["layer4"])
    assert g.abs().sum() > 0


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_loads_torchvision_weights_and_matches_logits(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    _randomize_bn(tv, seed=1)  # non-trivial running statistics, so eval mode is really tested
    tv.eval()
    ours = build_model(arch, num_classes=1000, stem="imagenet", width=1.0, cbam=False)
    result = ours.load_state_dict(tv.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(ours.state_dict()) == set(tv.state_dict())
    assert count_parameters(ours) == sum(p.numel() for p in tv.parameters())
    ours.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tv(x)
        logits, feats = ours(x)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 1e-3  # a meaningful comparison, not two constant outputs
    assert feats["layer4"].shape == (2, 2048 if arch == "resnet50" else 512, 2, 2)


def _cbam_params(channels: int) -> int:
    hidden = max(channels // 16, 1)
    return 2 * channels * hidden + 2 * 7 * 7  # shared MLP (two 1x1 convs) + 7x7 spatial conv


def test_cbam_adds_the_expected_parameters():
    plain = build_model("resnet18", width=0.25, cbam=False)
    with_cbam = build_model("resnet18", width=0.25, cbam=True)
    # Two BasicBlocks per stage, outputs 16, 32, 64, 128 channels at width 0.25.
    expected = sum(2 * _cbam_params(c) for c in (16, 32, 64, 128))
    assert count_parameters(with_cbam) - count_parameters(plain) == expected
    # ResNet-50: 3-4-6-3 bottlenecks with outputs 4x the planes.
    plain50 = build_model("resnet50", width=0.125, cbam=False)
    cbam50 = build_model("resnet50", width=0.125, cbam=True)
    expected50 = sum(n * _cbam_params(c) for n, c in zip((3, 4, 6, 3), (32, 64, 128, 256),
                                                             strict=True))
    assert count_parameters(cbam50) - count_parameters(plain50) == expected50


def test_cbam_forward_by_hand():
    cbam = CBAM(4, reduction=2)
    for p in cbam.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 4, 5, 5)
    # Zero weights: both attentions are sigmoid(0) = 1/2, so the output is x / 4.
    torch.testing.assert_close(cbam(x), x / 4)
    # Channel attention from the shared MLP over avg- and max-pooled descriptors.
    with torch.no_grad():
        cbam.mlp[0].weight.copy_(torch.eye(2, 4)[:, :, None, None])
        cbam.mlp[2].weight.copy_(torch.eye(4, 2)[:, :, None, None])
    x = torch.rand(1, 4, 3, 3)  # non-negative, so the ReLU inside the MLP is a no-op
    avg, mx = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    gate = torch.sigmoid(torch.tensor([avg[0, 0] + mx[0, 0], avg[0, 1] + mx[0, 1], 0.0, 0.0]))
    torch.testing.assert_close(cbam(x), x * gate[None, :, None, None] * 0.5)


def test_width_scales_channel_counts():
    full = build_model("resnet18", width=1.0)
    half = build_model("resnet18", width=0.5)
    assert full.stage_channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert half.stage_channels == {"layer1": 32, "layer2": 64, "layer3": 128, "layer4": 256}
    assert full.conv1.out_channels == 64 and half.conv1.out_channels == 32
    assert build_model("resnet50", width=0.25).stage_channels["layer4"] == 512
    assert count_parameters(half) < count_parameters(full) / 3


def test_unknown_arch_and_stem_raise_value_error():
    with pytest.raises(ValueError, match="architecture"):
        build_model("resnet101")
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", width=0.0)


def test_cbam_matches_its_definition_with_adaptive_pooling():
    """Channel attention from adaptive avg and max pooling through a shared MLP, then spatial
    attention from the channel mean and max (Woo et al., 2018), written out by hand."""
    torch.manual_seed(0)
    cbam = CBAM(32).eval()
    x = torch.randn(4, 32, 8, 8)
    mlp = cbam.mlp
    channel = torch.sigmoid(mlp(F.adaptive_avg_pool2d(x, 1)) + mlp(F.adaptive_max_pool2d(x, 1)))
    y = x * channel
    spatial = torch.sigmoid(cbam.spatial(torch.cat([y.mean(1, keepdim=True),
                                                     y.max(1, keepdim=True).values], dim=1)))
    torch.testing.assert_close(cbam(x), y * spatial, rtol=0, atol=1e-6)
