"""Training: compose a data module, a LightningModule, callbacks, a logger and a Trainer; fit; publish.

- :func:`train_family`: one family's run, start to end. Its MLflow bookkeeping (which run, params,
  tags, dataset inputs, system metrics, fit facts) is the :class:`pipeline.runs.RunBookkeeping`
  callback; what happens after the fit (calibration, scope, scores, plots, the model and its
  checksums) is :mod:`pipeline.publish`.
- :func:`train_families`: ``pipeline train``: every family, then the champion step
  (:func:`pipeline.champion.crown`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from pipeline.config import Config
from pipeline.console import console
from pipeline.data import ImageFolderDataModule
from pipeline.hardware import auto_precision
from pipeline.module import LitClassifier
from pipeline.progress import EpochLines, progress_callback
from pipeline.publish import publish_run
from pipeline.runs import RunBookkeeping, RunResult


@dataclass
class Fit:
    trainer: L.Trainer
    checkpoint: ModelCheckpoint


def make_trainer(config: Config, logger, checkpoint_dir, callbacks: tuple = ()) -> Fit:
    """The Trainer with the best/last checkpoint callbacks and the progress display."""
    arguments = config.trainer.arguments()
    if arguments["precision"] == "auto":
        arguments["precision"] = auto_precision(arguments["accelerator"])
    every = config.checkpoint.every_n_epochs
    if config.trainer.max_epochs % every:
        every = 1  # the last epoch (the lookahead average) must always be a checkpoint candidate
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{epoch:03d}", monitor="val/acc",
                                 mode="max", auto_insert_metric_name=False, every_n_epochs=every)
    # last.ckpt on its own callback: Lightning 2.6's save_last=True rewrites it only when the best one
    # improves, so a run whose val/acc had plateaued would resume from that epoch, not the last one.
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=every, enable_version_counter=False)
    progress = progress_callback(config.family)
    trainer = L.Trainer(logger=logger, callbacks=[checkpoint, last, progress, *callbacks], enable_model_summary=False,
                        enable_progress_bar=not isinstance(progress, EpochLines), **arguments)
    return Fit(trainer, checkpoint)


def train_family(config: Config, data_dir: str, experiment: str, tracking_uri: str, resume: bool = False,
                 parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                 tags: Optional[dict[str, str]] = None, callbacks: tuple = ()) -> Optional[RunResult]:
    """Train, evaluate and log one family; returns None on non-zero DDP ranks.

    A sweep passes its parent run (the run becomes a nested one), a name, tags, and a callback
    whose ``pruned`` attribute, once true, stops the run before its model is logged.
    """
    L.seed_everything(config.seed, workers=True, verbose=False)
    dm = ImageFolderDataModule(data_dir, config.data)
    module = LitClassifier.from_config(config, dm)
    run = RunBookkeeping(config, dm.data_dir, dm, experiment, tracking_uri, resume, parent_run_id, run_name, tags)
    fit = make_trainer(config, run.logger, run.checkpoint_dir, (run, *callbacks))
    fit.trainer.fit(module, datamodule=dm, ckpt_path=run.ckpt_path)
    # Test scores come from rank 0 in publish_run, on the checkpoint it wrote itself: with several
    # nodes, trainer.test(ckpt_path="best") would look for rank 0's file on the other nodes' disks.
    if not fit.trainer.is_global_zero:
        return None
    if any(getattr(callback, "pruned", False) for callback in callbacks):
        return run.pruned()
    return publish_run(config, dm, fit.checkpoint, run.logger, run.client)


def train_families(families: list[str], profile: str, data_dir: str, overrides: list[str], resume: bool = False,
                   experiment: Optional[str] = None, registered_model: Optional[str] = None) -> list[RunResult]:
    """``pipeline train``: each family in turn, then the best finished run of the experiment becomes the champion."""
    from pipeline.champion import crown
    from pipeline.config import resolve_config
    from pipeline.evaluation import check_eval_folders
    from pipeline.tracking import setup_tracking

    configs = [resolve_config(family, profile, overrides) for family in families]
    for config in configs:  # before any training: a wrong folder costs a sentence, not a run
        check_eval_folders(config.evaluation.folders)
    experiment = experiment or configs[0].tracking.experiment
    uri, experiment_id = setup_tracking(experiment, nodes=max(c.trainer.num_nodes for c in configs))
    if rank_zero_only.rank == 0:
        console.print(f"Profile [bold]{profile}[/], models {', '.join(families)}, data {data_dir or 'data.sources'}, "
                      f"tracking {uri} (experiment {experiment!r})")
    results = []
    for config in configs:
        started = time.perf_counter()
        result = train_family(config, data_dir, experiment, uri, resume=resume)
        if result is not None:
            console.print(f"[green]{result.family}[/]: val acc {result.val_acc:.4f} in "
                          f"{time.perf_counter() - started:.0f} s, run {result.run_id}, model {result.model_uri}")
            results.append(result)
    if rank_zero_only.rank == 0:
        tracking = configs[0].tracking
        crown(uri, experiment_id, registered_model or tracking.registered_model, tracking.alias, console)
    return results
