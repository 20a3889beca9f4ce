"""LeNet-5 as the classic ConvNet explanations draw it.

conv 5x5 (6) -> ReLU -> max-pool 2 -> conv 5x5 (16) -> ReLU -> max-pool 2
-> FC 120 -> ReLU -> FC 84 -> ReLU -> FC num_classes (softmax is applied outside the net).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DataSettings
from pipeline.models import register


class LeNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = DataSettings.image_size) -> None:
        super().__init__()
        if image_size < 16 or image_size % 4:
            raise ValueError(f"LeNet needs an image_size divisible by 4 and >= 16, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def explain_stages(self) -> list[tuple[str, nn.Module]]:
        """The stages whose outputs `pipeline.explain_graph` shows; the last one gets the Grad-CAM."""
        f = self.features
        return [("conv1", nn.Sequential(f[0], f[1])), ("pool1", f[2]), ("conv2", nn.Sequential(f[3], f[4]))]

    def explain_head(self) -> list[nn.Module]:
        """The layers from the last stage to the logits."""
        return [self.features[5], *self.classifier]


@register("lenet")
def lenet(num_classes: int, **kwargs) -> LeNet:
    return LeNet(num_classes=num_classes, **kwargs)
