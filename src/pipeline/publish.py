"""Publish a finished run: score it, make its answers trustworthy, log plots, the model and its checksums.

After the fit, rank 0 loads the chosen checkpoint (``checkpoint.select``), fits the temperature and
the out-of-scope score (:mod:`pipeline.trust`, one pass of each split through the net), scores those
answers (the deployed graph's numbers), logs the plots and the MLflow Model (``model.onnx`` + ``classifier.json`` + the
explain graph, :mod:`pipeline.export`), and records the sha256 of every model file as run tags, which
the service's registry follower checks its downloads against.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

from pipeline.config import Config
from pipeline.console import console
from pipeline.data import ImageFolderDataModule
from pipeline.evaluation import score
from pipeline.explain_graph import save_pictures
from pipeline.export import log_classifier
from pipeline.module import LitClassifier
from pipeline.plots import plot_confusion_matrix, plot_learning_curves, plot_mistakes
from pipeline.runs import RunResult, metric_history
from pipeline.runtime.model_folder import CHECKSUM_TAG, file_checksums
from pipeline.trust import make_trustworthy

def source_mean(probabilities, dm: ImageFolderDataModule) -> float:
    """Mean over the training sources of validation accuracy, on the deployed graph's answers."""
    hits = probabilities.argmax(axis=1) == dm.val_labels.cpu().numpy()
    ids = dm.val_source.cpu().numpy()
    return float(sum(hits[ids == i].mean() for i in set(ids.tolist())) / len(set(ids.tolist())))


def publish_run(config: Config, dm: ImageFolderDataModule, checkpoint: ModelCheckpoint,
               logger: MLFlowLogger, client: MlflowClient) -> RunResult:
    """Score the chosen checkpoint, calibrate it, log plots, the MLflow Model and its checksums."""
    family, run_id = config.family, logger.run_id
    # "last" (the default): the final weights, the lookahead average at the end of the decayed schedule.
    # Picking the best of many noisy epochs by validation accuracy flatters that accuracy (measured:
    # LeNet's val acc 2 points over its test acc that way); "best" is there for schedules that need it.
    select = config.checkpoint.select
    chosen = checkpoint.best_model_path
    if select == "last" and (checkpoint.dirpath and (Path(checkpoint.dirpath) / "last.ckpt").is_file()):
        chosen = str(Path(checkpoint.dirpath) / "last.ckpt")
    best = LitClassifier.load_from_checkpoint(chosen, map_location="cpu", weights_only=True)
    classifier = best.model.eval().float()
    deployed, trust = make_trustworthy(config, classifier, dm)  # runs each split through the net once
    val_probs = trust.answers["val"][0]
    scores = score(val_probs, dm.val_labels.cpu().numpy(), dm.classes)
    tta = f", TTA level {classifier.tta}" if classifier.tta else ""
    console.print(scores.table(f"{family}: {select} checkpoint{tta}, validation accuracy {scores.accuracy:.4f}"))
    test_scores = None
    if dm.test_images is not None:
        test_probs = trust.answers["test"][0]
        test_scores = score(test_probs, dm.test_labels.cpu().numpy(), dm.classes)
        console.print(test_scores.table(f"{family}: test split ({len(dm.test_labels):,} images never used for "
                                        f"training or selection){tta}, accuracy {test_scores.accuracy:.4f}"))
    console.print(trust.table(family))
    metadata: dict[str, Any] = {
        "classes": dm.classes, "image_size": config.data.image_size,
        "mean": dm.mean, "std": dm.std, "arch": config.model.arch,
        "model_args": config.model.args, "model_module": config.model.module,
        "family": family,
        "run_id": run_id, "val_acc": scores.accuracy, "tta": classifier.tta,
        "test_acc": None if test_scores is None else test_scores.accuracy,
        "input": "float32 (N, 3, H, W) RGB in [0, 1]",
        "output": "calibrated softmax probabilities (N, classes); out_of_scope_score (N,): higher is further "
                  "from the training images",
        "data_fingerprint": dm.fingerprint, "temperature": trust.temperature.base,
        "calibration": trust.temperature.metadata(),
        "out_of_scope": trust.scope_metadata,
        "sources": [{"name": source.name, "path": str(source.path), "weight": source.weight,
                     **{f"test_{key}": trust.metrics[f"source/{source.name}/test_{key}"] for key in ("acc", "balanced_acc", "ece")
                        if f"source/{source.name}/test_{key}" in trust.metrics}} for source in dm.sources],
        "outliers": {"folders": list(dm.outlier_dirs), "classes": len(dm.outlier_classes),
                     **{f"test_{key}": trust.metrics[f"outliers/test/{key}"] for key in ("auroc", "fpr_at_95")
                        if f"outliers/test/{key}" in trust.metrics}},
    }
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        # The champion rule compares the mean over sources of validation accuracy (pipeline.champion).
        mlflow.log_metrics({"best_val_acc": scores.accuracy, "val_acc_source_mean": source_mean(val_probs, dm),
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
            save_pictures(classifier, val_images[0], dm.classes, folder)
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
