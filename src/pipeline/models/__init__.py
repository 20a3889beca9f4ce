"""Registry of network families: a name maps to a builder taking ``num_classes`` and kwargs."""

from __future__ import annotations

from typing import Callable

from torch import nn

from pipeline.models.lenet import lenet
from pipeline.models.resnet import resnet
from pipeline.models.vgg import vgg

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": lenet,
    "vgg": vgg,
    "resnet": resnet,
}


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered network; ``kwargs`` are the family's constructor arguments."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}.")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
