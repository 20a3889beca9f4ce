"""How long /explain takes, per model family, next to /classify's model call.

    make train && make package && .venv/bin/python bench/explain_latency.py --image some.jpg

For the newest finished run of each family in the MLflow store it exports the explain
graph from the run's weights (as `pipeline package` does) and times, in process, on the
same decoded image (median of --rounds calls after a warm-up):
  * the classify graph (model.onnx) alone;
  * the explain graph alone (probabilities, feature maps, Grad-CAM);
  * the whole explanation, PNG pictures and base64 included.
Then it starts `bentoml serve` on the packaged champion and times POST /classify and
POST /explain over HTTP on 127.0.0.1, one request at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import httpx
import mlflow
import onnxruntime
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, free_port, median_ms, start, stop  # noqa: E402

from pipeline.explain_graph import export_explain  # noqa: E402
from pipeline.runtime.explainer import Explainer  # noqa: E402
from pipeline.export import WEIGHTS_FILE, rebuild_classifier  # noqa: E402
from pipeline.runtime.imaging import decode_image  # noqa: E402
from pipeline.runtime.model_folder import find_model_files  # noqa: E402
from pipeline.runtime.onnx_model import OnnxClassifier  # noqa: E402
from pipeline.tracking import tracking_uri as resolve_tracking_uri  # noqa: E402


def newest_runs(client: MlflowClient, experiment: str) -> dict[str, str]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"No experiment {experiment!r} in {client.tracking_uri}: run `make train` first.")
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    newest: dict[str, str] = {}
    for run in runs:
        family = run.data.tags.get("family")
        if family and family not in newest and run.data.tags.get("model_uri"):
            newest[family] = run.data.tags["model_uri"]
    return newest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--experiment", default="cifar4")
    parser.add_argument("--no-http", action="store_true", help="skip the served champion")
    args = parser.parse_args()
    tracking_uri = resolve_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    data = Path(args.image).read_bytes()
    console = Console(width=130)

    table = Table(title=f"/explain cost per family, in process (median of {args.rounds}), {Path(args.image).name}")
    for column in ("family", "arch", "classify graph (ms)", "explain graph (ms)", "whole explanation (ms)",
                   "JSON size (KB)"):
        table.add_column(column, justify="left" if column in ("family", "arch") else "right")
    for family, model_uri in sorted(newest_runs(client, args.experiment).items()):
        folder = Path(mlflow.artifacts.download_artifacts(model_uri))
        onnx_path, meta_path = find_model_files(folder)
        metadata = json.loads(meta_path.read_text())
        model = OnnxClassifier.from_dir(folder)
        image = decode_image(data, model.image_size)
        with tempfile.TemporaryDirectory() as tmp:
            classifier = rebuild_classifier(next(folder.rglob(WEIGHTS_FILE)), metadata)
            export_explain(classifier, model.image_size, Path(tmp))
            explainer = Explainer.from_folder(tmp, model.classes)
            classify_ms = median_ms(lambda: model.predict_proba(image), args.rounds)
            graph_ms = median_ms(lambda: explainer.run(image), args.rounds)
            whole_ms = median_ms(lambda: explainer.explain(image, 0), args.rounds)
            size_kb = len(json.dumps(explainer.explain(image, 0))) / 1024
        table.add_row(family, f"{metadata['arch']} {metadata.get('model_args') or ''}", f"{classify_ms:.2f}",
                      f"{graph_ms:.2f}", f"{whole_ms:.2f}", f"{size_kb:.0f}")
    console.print(table)

    if not args.no_http:
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
        env.setdefault("BENTOML_HOME", str(ROOT / "bentoml_home"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server, _ = start([str(Path(sys.executable).parent / "bentoml"), "serve", "cifar4_classifier:latest",
                           "--host", "127.0.0.1", "--port", str(port)], f"{url}/readyz",
                          Path(tempfile.mkdtemp()) / "serve.log", env)
        try:
            with httpx.Client(timeout=30) as http:
                arch = http.get(f"{url}/model").json().get("arch")
                files = {"image": (Path(args.image).name, data)}
                classify = median_ms(lambda: http.post(f"{url}/classify", files=files).raise_for_status(), args.rounds)
                explain = median_ms(lambda: http.post(f"{url}/explain", files=files).raise_for_status(), args.rounds)
        finally:
            stop(server)
        http_table = Table(title=f"over HTTP on 127.0.0.1, packaged champion ({arch}), one request at a time")
        http_table.add_column("route")
        http_table.add_column("p50 (ms)", justify="right")
        http_table.add_row("POST /classify", f"{classify:.2f}")
        http_table.add_row("POST /explain", f"{explain:.2f}")
        console.print(http_table)
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; python "
                  f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}")


if __name__ == "__main__":
    main()
