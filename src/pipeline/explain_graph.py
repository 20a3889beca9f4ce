"""What a trained network sees, as one torch module that also exports to ONNX.

:class:`ExplainNet` wraps a :class:`~pipeline.module.Classifier` and returns, for a batch
of images in [0, 1]:

- the softmax probabilities;
- the raw responses of the first conv layer (the learned filters applied to the image);
- the output of every stage the network names (``explain_stages()`` on each model);
- a Grad-CAM map for every class on the last stage (Selvaraju et al. 2017).

Grad-CAM needs d(logit)/d(last stage). ONNX has no autograd, so the backward pass through
the head (the few layers after the last stage: pools, flatten, linear, ReLU, dropout) is
written out as forward ops here; :func:`gradcam_autograd` is the plain-autograd
reference that the tests and ``pipeline package`` compare it against. The service runs the
exported graph with ONNX Runtime, so it still needs no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.runtime.model_folder import EXPLAIN_JSON, EXPLAIN_ONNX

if TYPE_CHECKING:
    from pipeline.runtime.onnx_model import OnnxClassifier
from pipeline.models.contract import is_2x2, is_global
from pipeline.models.layers import Scale


def first_conv(net: nn.Module) -> nn.Conv2d:
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{type(net).__name__} has no Conv2d layer to show filters of.")


def stages_and_head(net: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[nn.Module]]:
    return net.explain_stages(), net.explain_head()  # every registered net names them (models/contract.py)


def _head_forward(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    outputs = [x]
    for layer in layers:
        # Not in place: the backward pass below reads the saved tensors.
        x = F.relu(x) if isinstance(layer, nn.ReLU) else layer(x)
        outputs.append(x)
    return outputs


def _unpool2x2(grad: torch.Tensor, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Backward of a 2x2/stride-2 max-pool: each window's gradient goes to its maxima (ties share it)."""
    n, k = grad.shape[:2]
    channels, height, width = inp.shape[1:]
    up = F.interpolate(out, scale_factor=2.0, mode="nearest")
    pad = (0, width - up.shape[-1], 0, height - up.shape[-2])
    inside = F.pad(up, pad, value=float("inf")) if any(pad) else up
    mask = (inp == inside).to(inp.dtype)
    count = F.interpolate(F.avg_pool2d(mask, 2) * 4.0, scale_factor=2.0, mode="nearest")
    if any(pad):
        count = F.pad(count, pad, value=1.0)
    share = (mask / count.clamp_min(1.0)).unsqueeze(1)
    g = F.interpolate(grad.reshape(n * k, channels, *grad.shape[-2:]), scale_factor=2.0, mode="nearest")
    g = F.pad(g, pad) if any(pad) else g
    return g.reshape(n, k, channels, height, width) * share


def head_gradients(layers: list[nn.Module], features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and d(logit_k)/d(features) ``(N, K, C, H, W)`` for every class k, as forward ops."""
    saved = _head_forward(layers, features)
    logits = saved[-1]
    n, k = logits.shape
    grad = torch.eye(k, dtype=features.dtype, device=features.device).unsqueeze(0).expand(n, k, k)
    for layer, inp, out in reversed(list(zip(layers, saved[:-1], saved[1:]))):
        if isinstance(layer, nn.Linear):
            grad = grad @ layer.weight
        elif isinstance(layer, nn.ReLU):
            grad = grad * (out > 0).to(grad.dtype).unsqueeze(1)
        elif isinstance(layer, Scale):
            grad = grad * layer.factor
        elif isinstance(layer, (nn.Dropout, nn.Identity)):
            pass
        elif isinstance(layer, nn.Flatten):
            grad = grad.reshape(n, k, *inp.shape[1:])
        elif isinstance(layer, nn.AdaptiveAvgPool2d) and is_global(layer):
            grad = grad.expand(n, k, *inp.shape[1:]) / float(inp.shape[-1] * inp.shape[-2])
        elif isinstance(layer, nn.AdaptiveMaxPool2d) and is_global(layer):
            mask = (inp == inp.amax(dim=(2, 3), keepdim=True)).to(inp.dtype)
            grad = grad * (mask / mask.sum(dim=(2, 3), keepdim=True)).unsqueeze(1)
        elif isinstance(layer, nn.MaxPool2d) and is_2x2(layer):
            grad = _unpool2x2(grad, inp, out)
        else:
            raise ValueError(f"Grad-CAM cannot go back through {layer!r} in the head.")
    return logits, grad


def gradcam(features: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c mean_hw(dy_k/dA_c) * A_c): ``(N, K, H, W)``, one map per class, not rescaled."""
    weights = grad.mean(dim=(-2, -1))  # (N, K, C)
    return F.relu(torch.einsum("nkc,nchw->nkhw", weights, features))


class ExplainNet(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        net = classifier.net
        self.stages, self.head = stages_and_head(net)
        self.stage_names = [name for name, _ in self.stages]
        self._stage_modules = nn.ModuleList([module for _, module in self.stages])
        self.conv = first_conv(net)

    def output_names(self) -> list[str]:
        return ["probabilities", "first_conv", *[f"stage_{name}" for name in self.stage_names], "cam"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images - self.classifier.mean) / self.classifier.std
        c = self.conv
        responses = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        maps = []
        for module in self._stage_modules:
            x = module(x)
            maps.append(x)
        logits, grad = head_gradients(self.head, x)
        tta = getattr(self.classifier, "tta", 0)
        if tta:  # the probabilities are model.onnx's (averaged over the TTA views); the pictures are of the image
            logits = self.classifier.logits(images, tta)
        probabilities = torch.softmax(self.classifier.calibrate(logits), dim=-1)
        return (probabilities, responses, *maps, gradcam(x, grad))


def gradcam_autograd(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The reference Grad-CAM, with torch autograd: ``(N, K, H, W)``."""
    stages, head = stages_and_head(classifier.net)
    x = (images - classifier.mean) / classifier.std
    with torch.no_grad():
        for _, module in stages:
            x = module(x)
    features = x.detach().requires_grad_(True)
    logits = features
    for layer in head:
        logits = F.relu(logits) if isinstance(layer, nn.ReLU) else layer(logits)
    maps = []
    for k in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), features, retain_graph=True)
        weights = grad.mean(dim=(2, 3))
        maps.append(F.relu((weights[:, :, None, None] * features).sum(1)))
    return torch.stack(maps, dim=1).detach()


def describe(explain: ExplainNet, image_size: int) -> dict:
    """What explain.json holds: stage shapes, the Grad-CAM stage and the first-layer filters."""
    with torch.no_grad():
        outputs = explain(torch.zeros(1, 3, image_size, image_size))
    stages = [{"name": name, "shape": list(out.shape[1:])} for name, out in zip(explain.stage_names, outputs[2:-1])]
    conv = explain.conv
    return {
        "outputs": explain.output_names(),
        "stages": stages,
        "cam_stage": explain.stage_names[-1],
        "first_layer": {"shape": list(conv.weight.shape), "weight": conv.weight.detach().cpu().tolist()},
        "method": "Grad-CAM on the last stage; head backward written as forward ops (pipeline.explain_graph)",
    }


def export_explain(classifier: nn.Module, image_size: int, folder: Path) -> tuple[Path, Path]:
    """Write explain.onnx and explain.json for ``classifier`` into ``folder``."""
    classifier = classifier.eval().float().cpu().to(memory_format=torch.contiguous_format)
    explain = ExplainNet(classifier).eval()
    example = torch.rand(2, 3, image_size, image_size)
    names = explain.output_names()
    program = torch.onnx.export(
        explain, (example,), dynamo=True, input_names=["image"], output_names=names,
        dynamic_shapes=({0: torch.export.Dim("batch", max=256)},), verbose=False,
    )
    onnx_path, json_path = folder / EXPLAIN_ONNX, folder / EXPLAIN_JSON
    program.save(str(onnx_path))
    json_path.write_text(json.dumps(describe(explain, image_size)))
    return onnx_path, json_path


def save_pictures(classifier: nn.Module, image: torch.Tensor, classes: list[str], folder: Path) -> list[Path]:
    """filters.png, and feature_maps/ for one uint8 ``(3, H, W)`` image: the input, each stage, Grad-CAM."""
    from pipeline.runtime import pictures

    explain = ExplainNet(classifier.eval().float().cpu()).eval()
    with torch.no_grad():
        outputs = [o[0].numpy() for o in explain(image[None].float().cpu() / 255)]
    probabilities, stage_maps, cam = outputs[0], outputs[2:-1], outputs[-1]
    rgb = np.ascontiguousarray(image.cpu().numpy().transpose(1, 2, 0))
    predicted = int(probabilities.argmax())
    maps_dir = folder / "feature_maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    drawn = {folder / "filters.png": pictures.filter_grid(explain.conv.weight.detach().numpy()),
             maps_dir / "00_input.png": pictures.upscale(rgb, 128)}
    for index, (name, maps) in enumerate(zip(explain.stage_names, stage_maps), start=1):
        drawn[maps_dir / f"{index:02d}_{name}.png"] = pictures.feature_map_grid(maps)
    gradcam_name = f"{len(stage_maps) + 1:02d}_gradcam_{classes[predicted]}.png"
    drawn[maps_dir / gradcam_name] = pictures.overlay(rgb, cam[predicted])
    for path, picture in drawn.items():
        path.write_bytes(pictures.png_bytes(picture))
    return list(drawn)


PROBABILITY_TOLERANCE = 1e-5


def export_checked_explain(classifier: nn.Module, model: "OnnxClassifier", images: torch.Tensor,
                           out: Path) -> dict[str, float]:
    """Export explain.onnx/explain.json into ``out``; check its probabilities against model.onnx and
    its Grad-CAM against torch autograd. Returns the two largest differences; raises ModelError
    when they are over tolerance, ValueError when the net names no stages."""
    from pipeline.runtime.explainer import Explainer
    from pipeline.runtime.model_folder import ModelError

    export_explain(classifier, model.image_size, out)
    session = Explainer.from_folder(out, model.classes).session
    probabilities, cam = session.run(["probabilities", "cam"], {"image": images.numpy().astype(np.float32) / 255})
    reference = gradcam_autograd(classifier, images.float() / 255).numpy()
    diffs = {
        "explain_probability_max_abs_diff": float(np.abs(probabilities - model.predict_proba(images.numpy())).max()),
        "gradcam_max_rel_diff": float(np.abs(cam - reference).max() / max(float(np.abs(reference).max()), 1e-12)),
    }
    if diffs["explain_probability_max_abs_diff"] > PROBABILITY_TOLERANCE or diffs["gradcam_max_rel_diff"] > 1e-3:
        raise ModelError(f"The explain graph disagrees with the model ({diffs}).")
    return diffs
