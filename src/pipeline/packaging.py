"""MLflow registry -> BentoML model store -> bento.

`pipeline package` reads ``models:/cifar4-classifier@champion`` (or a version), records
sha256 checksums of its files, stores them as a BentoML model and builds the bento.

Runs logged by this version carry ``explain.onnx`` beside ``model.onnx``, both checked
when the run was logged (:func:`pipeline.export.log_classifier`): packaging then only
copies, and imports neither torch nor the training code. For runs logged before that, it
rebuilds the torch net from ``weights.pt``, checks ONNX against it within 1e-5 and exports
the explain graph, as it always did.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.runtime.explainer import EXPLAIN_JSON, EXPLAIN_ONNX
from pipeline.runtime.onnx_model import METADATA_FILE, ONNX_FILE, ModelError, OnnxClassifier, find_model_files
from pipeline.runtime.registry import sha256

TOLERANCE = 1e-5


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
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if not match:
        raise ModelError(f"Model URI {model_uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION.")
    name, alias, version = match.groups()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as error:
        raise ModelError(f"No registered model {model_uri} in {client.tracking_uri}: "
                         "train first (make train).") from error


def check_images(metadata: dict, n: int = 64) -> np.ndarray:
    size = int(metadata["image_size"])
    return np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def check_probabilities(model: OnnxClassifier, images: np.ndarray) -> None:
    """The graph answers: finite probabilities that sum to 1 for every image."""
    probabilities = model.predict_proba(images)
    if not np.isfinite(probabilities).all() or np.abs(probabilities.sum(1) - 1).max() > 1e-4:
        raise ModelError("model.onnx gives probabilities that are not finite or do not sum to 1: not packaging.")


def checks_for_older_run(local: Path, metadata: dict, model: OnnxClassifier, images: np.ndarray,
                         out: Path) -> tuple[dict[str, float], dict[str, Path]]:
    """A run logged without explain.onnx: rebuild the torch net, compare, export the explain graph (needs torch)."""
    import torch

    from pipeline.explain import export_checked_explain
    from pipeline.export import WEIGHTS_FILE, rebuild_classifier, torch_probabilities

    weights = next(iter(sorted(local.rglob(WEIGHTS_FILE))), None)
    if weights is None:
        raise ModelError(f"Model folder {local} has no {WEIGHTS_FILE} to check the ONNX graph against.")
    classifier = rebuild_classifier(weights, metadata)
    tensor = torch.from_numpy(images)
    max_diff = float(np.abs(torch_probabilities(classifier, tensor) - model.predict_proba(images)).max())
    if max_diff > TOLERANCE:
        raise ModelError(f"ONNX and torch outputs differ by {max_diff:.2e} (> {TOLERANCE}): not packaging.")
    checks, files = {"onnx_torch_max_abs_diff": max_diff}, {}
    try:
        checks.update(export_checked_explain(classifier, model, tensor[:16], out))
        files = {EXPLAIN_ONNX: out / EXPLAIN_ONNX, EXPLAIN_JSON: out / EXPLAIN_JSON}
    except ValueError as error:  # a network without named stages: /classify works, /explain says why not
        print(f"No explain graph for this model ({error}); /explain will answer 503.", file=sys.stderr)
    return checks, files


def package(model_uri: str, tracking_uri: str, bento_model: str = "cifar4-classifier",
            build: bool = True, project_root: Path | None = None) -> Packaged:
    import bentoml

    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    version = resolve_version(client, model_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    onnx_path, meta_path = find_model_files(local)
    metadata = json.loads(meta_path.read_text())
    model = OnnxClassifier.from_dir(local)
    images = check_images(metadata)
    check_probabilities(model, images)
    with tempfile.TemporaryDirectory() as tmp:
        files = {ONNX_FILE: onnx_path, METADATA_FILE: meta_path}
        logged = {name: next(iter(sorted(local.rglob(name))), None) for name in (EXPLAIN_ONNX, EXPLAIN_JSON)}
        if all(logged.values()):  # checked when the run was logged: copy
            files.update(logged)
            checks = {key: value for key, value in client.get_run(version.run_id).data.metrics.items()
                      if key in ("onnx_max_abs_diff", "explain_probability_max_abs_diff", "gradcam_max_rel_diff")}
        else:
            checks, explain_files = checks_for_older_run(local, metadata, model, images, Path(tmp))
            files.update(explain_files)
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
                    checks.get("onnx_max_abs_diff", checks.get("onnx_torch_max_abs_diff", float("nan"))),
                    checks.get("gradcam_max_rel_diff", float("nan")))


def make_world_readable(folder: Path) -> None:
    """BentoML creates stores with mode 700; the container's non-root user must read them."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
