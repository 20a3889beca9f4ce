"""Train one network family: config -> datamodule -> LightningModule -> Trainer -> MLflow run."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import mlflow
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipeline.config import flatten
from pipeline.data import ImageFolderDataModule, resolve_data_dir
from pipeline.datasets import log_split_inputs
from pipeline.evaluation import score
from pipeline.export import log_classifier, torch_outputs
from pipeline.models import count_parameters
from pipeline.module import ImageClassifier
from pipeline.explain import save_pictures
from pipeline.trust import make_trustworthy
from pipeline.progress import EpochLines, progress_callback
from pipeline.runtime.registry import CHECKSUM_TAG, file_checksums
from pipeline.plots import plot_confusion_matrix, plot_learning_curves, plot_mistakes
from pipeline.tracking import git_commit, project_dir

# A log file or CI gets 140 columns and unwrapped lines: Rich's default of 80 folds tables into unreadable cells.
console = Console(width=None if sys.stdout.isatty() else 140, soft_wrap=not sys.stdout.isatty())
CURVE_METRICS = ("train/loss", "val/loss", "train/acc", "val/acc")


@dataclass
class RunResult:
    family: str
    run_id: str
    val_acc: float
    model_uri: str
    test_acc: Optional[float] = None
    pruned: bool = False  # a sweep's pruner stopped it early: no model, not a champion candidate


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions run about 1.8x faster than fp32 (bench/ measured)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str) -> str:
    """bf16-mixed where the hardware does bf16 natively, 16-mixed on older GPUs, else fp32."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        # including_emulation=False: V100/T4 "support" bf16 only by emulation, far slower than fp16.
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def unusable_gpu() -> Optional[str]:
    """A sentence when an NVIDIA GPU is present but torch cannot use CUDA (e.g. the driver is older than
    torch's CUDA build), so that ``--profile auto`` does not silently train the CPU recipe."""
    if torch.cuda.is_available():
        return None
    if not (Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi")):
        return None
    build = torch.version.cuda or "none (a CPU-only torch)"
    return (f"An NVIDIA GPU is present but torch {torch.__version__} cannot use it (torch's CUDA build: {build}); "
            "check `nvidia-smi` for the driver's CUDA version. Training on the CPU recipe.")


def make_datamodule(config: dict, data_dir: str) -> ImageFolderDataModule:
    return ImageFolderDataModule(data_dir=data_dir, **config["data"])


def make_module(config: dict, dm: ImageFolderDataModule) -> ImageClassifier:
    dm.prepare()
    module = ImageClassifier(
        arch=config["model"]["arch"], model_args=config["model"].get("args") or {},
        classes=dm.classes, mean=dm.mean, std=dm.std, image_size=config["data"]["image_size"],
        tta=int(config["model"].get("tta", 0)), **config.get("optim", {}),
    )
    whiten = getattr(module.model.net, "whiten", None)
    if whiten is not None:
        # Patch-whitening filters from the training split (5,000 images are plenty; same on every rank).
        sample = dm.train_images[:5000].float().div(255.0)
        whiten.init_from((sample - module.model.mean) / module.model.std)
    return module


def config_digest(config: dict, fingerprint: str) -> str:
    """What a checkpoint must match to be resumed: the resolved config and the data."""
    text = json.dumps({k: v for k, v in config.items() if k != "tracking"}, sort_keys=True, default=str)
    return hashlib.sha256(f"{text}\n{fingerprint}".encode()).hexdigest()[:16]


def find_resumable_run(client: MlflowClient, experiment_id: str, family: str,
                       digest: Optional[str] = None) -> Optional[tuple[str, Path]]:
    """The newest unfinished run of ``family`` with the same config and data that left a ``last.ckpt``.

    Matching on the config digest keeps a GPU machine from resuming a CPU run of another width.
    """
    where = f"tags.family = '{family}' and attributes.status != 'FINISHED'"
    if digest:
        where += f" and tags.config_digest = '{digest}'"
    runs = client.search_runs([experiment_id], where, order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        last = Path(run.data.tags.get("checkpoint_dir", "")) / "last.ckpt"
        if last.is_file():
            return run.info.run_id, last
    return None


def metric_history(client: MlflowClient, run_id: str) -> dict[str, list[float]]:
    history = {}
    for name in CURVE_METRICS:
        points = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
        history[name] = [m.value for m in points]
    return history


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
    trainer_args = dict(config["trainer"])
    if trainer_args.get("precision") == "auto":
        trainer_args["precision"] = auto_precision(trainer_args.get("accelerator", "auto"))
    every = int((config.get("checkpoint") or {}).get("every_n_epochs", 1))
    if int(trainer_args.get("max_epochs") or 1) % every:
        every = 1  # the last epoch (the lookahead average) must always be a checkpoint candidate
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{epoch:03d}", monitor="val/acc",
                                 mode="max", auto_insert_metric_name=False, every_n_epochs=every)
    # last.ckpt on its own callback: Lightning 2.6's save_last=True rewrites it only when the best one
    # improves, so a run whose val/acc had plateaued would resume from that epoch, not the last one.
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=every, enable_version_counter=False)
    progress = progress_callback(family)
    trainer = L.Trainer(logger=logger, callbacks=[checkpoint, last, progress, *callbacks], enable_model_summary=False,
                        enable_progress_bar=not isinstance(progress, EpochLines),
                        **trainer_args)

    summary = dm.summary()
    if trainer.is_global_zero:
        n_params = count_parameters(module.model.net)
        console.print(f"[bold]{family}[/]: {config['model']['arch']} {config['model'].get('args')}, "
                      f"{n_params:,} parameters, {summary['train_size']:,} train / "
                      f"{summary['val_size']:,} val images, precision {trainer_args['precision']}")
        if not resumed:
            logger.log_hyperparams(flatten({k: v for k, v in config.items() if k != "tracking"}))
            logger.log_hyperparams({"n_parameters": n_params, "data.train_size": summary["train_size"],
                                    "data.val_size": summary["val_size"], "data.test_size": summary["test_size"],
                                    "data.test_source": summary["test_source"],
                                    "data.fingerprint": summary["fingerprint"],
                                    "data.skipped_images": summary["skipped_images"]})
            if dm.skipped:  # on_bad_image=skip: how many files were left out, and which
                logger.experiment.log_metric(logger.run_id, "data_skipped_images", len(dm.skipped))
                logger.experiment.log_text(logger.run_id, "\n".join(dm.skipped) + "\n", "data/skipped_images.txt")
            for key, value in {"family": family, "git_commit": git_commit(), "data_dir": str(data_dir),
                               "data_fingerprint": summary["fingerprint"], "config_digest": digest,
                               "checkpoint_dir": str(checkpoint_dir), **(tags or {})}.items():
                logger.experiment.set_tag(logger.run_id, key, value)
            log_split_inputs(logger.experiment, logger.run_id, resolve_data_dir(data_dir)[0], dm.fingerprint,
                             dm.split_counts())
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(yaml.safe_dump({**config, "data_dir": str(data_dir)}, sort_keys=False))
                logger.experiment.log_artifact(logger.run_id, str(path))

    monitor = None
    if trainer.is_global_zero:
        # CPU, memory, disk and network (and GPU utilisation and memory where nvidia-ml-py is there),
        # as system/* metrics of the run, every tracking.system_metrics_interval_s seconds.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = float(config["tracking"].get("system_metrics_interval_s", 10.0))
        monitor = SystemMetricsMonitor(logger.run_id, sampling_interval=interval, tracking_uri=tracking_uri,
                                       resume_logging=resumed)
        monitor.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    first_epoch = 0 if not ckpt_path else torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"] + 1
    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - fit_started
    if monitor is not None:
        monitor.finish()
        # One closing sample: a run shorter than the interval would otherwise log none.
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    if trainer.is_global_zero:
        # What bench/train_budget.py and bench/gpu_check.sh report per family.
        epochs_run = max(1, trainer.current_epoch - first_epoch)
        facts = {"fit_seconds": fit_seconds, "seconds_per_epoch": fit_seconds / epochs_run}
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            facts["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        logger.experiment.log_batch(logger.run_id, metrics=[
            Metric(key, float(value), int(time.time() * 1000), 0) for key, value in facts.items()])
        logger.experiment.set_tag(logger.run_id, "precision", str(trainer_args["precision"]))
        if torch.cuda.is_available():
            logger.experiment.set_tag(logger.run_id, "device", torch.cuda.get_device_name())
    # Test scores come from rank 0 in finish_run, on the best checkpoint it wrote itself: with several
    # nodes, trainer.test(ckpt_path="best") would look for rank 0's file on the other nodes' disks.
    if not trainer.is_global_zero:
        return None
    if any(getattr(callback, "pruned", False) for callback in callbacks):
        logger.experiment.set_tag(logger.run_id, "pruned", "true")
        history = metric_history(client, logger.run_id)["val/acc"]
        return RunResult(family, logger.run_id, max(history, default=0.0), "", pruned=True)
    return finish_run(config, dm, checkpoint, logger, client)


def finish_run(config: dict, dm: ImageFolderDataModule, checkpoint: ModelCheckpoint,
               logger: MLFlowLogger, client: MlflowClient) -> RunResult:
    """Score the best checkpoint, log plots and the MLflow Model, mark the run finished."""
    family, run_id = config["family"], logger.run_id
    # "last" (the default): the final weights, the lookahead average at the end of the decayed schedule.
    # Picking the best of many noisy epochs by validation accuracy flatters that accuracy (measured:
    # LeNet's val acc 2 points over its test acc that way); "best" is there for schedules that need it.
    select = (config.get("checkpoint") or {}).get("select", "last")
    chosen = checkpoint.best_model_path
    if select == "last" and (checkpoint.dirpath and (Path(checkpoint.dirpath) / "last.ckpt").is_file()):
        chosen = str(Path(checkpoint.dirpath) / "last.ckpt")
    best = ImageClassifier.load_from_checkpoint(chosen, map_location="cpu", weights_only=True)
    classifier = best.model.eval().float()
    deployed, trust = make_trustworthy(config, classifier, dm)
    val_probs, _ = torch_outputs(deployed, dm.val_images.cpu())
    scores = score(val_probs, dm.val_labels.cpu().numpy(), dm.classes)
    tta = f", TTA level {classifier.tta}" if classifier.tta else ""
    console.print(scores.table(f"{family}: {select} checkpoint{tta}, validation accuracy {scores.accuracy:.4f}"))
    test_scores = None
    if dm.test_images is not None:
        test_probs, _ = torch_outputs(deployed, dm.test_images.cpu())
        test_scores = score(test_probs, dm.test_labels.cpu().numpy(), dm.classes)
        console.print(test_scores.table(f"{family}: test split ({len(dm.test_labels):,} images never used for "
                                        f"training or selection){tta}, accuracy {test_scores.accuracy:.4f}"))
    console.print(trust.table(family))
    metadata: dict[str, Any] = {
        "classes": dm.classes, "image_size": int(config["data"]["image_size"]),
        "mean": dm.mean, "std": dm.std, "arch": config["model"]["arch"],
        "model_args": config["model"].get("args") or {}, "family": family,
        "run_id": run_id, "val_acc": scores.accuracy, "tta": classifier.tta,
        "test_acc": None if test_scores is None else test_scores.accuracy,
        "input": "float32 (N, 3, H, W) RGB in [0, 1]",
        "output": "calibrated softmax probabilities (N, classes); out_of_scope_score (N,): higher is further "
                  "from the training images",
        "data_fingerprint": dm.fingerprint, "temperature": trust.temperature,
        "out_of_scope": trust.scope_metadata,
    }
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"best_val_acc": scores.accuracy,
                            **scores.metrics("best/val_")})
        if test_scores is not None:
            mlflow.log_metrics({"test_acc": test_scores.accuracy, **test_scores.metrics("best/test_")})
        mlflow.log_metrics(trust.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            plot_confusion_matrix(scores.confusion, dm.classes, folder / "confusion_matrix.png",
                                  f"{family}: validation, best epoch (acc {scores.accuracy:.3f})")
            plot_learning_curves(metric_history(client, run_id), folder / "learning_curves.png", family)
            trust.plot(folder / "reliability.png", family)
            val_images = dm.val_images.cpu()
            plot_mistakes(val_images.numpy(), dm.val_labels.cpu().numpy(), val_probs, dm.classes,
                          folder / "mistakes.png", title=f"{family}: most confident validation mistakes")
            # The first validation image: the split is seeded, so every run of a data set shows the same one.
            try:
                save_pictures(classifier, val_images[0], dm.classes, folder)
            except ValueError as error:  # a network without named stages: the run still finishes
                console.print(f"[yellow]No feature-map pictures for {family}:[/] {error}")
            mlflow.log_artifacts(str(folder), artifact_path="plots")
        model_uri, checks = log_classifier(deployed, metadata, dm.val_images[:256].cpu())
        mlflow.log_metrics(checks)
        mlflow.set_tag("model_uri", model_uri)
        # sha256 of the files as stored: a service that follows the registry checks its downloads against them.
        with tempfile.TemporaryDirectory() as tmp:
            stored = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
            mlflow.set_tags({f"{CHECKSUM_TAG}{name}": digest for name, digest in file_checksums(stored).items()})
    return RunResult(family, run_id, scores.accuracy, model_uri,
                     None if test_scores is None else test_scores.accuracy)
