"""The LightningModule: a registered network behind the input normalization, trained with SGD.

Two optimiser recipes (``optim.recipe``):

- ``airbench`` (the default of the VGG and ResNet families): Keller Jordan's cifar10-airbench
  settings, see :mod:`pipeline.recipe`: learning rate and decay per 1024 examples, decoupled
  decay, fast BatchNorm biases, warm-up then linear decay, lookahead weights, and the
  whitening layer's bias trained for the first epochs only.
- ``sgd``: plain SGD-Nesterov with one-cycle or cosine (LeNet, and the older nets).

Test-time augmentation (``model.tta``: 0 off, 1 flips, 2 flips + translations) is part of
:class:`Classifier`'s eval-mode forward, so the exported ``model.onnx``, the reported
validation and test accuracy and ``/classify`` all compute the same thing.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from pipeline.calibration import Temperature
from pipeline.config import Config, ModelSettings, OptimSettings, check_section
from pipeline.models import build_model, load_family_module
from pipeline.recipe import Lookahead, MuonSGD, lr_factor, optimizer_groups, tta_logits, tta_views

class Classifier(nn.Module):
    """Normalization + network: takes float images in [0, 1], returns logits.

    This is the deployable unit: exported to ONNX (with its temperature and a softmax) it needs
    nothing from the training code. The temperature divides the logits before the softmax
    (:meth:`calibrate`); it is fitted on the validation split after training (:mod:`pipeline.calibration`)
    and travels in the model's metadata, not in the state_dict.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], tta: int = ModelSettings.tta,
                 temperature: Temperature | float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.tta = int(tta)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # T(z) = temperature * exp(slope * (max(z) - mean) / std) (calibration.Temperature); slope 0: one number.
        self.register_buffer("temperature", torch.tensor(1.0), persistent=False)
        self.register_buffer("temperature_shape", torch.tensor([0.0, 0.0, 1.0]), persistent=False)
        self.set_temperature(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits; in eval mode averaged over the TTA views (``self.tta``)."""
        return self.logits(images, 0 if self.training else self.tta)

    def logits(self, images: torch.Tensor, tta: int) -> torch.Tensor:
        return tta_logits(self.net, (images - self.mean) / self.std, tta)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features ``(N, D)`` and logits, both averaged over the TTA views, in one net call.

        The head's last layers (a linear layer, maybe a constant scale) are affine with weights that sum
        to 1 over the views, so the logits of the averaged features are the averaged logits: the same
        numbers as :meth:`forward` in eval mode.
        """
        stacked, weights = tta_views((images - self.mean) / self.std, self.tta)
        body, tail = split_head(self.net)
        features = body(stacked).reshape(len(weights), images.shape[0], -1)
        weight = torch.tensor(weights, dtype=features.dtype, device=features.device)
        features = (features * weight[:, None, None]).sum(0)
        return features, tail(features)

    def set_temperature(self, temperature: Temperature | float) -> None:
        """Take a fitted :class:`pipeline.calibration.Temperature` (or one number)."""
        t = temperature if isinstance(temperature, Temperature) else Temperature(float(temperature))
        self.temperature.fill_(t.base)
        self.temperature_shape.copy_(torch.tensor([t.slope, t.mean, t.std]))

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits / T(logits)``: every logit of an image divided by the same number, so the answer stays."""
        slope, mean, std = self.temperature_shape
        top = logits.amax(dim=-1, keepdim=True)
        return logits / (self.temperature * torch.exp(slope * (top - mean) / std))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated softmax probabilities: what model.onnx, /classify and every report give."""
        return torch.softmax(self.calibrate(self(images)), dim=-1)


def outlier_loss(outlier_logits: torch.Tensor, kind: str, inside_logits: torch.Tensor | None = None,
                 margins: tuple[float, float] = (-25.0, -7.0)) -> torch.Tensor:
    """Outlier exposure: push the answers for out-of-scope images towards "none of these".

    ``uniform`` (Hendrycks et al. 2019): cross-entropy from the softmax to the uniform distribution.
    ``energy`` (Liu et al. 2020): squared hinges that keep in-scope energies below ``margins[0]`` and
    outlier energies above ``margins[1]`` (energy = -logsumexp of the logits).
    """
    if kind == "uniform":
        return -F.log_softmax(outlier_logits.float(), dim=1).mean()
    if kind == "energy":
        energy_out = -torch.logsumexp(outlier_logits.float(), dim=1)
        loss = F.relu(margins[1] - energy_out).pow(2).mean()
        if inside_logits is not None and len(inside_logits):
            energy_in = -torch.logsumexp(inside_logits.float(), dim=1)
            loss = loss + F.relu(energy_in - margins[0]).pow(2).mean()
        return loss
    raise ValueError(f"optim.outlier_loss must be uniform or energy, got {kind!r}")


def split_head(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(everything up to the penultimate features, the rest): the net's named stages and head
    (``explain_stages`` / ``explain_head``) cut before the head's last linear layer."""
    head = list(net.explain_head())
    linear = [i for i, layer in enumerate(head) if isinstance(layer, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(net).__name__}'s head has no linear layer.")
    body = nn.Sequential(*[stage for _, stage in net.explain_stages()], *head[: linear[-1]])
    return body, nn.Sequential(*head[linear[-1]:])


class LitClassifier(L.LightningModule):
    """The training side of a :class:`Classifier`: loss, metrics, lookahead and the optimiser (``optim:``)."""

    def __init__(self, arch: str, model_args: dict[str, Any], classes: list[str], mean: list[float], std: list[float],
                 tta: int, optim: OptimSettings | dict[str, Any]) -> None:
        super().__init__()
        if isinstance(optim, OptimSettings):
            optim = asdict(optim)  # the checkpoint's hyperparameters stay plain data (weights_only loading)
        self.optim = check_section(OptimSettings(**optim), "optim")
        self.save_hyperparameters()
        self.classes = list(classes)
        num_classes = len(self.classes)
        self.model = Classifier(build_model(arch, num_classes, **model_args), mean, std, tta=tta)
        self.model.to(memory_format=torch.channels_last)
        # validate_args=False: the argument checks force a host sync on every step (measurable on a GPU).
        metric = dict(validate_args=False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", **metric)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", **metric)
        self.val_class_acc = MulticlassAccuracy(num_classes, average=None, **metric)
        self.val_confusion = MulticlassConfusionMatrix(num_classes, **metric)
        self.confusion: dict[str, torch.Tensor] = {}
        self.lookahead: Lookahead | None = None

    @classmethod
    def from_config(cls, config: Config, dm) -> "LitClassifier":
        """The module of a run: its family's network for the data module's classes and statistics."""
        dm.prepare()
        load_family_module(config.model.module)
        return cls(config.model.arch, config.model.args, dm.classes, dm.mean, dm.std, config.model.tta, config.optim)

    def setup(self, stage: str) -> None:
        whiten = getattr(self.model.net, "whiten", None)
        if stage == "fit" and whiten is not None:
            # Patch-whitening filters from the training split (5,000 images are plenty; the same on every rank).
            # A resumed run then loads its own filters from the checkpoint over these.
            # On a GPU the data module holds the images in GPU memory: the filters are computed on the CPU.
            sample = self.trainer.datamodule.train_images[:5000].cpu().float().div(255.0)
            whiten.init_from((sample - self.model.mean.cpu()) / self.model.std.cpu())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        inside = labels >= 0  # outliers (data.outliers) come labelled -1
        loss = F.cross_entropy(logits[inside], labels[inside], label_smoothing=self.optim.label_smoothing)
        self.train_acc(logits[inside], labels[inside])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        if not bool(inside.all()):
            exposure = outlier_loss(logits[~inside], self.optim.outlier_loss, logits[inside],
                                    tuple(self.optim.outlier_margins))
            self.log("train/outlier_loss", exposure, on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + self.optim.outlier_weight * exposure
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = batch
        # Per-epoch validation without TTA (6x cheaper); publish scores the final model with its TTA.
        logits = self.model.logits(images, 0)
        loss = F.cross_entropy(logits, labels)
        getattr(self, f"{stage}_acc").update(logits, labels)
        getattr(self, f"{stage}_class_acc").update(logits, labels)
        getattr(self, f"{stage}_confusion").update(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def _eval_epoch_end(self, stage: str) -> None:
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc").compute(), prog_bar=True, sync_dist=True)
        per_class = getattr(self, f"{stage}_class_acc").compute()
        for name, value in zip(self.classes, per_class):
            self.log(f"{stage}/acc_{name}", value, sync_dist=True)
        self.confusion[stage] = getattr(self, f"{stage}_confusion").compute().cpu()
        for metric in ("acc", "class_acc", "confusion"):
            getattr(self, f"{stage}_{metric}").reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_train_epoch_end(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], sync_dist=True)

    def on_fit_start(self) -> None:
        if self.optim.lookahead and self.lookahead is None:
            self.lookahead = Lookahead(self.model)
        elif self.lookahead is not None:  # restored from a checkpoint, maybe on another device
            self.lookahead.to(self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.lookahead is None:
            return
        step, total = self.global_step, int(self.trainer.estimated_stepping_batches)
        if step >= total:  # the last step: the net becomes the average, before its validation and checkpoint
            self.lookahead.update(self.model, 1.0)
        elif step % self.lookahead.every == 0:
            self.lookahead.update(self.model, self.lookahead.decay(step, total))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.lookahead is not None:
            checkpoint["lookahead"] = self.lookahead.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "lookahead" in checkpoint and self.optim.lookahead:
            self.lookahead = Lookahead(self.model)
            self.lookahead.load_state_dict(checkpoint["lookahead"])

    def configure_optimizers(self):
        hp = self.optim
        if hp.recipe == "airbench":
            return self._airbench_optimizer()
        # No weight decay on biases and BatchNorm parameters.
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, momentum=hp.momentum, nesterov=True,
        )
        steps = int(self.trainer.estimated_stepping_batches)
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                # At least 4 steps: with 1 (a 1-epoch toy run) OneCycleLR extrapolates to a negative rate.
                optimizer, max_lr=hp.lr, total_steps=max(steps, 4), pct_start=hp.warmup_fraction,
                anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
                cycle_momentum=False,
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _global_batch(self) -> int:
        dm = self.trainer.datamodule
        return dm.rank_batch_size() * self.trainer.world_size if dm is not None else 512

    def _airbench_optimizer(self):
        hp = self.optim
        groups = optimizer_groups(self.model, hp.lr, hp.weight_decay, hp.momentum, self._global_batch(),
                                  hp.bias_lr_scale)
        if hp.muon:
            # airbench94_muon: the conv filters (4-D, trained) take Muon's step, no weight decay; the rest as before.
            filters = [p for p in self.model.parameters() if p.ndim == 4 and p.requires_grad]
            chosen = {id(p) for p in filters}
            for group in groups:
                group["params"] = [p for p in group["params"] if id(p) not in chosen]
            groups.append({"params": filters, "lr": hp.muon_lr, "momentum": hp.muon_momentum, "weight_decay": 0.0,
                           "muon": True})
        total = int(self.trainer.estimated_stepping_batches)

        def factor(step: int) -> float:
            return lr_factor(step, total, hp.warmup_fraction, hp.lr_start, hp.lr_end)

        schedule = [factor] * len(groups)
        whiten = getattr(self.model.net, "whiten", None)
        if whiten is not None:
            # airbench: the whitening layer's bias learns for the first epochs, then stays fixed. Its own group's
            # rate drops to 0 then; turning requires_grad off instead breaks DDP ("Expected to have finished
            # reduction in the prior iteration"): the gradient is still reduced, just not applied.
            for group in groups:
                group["params"] = [p for p in group["params"] if p is not whiten.bias]
            groups.append({**groups[0], "params": [whiten.bias]})
            freeze = hp.whiten_bias_epochs * total // max(1, int(self.trainer.max_epochs or 1))
            schedule.append(lambda step: factor(step) if step < freeze else 0.0)
        optimizer = MuonSGD(groups, momentum=hp.momentum, nesterov=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
