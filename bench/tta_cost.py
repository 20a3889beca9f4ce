"""What test-time augmentation costs at serving time, per family: the same weights exported with TTA 0, 1, 2.

    .venv/bin/python bench/tta_cost.py                                  # every finished run's model in mlflow.db
    .venv/bin/python bench/tta_cost.py --model models:/cifar4-classifier@champion

For each model: ONNX Runtime (1 thread, as each service worker uses) latency at batch 1
(median of 200 calls) and images/s at batch 64, for TTA levels 0, 1 and 2, plus the
accuracy each level gives on the run's validation and test splits when `--data` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import median_ms  # noqa: E402


def time_model(model, images: np.ndarray) -> tuple[float, float]:
    single = images[:1]
    single_ms = median_ms(lambda: model.predict_proba(single), 200, warmup=20)
    batch = images[:64]
    model.predict_proba(batch)
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        model.predict_proba(batch)
        rounds.append(len(batch) / (time.perf_counter() - started))
    return single_ms, statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="MLflow model URI (repeatable; default: every run's model)")
    parser.add_argument("--data", help="score each level on this run's test split (the training data folder)")
    args = parser.parse_args()

    import mlflow
    import onnxruntime
    import torch
    from mlflow.tracking import MlflowClient
    from rich.console import Console
    from rich.table import Table

    from pipeline.export import export_onnx, rebuild_classifier
    from pipeline.runtime.model_folder import find_model_files
    from pipeline.runtime.onnx_model import OnnxClassifier
    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    models = args.model
    if not models:
        experiment = client.get_experiment_by_name("cifar4")
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
        models = [r.data.tags["model_uri"] for r in runs if r.data.tags.get("model_uri")]
    table = Table(title="TTA cost: ONNX Runtime, 1 thread")
    for column in ("model", "TTA", "ms / image at batch 1", "images/s at batch 64", "val acc", "test acc"):
        table.add_column(column, justify="left" if column == "model" else "right")
    images = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    for model_uri in models:
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
        _, meta_path = find_model_files(local)
        import json

        metadata = json.loads(meta_path.read_text())
        weights = next(local.rglob("weights.pt"))
        test = val = None
        if args.data:
            from pipeline.data import ImageFolderDataModule

            dm = ImageFolderDataModule(args.data)
            dm.prepare()
            test = dm.test_images.numpy(), dm.test_labels.numpy()
            val = dm.val_images.numpy(), dm.val_labels.numpy()
        for level in (0, 1, 2):
            classifier = rebuild_classifier(weights, {**metadata, "tta": level})
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(classifier, int(metadata["image_size"]), Path(tmp) / "model.onnx")
                model = OnnxClassifier(path, metadata, threads=1, spinning=False)
                ms, rate = time_model(model, images)
                accuracy = val_accuracy = ""
                if test is not None:
                    accuracy = f"{(model.predict_proba(test[0]).argmax(1) == test[1]).mean():.4f}"
                    val_accuracy = f"{(model.predict_proba(val[0]).argmax(1) == val[1]).mean():.4f}"
            table.add_row(f"{metadata.get('family')} ({metadata['arch']})", str(level), f"{ms:.2f}", f"{rate:,.0f}",
                          val_accuracy, accuracy)
    Console(width=120).print(table)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


if __name__ == "__main__":
    main()
