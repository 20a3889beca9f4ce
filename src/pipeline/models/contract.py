"""What every network family promises: named stages and a head that the explain graph can go back through.

``/explain`` shows the output of each stage and a Grad-CAM map on the last one. ONNX has no autograd,
so the explain graph writes the head's backward pass as forward ops (:mod:`pipeline.explain_graph`),
which it can do for the layers in :func:`head_layer_supported` only. :func:`check_explainable` checks
a built network against this when it is built, so a family that breaks the promise fails at once,
naming what is wrong, instead of training and then answering 503 on ``/explain``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from pipeline.models.layers import Scale


@runtime_checkable
class Explainable(Protocol):
    def explain_stages(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each stage, in order; the outputs /explain shows, Grad-CAM on the last."""

    def explain_head(self) -> list[nn.Module]:
        """The layers from the last stage's output to the logits, in order."""


def is_global(layer: nn.Module) -> bool:
    size = layer.output_size
    return size == 1 if isinstance(size, int) else tuple(size) == (1, 1)


def is_2x2(layer: nn.MaxPool2d) -> bool:
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    return pair(layer.kernel_size) == (2, 2) and pair(layer.stride) == (2, 2) and pair(layer.padding) == (0, 0) \
        and pair(layer.dilation) == (1, 1) and not layer.ceil_mode


def head_layer_supported(layer: nn.Module) -> bool:
    """Layers whose backward pass the explain graph writes out as forward ops."""
    if isinstance(layer, (nn.Linear, nn.ReLU, Scale, nn.Dropout, nn.Identity, nn.Flatten)):
        return True
    if isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return is_global(layer)
    return isinstance(layer, nn.MaxPool2d) and is_2x2(layer)


def check_explainable(net: nn.Module, family: str) -> None:
    """ValueError, naming the family and the problem, unless ``net`` keeps the promise above."""
    where = f"Model family {family!r} ({type(net).__name__})"
    if not isinstance(net, Explainable):
        raise ValueError(f"{where} must define explain_stages() and explain_head() (pipeline/models/contract.py).")
    stages, head = net.explain_stages(), net.explain_head()
    if not stages or not all(isinstance(name, str) and isinstance(stage, nn.Module) for name, stage in stages):
        raise ValueError(f"{where}: explain_stages() must return a non-empty list of (name, module).")
    if len({name for name, _ in stages}) != len(stages):
        raise ValueError(f"{where}: explain_stages() names two stages alike.")
    if not any(isinstance(m, nn.Conv2d) for m in net.modules()):
        raise ValueError(f"{where} has no Conv2d layer whose filters /explain can show.")
    if not any(isinstance(layer, nn.Linear) for layer in head):
        raise ValueError(f"{where}: explain_head() has no Linear layer (the logits come from one).")
    for layer in head:
        if not head_layer_supported(layer):
            raise ValueError(f"{where}: the explain graph cannot go back through {layer!r} in explain_head(); "
                             "use Linear, ReLU, Dropout, Flatten, global pooling, 2x2 max-pooling or Scale there.")
