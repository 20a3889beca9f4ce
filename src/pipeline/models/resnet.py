"""Residual nets for small images.

``variant="resnet9"`` (the default recipe) follows David Page's ResNet-9 (DAWNBench): a
stem, then three layers of conv -> max-pool -> BN -> activation, with a two-conv residual
after the first and the last; global max-pool and a linear head scaled by 1/8. Here the
stem is airbench's patch-whitening layer and ``widths`` sets the three layer widths
(Page's are 128, 256, 512; the CPU recipe uses less).

``variant="cifar"`` is He et al. 2015's CIFAR ResNet (section 4.2): ``depth`` = 6n + 2
with three stages, ``width`` scaling the stage widths (16, 32, 64); ResNet-20 is depth 20.
"""

from __future__ import annotations

import torch
from torch import nn

from torch.nn import functional as F

from pipeline.models import register
from pipeline.models.layers import GlobalMaxPool, PatchWhitening, Residual, Scale, activation, conv3x3, conv_pool_norm


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    def __init__(self, num_classes: int, depth: int = 20, width: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, ...), got {depth}")
        if width < 1:
            raise ValueError(f"ResNet width must be >= 1, got {width}")
        blocks = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(
            conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block: every block starts as identity (Goyal et al.).
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def explain_stages(self) -> list[tuple[str, nn.Module]]:
        """The stages whose outputs `pipeline.explain_graph` shows; the last one gets the Grad-CAM."""
        return [("stem", self.stem), *[(f"stage{i + 1}", stage) for i, stage in enumerate(self.stages)]]

    def explain_head(self) -> list[nn.Module]:
        return list(self.head)


class ResNet9(nn.Module):
    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (64, 128, 256), act: str = "gelu",
                 in_channels: int = 3, logit_scale: float = 0.125) -> None:
        super().__init__()
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"ResNet-9 needs three positive widths, got {list(widths)}")
        w1, w2, w3 = (int(w) for w in widths)
        self.whiten = PatchWhitening(in_channels, kernel_size=2)
        self.stem = nn.Sequential(self.whiten, activation(act))
        self.layer1 = nn.Sequential(*conv_pool_norm(self.whiten.out_channels, w1, act), Residual(w1, act))
        self.layer2 = nn.Sequential(*conv_pool_norm(w1, w2, act))
        self.layer3 = nn.Sequential(*conv_pool_norm(w2, w3, act), Residual(w3, act))
        self.head = nn.Sequential(GlobalMaxPool(), nn.Flatten(),
                                  nn.Linear(w3, num_classes, bias=False), Scale(logit_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def explain_stages(self) -> list[tuple[str, nn.Module]]:
        return [("whiten", self.stem), ("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3)]

    def explain_head(self) -> list[nn.Module]:
        return list(self.head)


@register("resnet")
def resnet(num_classes: int, variant: str = "cifar", **kwargs) -> nn.Module:
    if variant == "resnet9":
        return ResNet9(num_classes=num_classes, **kwargs)
    if variant != "cifar":
        raise ValueError(f"Unknown ResNet variant {variant!r}: choose resnet9 or cifar")
    return ResNet(num_classes=num_classes, **kwargs)
