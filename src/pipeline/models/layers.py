"""Layers shared by the airbench-style VGG and the ResNet-9-style net.

Both recipes follow Keller Jordan's cifar10-airbench and David Page's ResNet-9: a first
layer of 2x2 patch-whitening filters computed from the training images, conv -> max-pool
-> BatchNorm -> activation, BatchNorm with a frozen scale and a fast-learning bias, dirac
(identity) init of the 3x3 convs, and a scaled linear head.
"""

from __future__ import annotations

import torch
from torch import nn


class GlobalMaxPool(nn.AdaptiveMaxPool2d):
    """``nn.AdaptiveMaxPool2d(1)`` computed as a max over height and width: the same numbers, and an ONNX
    ReduceMax that every torch exporter knows (torch 2.11's has no function for ``adaptive_max_pool2d``;
    seen on the GPU machine)."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3), keepdim=True)


class PatchWhitening(nn.Conv2d):
    """2x2 conv whose filters whiten the image patches (airbench's first layer).

    :meth:`init_from` sets the weights from the eigenvectors of the covariance of the
    training patches, as +/- pairs (``out_channels = 2 * 3 * k * k``). The weights stay
    fixed; only the bias is trained, for the first epochs (see ``freeze_bias``).
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4) -> None:
        super().__init__(in_channels, 2 * in_channels * kernel_size**2, kernel_size, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def init_from(self, images: torch.Tensor) -> None:
        """``images``: normalized float training images ``(N, C, H, W)``; a few thousand are enough."""
        c, (h, w) = self.in_channels, self.kernel_size
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1)  # N, C, H', W', h, w
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w).double()
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
        filters = eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)[:, None]
        filters = filters.reshape(-1, c, h, w).float()
        self.weight.copy_(torch.cat([filters, -filters]))


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1: only the bias learns (airbench: at a much higher rate)."""

    def __init__(self, channels: int, running_momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(channels, momentum=running_momentum, eps=eps)
        self.weight.requires_grad_(False)


class Scale(nn.Module):
    """Multiply by a constant: airbench's 1/9 and ResNet-9's 1/8 on the logits."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"activation must be 'gelu' or 'relu', got {name!r}")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dirac: bool = False) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias. ``dirac``: the first ``in_channels`` filters start as the
    identity (airbench's ablation: a faster start); otherwise PyTorch's default (Kaiming-uniform) init."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
    if dirac:
        with torch.no_grad():
            nn.init.dirac_(conv.weight[: min(in_channels, out_channels)])
    return conv


def conv_pool_norm(in_channels: int, out_channels: int, act: str, pool: bool = True) -> list[nn.Module]:
    """conv -> (max-pool) -> BN -> activation: pooling before the norm makes BN and GELU 4x cheaper."""
    layers: list[nn.Module] = [conv3x3(in_channels, out_channels, dirac=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers + [FrozenScaleBatchNorm(out_channels), activation(act)]


class Residual(nn.Module):
    """x + body(x), with body = two conv -> BN -> activation at constant width (ResNet-9's residual)."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_pool_norm(channels, channels, act, pool=False),
                                  *conv_pool_norm(channels, channels, act, pool=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
