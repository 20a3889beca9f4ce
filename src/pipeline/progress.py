"""Progress that reads well anywhere: rich bars on a terminal, one line per epoch in a log or CI."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar


def _minutes(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class EpochLines(Callback):
    """After each epoch (its validation included): family, epoch/total, train and val loss and accuracy, lr, seconds, ETA."""

    def __init__(self, family: str, stream: TextIO | None = None) -> None:
        self.family = family
        self.stream = stream
        self.started = self.epoch_started = time.perf_counter()
        self.first_epoch = 0

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self.started = time.perf_counter()
        self.first_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self.epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        done = epoch - self.first_epoch
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (total - epoch)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")

        def value(name: str) -> str:
            return f"{metrics[name]:.4f}" if name in metrics else "-"

        line = (f"{self.family} epoch {epoch}/{total}: train loss {value('train/loss')} acc {value('train/acc')}, "
                f"val loss {value('val/loss')} acc {value('val/acc')}, lr {lr:.3g}, "
                f"{time.perf_counter() - self.epoch_started:.1f} s, ETA {_minutes(eta)}")
        print(line, file=self.stream or sys.stdout, flush=True)


def progress_callback(family: str, stream: TextIO | None = None) -> Callback:
    """The rich bar where a person watches a terminal; plain epoch lines where output goes to a file."""
    out = stream or sys.stdout
    return RichProgressBar() if out.isatty() else EpochLines(family, out)
