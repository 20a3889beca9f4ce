"""VGG-style nets: stacks of 3x3 conv + BatchNorm + activation with max-pools.

``cfg="airbench"`` (the default recipe) is the net of Keller Jordan's cifar10-airbench94:
a patch-whitening 2x2 first layer, then three blocks of conv -> max-pool -> BN -> GELU ->
conv -> BN -> GELU, a global max-pool and a linear layer scaled by 1/9. The other cfgs are
the classic table-driven VGGs (conv + BN + ReLU, "M" = max-pool).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from pipeline.models import register

from pipeline.models.layers import GlobalMaxPool, PatchWhitening, Scale, activation, conv_pool_norm

# Numbers are conv widths, "M" is a 2x2 max-pool.
CFGS: dict[str, list[Union[int, str]]] = {
    "small": [64, "M", 128, "M", 256, "M"],
    "vgg8": [64, 64, "M", 128, 128, "M", 256, 256, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


def make_layers(cfg: Sequence[Union[int, str]], in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        elif isinstance(item, int):
            layers += [
                nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(item),
                nn.ReLU(inplace=True),
            ]
            channels = item
        else:
            raise ValueError(f"VGG cfg entries are ints or 'M', got {item!r}")
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, num_classes: int, cfg: str = "small", in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if cfg not in CFGS:
            raise ValueError(f"Unknown VGG cfg {cfg!r}: choose one of airbench, {', '.join(CFGS)}")
        self.features = make_layers(CFGS[cfg], in_channels)
        width = [c for c in CFGS[cfg] if isinstance(c, int)][-1]
        # Global pooling keeps the head independent of the input size.
        self.classifier = nn.Sequential(
            GlobalMaxPool(),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def explain_stages(self) -> list[tuple[str, nn.Module]]:
        """One stage per conv block (a block starts at the pool before it); the trailing pool goes to the head."""
        groups: list[list[nn.Module]] = [[]]
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d) and any(isinstance(m, nn.Conv2d) for m in groups[-1]):
                groups.append([])
            groups[-1].append(layer)
        blocks = [g for g in groups if any(isinstance(m, nn.Conv2d) for m in g)]
        return [(f"block{i + 1}", nn.Sequential(*g)) for i, g in enumerate(blocks)]

    def explain_head(self) -> list[nn.Module]:
        used = {id(m) for _, stage in self.explain_stages() for m in stage}
        return [m for m in self.features if id(m) not in used] + list(self.classifier)


class AirbenchVGG(nn.Module):
    """airbench94's net: whitening stem, three conv groups (widths), global max-pool, scaled linear head."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (64, 256, 256), act: str = "gelu",
                 in_channels: int = 3, logit_scale: float = 1 / 9) -> None:
        super().__init__()
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"airbench VGG widths must be positive ints, got {list(widths)}")
        self.whiten = PatchWhitening(in_channels, kernel_size=2)
        self.stem = nn.Sequential(self.whiten, activation(act))
        blocks, channels = [], self.whiten.out_channels
        for width in widths:
            blocks.append(nn.Sequential(*conv_pool_norm(channels, int(width), act),
                                        *conv_pool_norm(int(width), int(width), act, pool=False)))
            channels = int(width)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(GlobalMaxPool(), nn.Flatten(),
                                  nn.Linear(channels, num_classes, bias=False), Scale(logit_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def explain_stages(self) -> list[tuple[str, nn.Module]]:
        return [("whiten", self.stem), *[(f"block{i + 1}", block) for i, block in enumerate(self.blocks)]]

    def explain_head(self) -> list[nn.Module]:
        return list(self.head)


@register("vgg")
def vgg(num_classes: int, cfg: str = "small", **kwargs) -> nn.Module:
    if cfg == "airbench":
        return AirbenchVGG(num_classes=num_classes, **kwargs)
    return VGG(num_classes=num_classes, cfg=cfg, **kwargs)
