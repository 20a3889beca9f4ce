"""A training run's bookkeeping in MLflow: which run to resume, what it records before and after the fit.

:class:`RunBookkeeping` is the Lightning callback that does all of it around ``trainer.fit``:

- resume: a run is resumed when its family, config digest (the resolved config plus the data's
  fingerprint) and ``last.ckpt`` match;
- before the fit: params (the flattened config), tags (family, git commit, data, checkpoint folder),
  one dataset input per split, the skipped images, ``config.yaml``;
- during the fit: system metrics (CPU, memory, GPU) in a thread;
- after the fit: time per epoch, peak GPU memory, precision and device;
- the curves, read back for the plots.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.tracking import MlflowClient

from pipeline.config import Config, flatten
from pipeline.console import console
from pipeline.tracking import git_commit, project_dir

CURVE_METRICS = ("train/loss", "val/loss", "train/acc", "val/acc")


@dataclass
class RunResult:
    family: str
    run_id: str
    val_acc: float
    model_uri: str
    test_acc: Optional[float] = None
    pruned: bool = False  # a sweep's pruner stopped it early: no model, not a champion candidate


def config_digest(config: Config, fingerprint: str) -> str:
    """What a checkpoint must match to be resumed: the resolved config and the data."""
    text = json.dumps({k: v for k, v in config.to_dict().items() if k != "tracking"}, sort_keys=True, default=str)
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


class RunBookkeeping(L.Callback):
    """One run's MLflow bookkeeping, as a callback around the fit.

    Built before the Trainer: it finds the run to resume (``resume``: same family, config digest and a
    ``last.ckpt``) or creates a sweep's nested run, and makes the run's logger and checkpoint folder.
    At the fit's start (rank 0) it prints the run's line, logs params, tags, dataset inputs and
    ``config.yaml`` (a new run only) and starts the system metrics; at the end it stops them and logs
    the fit facts (time per epoch, peak GPU memory, precision, device).
    """

    def __init__(self, config: Config, data_dir: str, dm: Any, experiment: str, tracking_uri: str,
                 resume: bool = False, parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                 tags: Optional[dict[str, str]] = None) -> None:
        self.config, self.data_dir, self.dm, self.tracking_uri = config, data_dir, dm, tracking_uri
        self.client = MlflowClient(tracking_uri)
        experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        family = config.family
        self.digest = config_digest(config, dm.fingerprint)
        run_id, self.ckpt_path = None, None
        if resume:  # every DDP rank looks it up, so all of them load the same checkpoint
            found = find_resumable_run(self.client, experiment_id, family, self.digest)
            if found:
                run_id, self.ckpt_path = found
                if rank_zero_only.rank == 0:
                    console.print(f"[bold]Resuming[/] {family} run {run_id} from {self.ckpt_path}")
            elif rank_zero_only.rank == 0:
                console.print(f"No unfinished {family} run with this config and data to resume: starting a new one.")
        self.resumed = run_id is not None
        if parent_run_id and not self.resumed:
            run_id = self.client.create_run(experiment_id, run_name=run_name or family,
                                            tags={"mlflow.parentRunId": parent_run_id}).info.run_id
        self.logger = MLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri, run_name=run_name or family,
                                   run_id=run_id, log_model=False)
        self.checkpoint_dir = project_dir() / "checkpoints" / experiment / (self.logger.run_id or "rank")
        self.tags = {"family": family, "config_digest": self.digest, "checkpoint_dir": str(self.checkpoint_dir),
                     **(tags or {})}
        self.first_epoch = 0 if not self.ckpt_path else \
            torch.load(self.ckpt_path, map_location="cpu", weights_only=True)["epoch"] + 1
        self.monitor: Optional[SystemMetrics] = None
        self.started = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from pipeline.hardware import cpu_precision_note
        from pipeline.models import count_parameters

        config, summary = self.config, self.dm.summary()
        n_params = count_parameters(pl_module.model.net)
        self.note = cpu_precision_note() if config.trainer.precision == "auto" else ""
        console.print(f"[bold]{config.family}[/]: {config.model.arch} {config.model.args}, "
                      f"{n_params:,} parameters, {summary['train_size']:,} train / "
                      f"{summary['val_size']:,} val images, precision {trainer.precision}{self.note}")
        if not self.resumed:
            log_run_start(self.logger, config, self.data_dir, self.dm, self.tags, n_params)
        self.monitor = SystemMetrics(self.logger.run_id, self.tracking_uri,
                                     config.tracking.system_metrics_interval_s, self.resumed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.monitor is None:
            return
        fit_seconds = time.perf_counter() - self.started
        self.monitor.finish()
        facts = {"fit_seconds": fit_seconds,
                 "seconds_per_epoch": fit_seconds / max(1, trainer.current_epoch - self.first_epoch)}
        tags = {"precision": str(trainer.precision)}
        if self.note:
            from pipeline.hardware import cpu_bf16_speedup

            facts["cpu_bf16_speedup"] = cpu_bf16_speedup()
        if torch.cuda.is_available():
            tags["device"] = torch.cuda.get_device_name()
            if trainer.strategy.root_device.type == "cuda":
                facts["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        log_fit_facts(self.client, self.logger.run_id, facts, tags)

    def pruned(self) -> RunResult:
        """A sweep's pruner stopped the run: tag it, and report its best epoch's validation accuracy."""
        self.client.set_tag(self.logger.run_id, "pruned", "true")
        history = metric_history(self.client, self.logger.run_id)["val/acc"]
        return RunResult(self.config.family, self.logger.run_id, max(history, default=0.0), "", pruned=True)


def log_run_start(logger: Any, config: Config, data_dir: str, dm: Any, tags: dict[str, str],
                  n_parameters: int) -> None:
    """Params, tags, dataset inputs, skipped images and ``config.yaml`` of a new run (not of a resumed one).

    ``logger`` is the run's Lightning MLFlowLogger (it batches and truncates params the way MLflow needs).
    """
    from pipeline.data import resolve_data_dir

    client, run_id, summary = logger.experiment, logger.run_id, dm.summary()
    plain = config.to_dict()
    logger.log_hyperparams(flatten({k: v for k, v in plain.items() if k != "tracking"}))
    logger.log_hyperparams({"n_parameters": n_parameters, "data.train_size": summary["train_size"],
                            "data.val_size": summary["val_size"], "data.test_size": summary["test_size"],
                            "data.test_source": summary["test_source"], "data.fingerprint": summary["fingerprint"],
                            "data.skipped_images": summary["skipped_images"]})
    if dm.skipped:  # on_bad_image=skip: how many files were left out, and which
        client.log_metric(run_id, "data_skipped_images", len(dm.skipped))
        client.log_text(run_id, "\n".join(dm.skipped) + "\n", "data/skipped_images.txt")
    for key, value in {"git_commit": git_commit(), "data_dir": str(data_dir),
                       "data_fingerprint": summary["fingerprint"], **tags}.items():
        client.set_tag(run_id, key, value)
    for index, source in enumerate(dm.sources):  # one dataset input per source and split
        log_split_inputs(client, run_id, resolve_data_dir(source.path)[0], dm.source_fingerprints[index],
                         dm.split_counts(index))
    if dm.outlier_dirs:
        sizes = dm.summary()["outliers"]
        log_split_inputs(client, run_id, dm.outlier_dirs[0], dm.outlier_fingerprint,
                         {f"outliers-{split}": {"images": sizes[key]} for split, key in
                          (("training", "train"), ("validation", "val"), ("test", "test"))})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump({**plain, "data_dir": str(data_dir)}, sort_keys=False))
        client.log_artifact(run_id, str(path))


class SystemMetrics:
    """CPU, memory, disk and network (and GPU utilisation and memory where nvidia-ml-py is there) as
    ``system/*`` metrics of the run, every ``interval`` seconds, in a thread."""

    def __init__(self, run_id: str, tracking_uri: str, interval: float, resumed: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri,
                                            resume_logging=resumed)
        self.monitor.start()

    def finish(self) -> None:
        self.monitor.finish()
        # One closing sample: a run shorter than the interval would otherwise log none.
        self.monitor.collect_metrics()
        self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        self.monitor.mlflow_logger.flush()


def log_fit_facts(client: MlflowClient, run_id: str, facts: dict[str, float], tags: dict[str, str]) -> None:
    """What bench/train_budget.py and bench/gpu_check.sh report per family: time per epoch, peak memory."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in facts.items()])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


class ImageFolderDataset(MetaDataset):
    """A folder of class subfolders: its fingerprint is the digest, counts per class are the profile."""

    def __init__(self, folder: str | Path, name: str, digest: str, counts: dict[str, int]) -> None:
        self._counts = dict(counts)
        super().__init__(resolve_dataset_source(Path(folder).resolve().as_uri()), name=name, digest=digest)

    @property
    def profile(self) -> Any:
        return {"images": sum(self._counts.values()), "per_class": self._counts}

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self.profile)
        return config


def log_split_inputs(client: MlflowClient, run_id: str, folder: str | Path, fingerprint: str,
                     splits: dict[str, dict[str, int]]) -> None:
    """One dataset input per split (context ``training``, ``validation``, ``test``), counts per class."""
    name = Path(folder).resolve().name
    inputs = [DatasetInput(ImageFolderDataset(folder, f"{name}-{split}", fingerprint, counts)._to_mlflow_entity(),
                           tags=[InputTag("mlflow.data.context", split)])
              for split, counts in splits.items() if counts]
    client.log_inputs(run_id, datasets=inputs)
