"""The LightningModule: a registered network behind the input normalization, trained with SGD."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from pipeline.models import build_model


class Classifier(nn.Module):
    """Normalization + network: takes float images in [0, 1], returns logits.

    This is the deployable unit: exported to ONNX (with a softmax) it needs nothing
    from the training code.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        arch: str,
        model_args: dict[str, Any],
        classes: list[str],
        mean: list[float],
        std: list[float],
        image_size: int = 32,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        schedule: str = "onecycle",
        warmup_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        if schedule not in ("onecycle", "cosine"):
            raise ValueError(f"schedule must be 'onecycle' or 'cosine', got {schedule!r}")
        self.save_hyperparameters()
        self.classes = list(classes)
        num_classes = len(self.classes)
        self.model = Classifier(build_model(arch, num_classes, **model_args), mean, std)
        self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_class_acc = MulticlassAccuracy(num_classes, average=None)
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_class_acc = MulticlassAccuracy(num_classes, average=None)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.confusion: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images)
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

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_train_epoch_end(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
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
                optimizer, max_lr=hp.lr, total_steps=steps, pct_start=hp.warmup_fraction,
                anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
                cycle_momentum=False,
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
