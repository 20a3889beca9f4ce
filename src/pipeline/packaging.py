"""MLflow registry -> BentoML model store -> bento.

`pipeline package` reads ``models:/cifar4-classifier@champion`` (or a version), records
sha256 checksums of its files, stores them as a BentoML model and builds the bento.

A run logs ``explain.onnx`` beside ``model.onnx``, both checked against torch when the run
was logged (:func:`pipeline.export.log_classifier`): packaging checks the answers on probe
images, copies, and imports neither torch nor the training code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.runtime.model_folder import (EXPLAIN_JSON, EXPLAIN_ONNX, METADATA_FILE, ONNX_FILE, ModelError,
                                           check_answers, find_model_files, locate, sha256)
from pipeline.runtime.model_uri import parse_model_uri
from pipeline.runtime.onnx_model import OnnxClassifier



@dataclass
class Packaged:
    bento_model: str
    bento: str | None
    registered_model: str
    version: str
    max_abs_diff: float
    gradcam_rel_diff: float = float("nan")


def resolve_version(client: MlflowClient, model_uri: str):
    """``models:/name@alias`` or ``models:/name/version`` -> the registry's ModelVersion."""
    parsed = parse_model_uri(model_uri)
    if parsed is None or parsed.name is None:
        raise ModelError(f"Model URI {model_uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION.")
    name, alias, version = parsed.name, parsed.alias, parsed.version
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as error:
        raise ModelError(f"No registered model {model_uri} in {client.tracking_uri}: "
                         "train first (make train).") from error


def package(model_uri: str, tracking_uri: str, bento_model: str = "cifar4-classifier",
            build: bool = True, project_root: Path | None = None) -> Packaged:
    import bentoml

    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    version = resolve_version(client, model_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    onnx_path, meta_path = find_model_files(local)
    metadata = json.loads(meta_path.read_text())
    check_answers(OnnxClassifier.from_dir(local), n=64)
    files = {ONNX_FILE: onnx_path, METADATA_FILE: meta_path}
    logged = {name: locate(local, name) for name in (EXPLAIN_ONNX, EXPLAIN_JSON)}
    if all(logged.values()):  # exported and checked against torch when the run was logged
        files.update(logged)
    else:
        print("This run logged no explain graph; /explain will answer 503.",
              file=sys.stderr)
    checks = {key: value for key, value in client.get_run(version.run_id).data.metrics.items()
              if key in ("onnx_max_abs_diff", "explain_probability_max_abs_diff", "gradcam_max_rel_diff")}
    info = {
        **metadata,
        "registered_model": version.name, "model_version": str(version.version),
        "mlflow_run_id": version.run_id, "mlflow_model_uri": model_uri, **checks,
        "checksums": {name: sha256(path) for name, path in files.items()},
    }
    with bentoml.models.create(bento_model, labels={"family": str(metadata.get("family", ""))},
                               metadata=info) as stored:
        for name, path in files.items():
            shutil.copy2(path, Path(stored.path) / name)
    bento_tag = None
    if build:
        root = project_root or Path(__file__).resolve().parents[2]
        result = subprocess.run(
            [str(Path(sys.executable).parent / "bentoml"), "build", "-f", str(root / "service" / "bentofile.yaml"),
             "--output", "tag", str(root)], capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise ModelError(f"bentoml build failed: {result.stderr.strip()[-2000:]}")
        bento_tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    make_world_readable(Path(bentoml.models.get(stored.tag).path))  # `stored.path` was its temporary folder
    if bento_tag:
        make_world_readable(Path(bentoml.bentos.get(bento_tag).path))
    return Packaged(str(stored.tag), bento_tag, version.name, str(version.version),
                    checks.get("onnx_max_abs_diff", float("nan")),
                    checks.get("gradcam_max_rel_diff", float("nan")))


def make_world_readable(folder: Path) -> None:
    """BentoML creates stores with mode 700; the container's non-root user must read them."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
