"""The training tricks of the airbench recipe, as small pieces the LightningModule uses.

- :func:`optimizer_groups`: SGD-Nesterov groups in airbench's units: the learning rate and
  weight decay are given per 1024 examples, the decay is decoupled from the learning rate,
  and BatchNorm biases learn ``bias_lr_scale`` times faster (airbench: 64).
- :func:`lr_factor`: linear warm-up, then linear decay (a one-cycle without momentum cycling).
- :class:`Lookahead`: every ``every`` steps the weights are pulled into an exponential
  average, with a decay that grows as ``(step / total) ** 3``; at the end the net *is* the
  average (airbench's "lookahead"). Cheaper than a per-step EMA and as good in its ablation.
- :class:`MuonSGD` (``optim.muon``): airbench94_muon's update for the conv filters, SGD for the rest.
- :func:`tta_logits`: test-time augmentation, averaged logits over flips (level 1) and
  one-pixel translations (level 2). The exported ``model.onnx`` contains it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def kilostep_scale(momentum: float) -> float:
    """airbench's unit: 1024 examples times the momentum's gain, 1 / (1 - momentum)."""
    return 1024.0 * (1.0 + 1.0 / (1.0 - momentum))


def optimizer_groups(model: nn.Module, lr: float, weight_decay: float, momentum: float, batch_size: int,
                     bias_lr_scale: float) -> list[dict]:
    """Parameter groups for ``torch.optim.SGD`` with a mean-reduced loss.

    ``lr`` and ``weight_decay`` follow airbench94 (11.5 and 0.0153 there): per 1024 examples,
    with the decay per step independent of the group's learning rate.
    """
    scale = kilostep_scale(momentum)
    step_lr = lr / scale * batch_size  # airbench sums the loss over the batch; the mean needs x batch_size
    step_decay = weight_decay * batch_size / scale
    norm_biases, others = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            (norm_biases if is_norm and name == "bias" else others).append(param)
    groups = [{"params": others, "lr": step_lr, "weight_decay": step_decay / step_lr}]
    if norm_biases:
        bias_lr = step_lr * bias_lr_scale
        groups.append({"params": norm_biases, "lr": bias_lr, "weight_decay": step_decay / bias_lr})
    return groups


def lr_factor(step: int, total: int, warmup_fraction: float, start: float, end: float) -> float:
    """Multiplier of the learning rate at ``step`` of ``total``: start -> 1 (warm-up) -> end."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        frac = step / warmup
        return start + (1.0 - start) * frac
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 + (end - 1.0) * frac


class Lookahead:
    """airbench's lookahead: an average of the weights that the net is reset to every few steps."""

    def __init__(self, model: nn.Module, every: int = 5, base_decay: float = 0.95) -> None:
        self.every, self.base_decay = every, base_decay
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int, total: int) -> float:
        return self.base_decay**self.every * (step / max(1, total)) ** 3

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """average <- lerp(average, net, 1 - decay); net <- average. ``decay=1`` makes the net the average."""
        for key, value in model.state_dict().items():
            if key in self.average:
                self.average[key].lerp_(value, 1.0 - decay)
                value.copy_(self.average[key])

    def to(self, device: torch.device) -> "Lookahead":
        self.average = {k: v.to(device) for k, v in self.average.items()}
        return self

    def state_dict(self) -> dict:
        return dict(self.average)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.average:
                self.average[key].copy_(value)


def tta_views(images: torch.Tensor, level: int) -> tuple[torch.Tensor, list[float]]:
    """The views of a batch stacked along the batch axis, and each view's weight."""
    if level == 0:
        return images, [1.0]
    views = [images, images.flip(-1)]
    weights = [0.5, 0.5]
    if level >= 2:
        # One-pixel translations up-left and down-right (reflect padding), each with its mirror.
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        up_left, down_right = padded[..., :-2, :-2], padded[..., 2:, 2:]
        views += [up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
        weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    return torch.cat(views), weights


def tta_logits(net: nn.Module, images: torch.Tensor, level: int) -> torch.Tensor:
    """Weighted mean of the logits over the TTA views (one net call for all of them)."""
    if level not in (0, 1, 2):
        raise ValueError(f"tta level must be 0 (off), 1 (flip) or 2 (flip + translate), got {level}")
    if level == 0:
        return net(images)
    stacked, weights = tta_views(images, level)
    logits = net(stacked).reshape(len(weights), images.shape[0], -1)
    weight = torch.tensor(weights, dtype=logits.dtype, device=logits.device)
    return (logits * weight[:, None, None]).sum(0)


def orthogonalize(update: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz iterations towards the nearest semi-orthogonal matrix of a 2-D ``update``
    (airbench94_muon's quintic coefficients: singular values end up in about [0.5, 1.5], not at 1,
    which trains as well and takes fewer steps). Runs in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.bfloat16()
    x = x / (x.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonSGD(torch.optim.SGD):
    """SGD-Nesterov for every group, except groups marked ``muon=True`` (the conv filters), which take
    Muon's step (Keller Jordan, airbench94_muon): Nesterov momentum, the update orthogonalised by
    :func:`orthogonalize` (filters flattened to ``(out, in * k * k)``), and each filter tensor
    renormalised to norm sqrt(out channels) before the step, so no weight decay is needed there. One
    optimizer, so one learning-rate schedule drives both kinds of group."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(param.grad)
                grad = param.grad.add(buffer, alpha=group["momentum"])
                param.mul_(len(param) ** 0.5 / param.norm().clamp_min(1e-12))
                update = orthogonalize(grad.reshape(len(grad), -1), group.get("ns_steps", 3)).view_as(grad)
                param.add_(update.to(param.dtype), alpha=-group["lr"])
        everything = self.param_groups
        self.param_groups = [group for group in everything if not group.get("muon")]
        try:
            super().step()
        finally:
            self.param_groups = everything
        return loss
