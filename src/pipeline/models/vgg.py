"""VGG-style nets: stacks of 3x3 conv + BatchNorm + ReLU with max-pools, from a cfg table."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

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
            raise ValueError(f"Unknown VGG cfg {cfg!r}: choose one of {', '.join(CFGS)}")
        self.features = make_layers(CFGS[cfg], in_channels)
        width = [c for c in CFGS[cfg] if isinstance(c, int)][-1]
        # Global pooling keeps the head independent of the input size.
        self.classifier = nn.Sequential(
            nn.AdaptiveMaxPool2d(1),
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


def vgg(num_classes: int, **kwargs) -> VGG:
    return VGG(num_classes=num_classes, **kwargs)
