"""ResNet-18/34/50 with a CIFAR or ImageNet stem, a width multiplier and optional CBAM.

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``fc``…),
so ``stem="imagenet", width=1.0, cbam=False`` loads torchvision weights unchanged. A model
returns ``(logits, {"layer1": f1, ..., "layer4": f4})``: the stage outputs are explicit return
values, never captured by hooks, and nothing is detached.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .names import ARCHITECTURE_NAMES, STAGES, STEMS


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., 2018): channel, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # mean/amax rather than adaptive pooling: the same values, and on the CPU
        # adaptive_max_pool2d (which also computes indices) cost 12% of a ResNet-50 forward.
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        mx = self.mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        desc = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(desc))


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, cbam: bool = False):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.cbam = CBAM(out_ch) if cbam else None
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out = self.cbam(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, cbam: bool = False):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.cbam = CBAM(out_ch) if cbam else None
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.cbam is not None:
            out = self.cbam(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet whose forward returns ``(logits, stage_outputs)``.

    ``stage_channels`` maps each stage name to its output channel count, which the
    feature-alignment connectors need.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        cbam: bool = False,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem: expected 'cifar' or 'imagenet', got {stem!r}")
        if not width > 0:
            raise ValueError(f"width: must be > 0, got {width}")
        planes = [max(1, round(64 * width * 2**i)) for i in range(4)]
        stem_ch = planes[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, stem_ch, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem_ch, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)

        in_ch = stem_ch
        self.stage_channels: dict[str, int] = {}
        for i, (name, n_blocks) in enumerate(zip(STAGES, layers, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, planes[i], stride if j == 0 else 1, cbam))
                in_ch = planes[i] * block.expansion
            setattr(self, name, nn.Sequential(*blocks))
            self.stage_channels[name] = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features: dict[str, Tensor] = {}
        for name in STAGES:
            x = getattr(self, name)(x)
            features[name] = x
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits, features


def resnet18(num_classes: int = 10, stem: str = "cifar", width: float = 1.0, cbam: bool = False):
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, stem, width, cbam)


def resnet34(num_classes: int = 10, stem: str = "cifar", width: float = 1.0, cbam: bool = False):
    """ResNet-34 (BasicBlock, 3-4-6-3)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, stem, width, cbam)


def resnet50(num_classes: int = 10, stem: str = "cifar", width: float = 1.0, cbam: bool = False):
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, stem, width, cbam)


# Builders by name, in the order of ``names.ARCHITECTURE_NAMES`` (the torch-free list).
ARCHITECTURES = dict(zip(ARCHITECTURE_NAMES, (resnet18, resnet34, resnet50), strict=True))


def build_model(
    arch: str, num_classes: int = 10, stem: str = "cifar", width: float = 1.0, cbam: bool = False
) -> ResNet:
    """Build a model by architecture name; unknown names raise ``ValueError``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture: unknown {arch!r}, expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, stem=stem, width=width, cbam=cbam)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of a model (connectors are separate modules, so never counted)."""
    return sum(p.numel() for p in model.parameters())
