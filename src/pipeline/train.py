"""Training: compose a data module, a LightningModule and a Trainer, fit, publish; families and the champion.

- :func:`train_family`: one family's run, start to end. The run's bookkeeping (resume, params, tags,
  dataset inputs, system metrics) is :mod:`pipeline.runs`; what happens after the fit (scoring,
  calibration, plots, the model and its checksums) is :mod:`pipeline.publish`.
- :func:`train_families`: ``pipeline train``: every family, then the champion rule
  (:mod:`pipeline.champion`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.tracking import MlflowClient

from pipeline.console import console
from pipeline.data import ImageFolderDataModule
from pipeline.hardware import auto_precision, cpu_bf16_speedup, cpu_precision_note
from pipeline.models import count_parameters, load_family_module
from pipeline.module import LitClassifier
from pipeline.progress import EpochLines, progress_callback
from pipeline.publish import publish_run
from pipeline.runs import (RunResult, SystemMetrics, config_digest, find_resumable_run, log_fit_facts, log_run_start,
                           metric_history)
from pipeline.tracking import project_dir


def make_datamodule(config: dict, data_dir: str) -> ImageFolderDataModule:
    return ImageFolderDataModule(data_dir=data_dir, **config["data"])


def make_module(config: dict, dm: ImageFolderDataModule) -> LitClassifier:
    dm.prepare()
    load_family_module(config["model"].get("module", ""))
    module = LitClassifier(arch=config["model"]["arch"], model_args=config["model"].get("args") or {},
                           classes=dm.classes, mean=dm.mean, std=dm.std, tta=int(config["model"].get("tta", 0)),
                           optim=config.get("optim") or {})
    whiten = getattr(module.model.net, "whiten", None)
    if whiten is not None:
        # Patch-whitening filters from the training split (5,000 images are plenty; same on every rank).
        sample = dm.train_images[:5000].float().div(255.0)
        whiten.init_from((sample - module.model.mean) / module.model.std)
    return module


@dataclass
class Fit:
    trainer: L.Trainer
    checkpoint: ModelCheckpoint
    precision: str
    precision_note: str = ""


def make_trainer(config: dict, logger: MLFlowLogger, checkpoint_dir, callbacks: tuple = ()) -> Fit:
    """The Trainer with the best/last checkpoint callbacks and the progress display."""
    trainer_args = dict(config["trainer"])
    note = ""
    if trainer_args.get("precision") == "auto":
        trainer_args["precision"] = auto_precision(trainer_args.get("accelerator", "auto"))
        note = cpu_precision_note()
    every = int((config.get("checkpoint") or {}).get("every_n_epochs", 1))
    if int(trainer_args.get("max_epochs") or 1) % every:
        every = 1  # the last epoch (the lookahead average) must always be a checkpoint candidate
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{epoch:03d}", monitor="val/acc",
                                 mode="max", auto_insert_metric_name=False, every_n_epochs=every)
    # last.ckpt on its own callback: Lightning 2.6's save_last=True rewrites it only when the best one
    # improves, so a run whose val/acc had plateaued would resume from that epoch, not the last one.
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=every, enable_version_counter=False)
    progress = progress_callback(config["family"])
    trainer = L.Trainer(logger=logger, callbacks=[checkpoint, last, progress, *callbacks], enable_model_summary=False,
                        enable_progress_bar=not isinstance(progress, EpochLines), **trainer_args)
    return Fit(trainer, checkpoint, str(trainer_args["precision"]), note)


def train_family(
    config: dict, data_dir: str, experiment: str, tracking_uri: str, resume: bool = False,
    parent_run_id: Optional[str] = None, run_name: Optional[str] = None, tags: Optional[dict[str, str]] = None,
    callbacks: tuple = (),
) -> Optional[RunResult]:
    """Train, evaluate and log one family; returns None on non-zero DDP ranks.

    A sweep passes its parent run (the run becomes a nested one), a name, tags, and a callback
    whose ``pruned`` attribute, once true, stops the run before its model is logged.
    """
    family = config["family"]
    L.seed_everything(config.get("seed", 42), workers=True, verbose=False)
    dm = make_datamodule(config, data_dir)
    module = make_module(config, dm)
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id

    digest = config_digest(config, dm.fingerprint)
    run_id, ckpt_path = None, None
    if resume:  # every DDP rank looks it up, so all of them load the same checkpoint
        found = find_resumable_run(client, experiment_id, family, digest)
        if found:
            run_id, ckpt_path = found
            if rank_zero_only.rank == 0:
                console.print(f"[bold]Resuming[/] {family} run {run_id} from {ckpt_path}")
        elif rank_zero_only.rank == 0:
            console.print(f"No unfinished {family} run with this config and data to resume: starting a new one.")
    resumed = run_id is not None
    if parent_run_id and not resumed:
        run_id = client.create_run(experiment_id, run_name=run_name or family,
                                   tags={"mlflow.parentRunId": parent_run_id}).info.run_id
    logger = MLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri, run_name=run_name or family,
                          run_id=run_id, log_model=False)
    checkpoint_dir = project_dir() / "checkpoints" / experiment / (logger.run_id or "rank")
    fit = make_trainer(config, logger, checkpoint_dir, callbacks)
    trainer = fit.trainer

    monitor = None
    if trainer.is_global_zero:
        summary = dm.summary()
        n_params = count_parameters(module.model.net)
        console.print(f"[bold]{family}[/]: {config['model']['arch']} {config['model'].get('args')}, "
                      f"{n_params:,} parameters, {summary['train_size']:,} train / "
                      f"{summary['val_size']:,} val images, precision {fit.precision}{fit.precision_note}")
        if not resumed:
            log_run_start(logger, config, data_dir, dm, {"family": family, "config_digest": digest,
                                                         "checkpoint_dir": str(checkpoint_dir), **(tags or {})},
                          n_params)
        monitor = SystemMetrics(logger.run_id, tracking_uri,
                                float(config["tracking"].get("system_metrics_interval_s", 10.0)), resumed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    first_epoch = 0 if not ckpt_path else torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"] + 1
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - started
    if monitor is not None:
        monitor.finish()
    # Test scores come from rank 0 in publish_run, on the checkpoint it wrote itself: with several
    # nodes, trainer.test(ckpt_path="best") would look for rank 0's file on the other nodes' disks.
    if not trainer.is_global_zero:
        return None
    facts = {"fit_seconds": fit_seconds, "seconds_per_epoch": fit_seconds / max(1, trainer.current_epoch - first_epoch)}
    facts_tags = {"precision": fit.precision}
    if fit.precision_note:
        facts["cpu_bf16_speedup"] = cpu_bf16_speedup()
    if torch.cuda.is_available():
        facts_tags["device"] = torch.cuda.get_device_name()
        if trainer.strategy.root_device.type == "cuda":
            facts["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    log_fit_facts(logger.experiment, logger.run_id, facts, facts_tags)
    if any(getattr(callback, "pruned", False) for callback in callbacks):
        logger.experiment.set_tag(logger.run_id, "pruned", "true")
        history = metric_history(client, logger.run_id)["val/acc"]
        return RunResult(family, logger.run_id, max(history, default=0.0), "", pruned=True)
    return publish_run(config, dm, fit.checkpoint, logger, client)


def train_families(families: list[str], profile: str, data_dir: str, overrides: list[str], resume: bool = False,
                   experiment: Optional[str] = None, registered_model: Optional[str] = None) -> list[RunResult]:
    """``pipeline train``: each family in turn, then the best finished run of the experiment becomes the champion."""
    from pipeline.champion import promote_champion
    from pipeline.config import resolve_config
    from pipeline.tracking import setup_tracking

    configs = [resolve_config(family, profile, overrides) for family in families]
    experiment = experiment or configs[0]["tracking"]["experiment"]
    nodes = max(int(c["trainer"].get("num_nodes", 1)) for c in configs)
    uri, experiment_id = setup_tracking(experiment, nodes=nodes)
    if rank_zero_only.rank == 0:
        console.print(f"Profile [bold]{profile}[/], models {', '.join(families)}, data {data_dir}, "
                      f"tracking {uri} (experiment {experiment!r})")
    results = []
    for config in configs:
        started = time.perf_counter()
        result = train_family(config, data_dir, experiment, uri, resume=resume)
        if result is not None:
            console.print(f"[green]{result.family}[/]: val acc {result.val_acc:.4f} in "
                          f"{time.perf_counter() - started:.0f} s, run {result.run_id}, model {result.model_uri}")
            results.append(result)
    if rank_zero_only.rank != 0:
        return results
    tracking = configs[0]["tracking"]
    name, alias = registered_model or tracking["registered_model"], tracking["alias"]
    decision = promote_champion(MlflowClient(uri), experiment_id, name, alias)
    console.print(decision.table)
    console.print(decision.sentence(name, alias))
    return results
