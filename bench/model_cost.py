"""What two models cost the service: the ONNX graphs it would run, timed side by side.

    .venv/bin/python bench/model_cost.py --db A/mlflow.db --db B/mlflow.db   # each database's champion
    .venv/bin/python bench/model_cost.py DIR_A DIR_B                         # model folders (model.onnx + classifier.json)

The service's requests per second on a CPU are bounded by the model call (HTTP, decode and JSON are the
same for any model; bench/serve_load.py measures the whole service). So this compares what differs
between two models: their graphs (node count, operator mix, file size) and ONNX Runtime's time per call
at 1 image and at the service's batch (``CLASSIFIER_MODEL_BATCH``, 16), in interleaved rounds (median),
one thread each as in one service worker, and the model-bound ceiling of requests per second on this
machine's cores. Two graphs with the same operators and shapes cost the same within the machine's noise.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_budget import machine  # noqa: E402


def champion_folder(db: Path) -> tuple[str, Path]:
    """The champion's model folder from an MLflow sqlite database (downloaded to a temporary folder)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.config import tracking_defaults

    names = tracking_defaults()
    mlflow.set_tracking_uri(f"sqlite:///{db.resolve()}")
    version = MlflowClient().get_model_version_by_alias(names["registered_model"], names["alias"])
    uri = f"models:/{names['registered_model']}/{version.version}"
    return f"{db} champion (version {version.version})", Path(mlflow.artifacts.download_artifacts(uri))


def graph_facts(folder: Path) -> str:
    import onnx

    from pipeline.runtime.model_folder import find_model_files

    path = find_model_files(folder)[0]
    model = onnx.load(str(path))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(4))
    return f"{len(model.graph.node)} nodes ({top}), {path.stat().st_size / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="model folders")
    parser.add_argument("--db", action="append", type=Path, default=[], help="an MLflow sqlite database: its champion")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per round at 1 image (a tenth at the batch)")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    from pipeline.runtime.onnx_model import OnnxClassifier
    from pipeline.runtime.settings import Settings

    models = [(str(folder), folder) for folder in args.folders] + [champion_folder(db) for db in args.db]
    if len(models) < 2:
        parser.error("give two models: folders, --db databases, or one of each")
    batch = Settings.from_env().model_batch
    loaded = [(name, folder, OnnxClassifier.from_dir(folder, threads=1)) for name, folder in models]
    size = loaded[0][2].image_size
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)

    def ms_per_call(model: OnnxClassifier, images: np.ndarray, calls: int) -> float:
        model.predict(images)  # warm
        started = time.perf_counter()
        for _ in range(calls):
            model.predict(images)
        return (time.perf_counter() - started) / calls * 1000

    times: dict[str, dict[str, list[float]]] = {name: {"1": [], "batch": []} for name, _, _ in loaded}
    for _ in range(args.rounds):  # interleaved: the machine's drift falls on every model alike
        for name, _, model in loaded:
            times[name]["1"].append(ms_per_call(model, one, args.calls))
            times[name]["batch"].append(ms_per_call(model, many, max(1, args.calls // 10)))

    cores = os.cpu_count() or 1
    table = Table(title=f"model cost, median of {args.rounds} interleaved rounds, 1 ONNX Runtime thread")
    for column in ("model", "graph", "ms, 1 image", f"ms per image, batch {batch}", "model-bound req/s", "vs first"):
        table.add_column(column, justify="left" if column in ("model", "graph") else "right")
    first = None
    for name, folder, _ in loaded:
        single = statistics.median(times[name]["1"])
        per_image = statistics.median(times[name]["batch"]) / batch
        ceiling = cores * 1000 / per_image
        first = first or ceiling
        table.add_row(name, graph_facts(folder), f"{single:.2f}", f"{per_image:.2f}", f"{ceiling:.0f}",
                      f"{ceiling / first:.2f}x")
    console = Console(width=200)
    console.print(table)
    console.print(machine())


if __name__ == "__main__":
    main()
