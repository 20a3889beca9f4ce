"""Lightning path vs a plain PyTorch loop: same net, data tensors, batch size, augmentation.

    python bench/train_overhead.py --data ../shared/data/cifar4/train --model resnet --rounds 3

Prints img/s for each, interleaved round by round, and the median ratio. The Lightning
path is the one `make train` uses (MLflow logger on sqlite, rich progress bar,
checkpointing every epoch), minus validation, which the plain loop does not do either.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from pipeline.config import resolve_config
from pipeline.data import ImageFolderDataModule, augment_batch
from pipeline.module import LitClassifier


def plain_loop(module, dm, steps: int) -> float:
    model = module.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batches = dm.train_dataloader()
    done, started = 0, time.perf_counter()
    while done < steps:
        for images, labels in batches:
            images = augment_batch(images.float().div_(255.0), dm.settings.crop_padding, dm.settings.flip)
            images = images.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return steps * dm.settings.batch_size / (time.perf_counter() - started)


class Timer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.started


def lightning_path(module, dm, steps: int, tmp: Path, with_logging: bool) -> float:
    timer = Timer()
    callbacks = [timer]
    logger = False
    if with_logging:
        callbacks += [ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True), RichProgressBar()]
        logger = MLFlowLogger(experiment_name="bench", tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=logger, callbacks=callbacks,
                        enable_progress_bar=with_logging, enable_model_summary=False,
                        enable_checkpointing=with_logging)
    trainer.fit(module, datamodule=dm)
    return steps * dm.settings.batch_size / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    config = resolve_config(args.model, "cpu", [f"data.batch_size={args.batch_size}"])
    dm = ImageFolderDataModule(args.data, config.data)
    dm.prepare()
    results: dict[str, list[float]] = {"plain PyTorch loop": [], "Lightning (bare)": [], "Lightning (make train)": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop(LitClassifier.from_config(config, dm), dm, 5)  # warm-up: allocator, kernels
        for _ in range(args.rounds):
            results["plain PyTorch loop"].append(plain_loop(LitClassifier.from_config(config, dm), dm, args.steps))
            results["Lightning (bare)"].append(lightning_path(LitClassifier.from_config(config, dm), dm, args.steps, Path(tmp), False))
            results["Lightning (make train)"].append(
                lightning_path(LitClassifier.from_config(config, dm), dm, args.steps, Path(tmp), True))
    base = statistics.median(results["plain PyTorch loop"])
    table = Table(title=f"Training throughput, {args.model}, batch {args.batch_size}, {args.steps} steps x "
                        f"{args.rounds} rounds (median)")
    for column in ("path", "img/s median", "min", "max", "ratio to plain"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, values in results.items():
        median = statistics.median(values)
        table.add_row(name, f"{median:,.0f}", f"{min(values):,.0f}", f"{max(values):,.0f}", f"{median / base:.2f}x")
    console = Console(width=130)
    console.print(table)
    console.print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
                  f"{platform.processor() or platform.platform()}; torch {torch.__version__}, "
                  f"lightning {L.__version__}, python {platform.python_version()}")


if __name__ == "__main__":
    main()
