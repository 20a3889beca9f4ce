"""MLflow registry -> BentoML model store -> bento.

`pipeline package` reads ``models:/cifar4-classifier@champion`` (or a version), checks
that the ONNX graph and the torch net rebuilt from its state_dict agree within 1e-5,
records sha256 checksums of the files, stores them as a BentoML model and builds the bento.
"""

from __future__ import annotations

import hashlib
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
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.explainer import EXPLAIN_JSON, EXPLAIN_ONNX, Explainer
from pipeline.export import WEIGHTS_FILE, rebuild_classifier, torch_probabilities
from pipeline.predictor import METADATA_FILE, ONNX_FILE, ModelError, OnnxClassifier, find_model_files

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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_images(metadata: dict, n: int = 64) -> torch.Tensor:
    size = int(metadata["image_size"])
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def load_weights(folder: Path, metadata: dict) -> torch.nn.Module:
    weights = next(iter(sorted(folder.rglob(WEIGHTS_FILE))), None)
    if weights is None:
        raise ModelError(f"Model folder {folder} has no {WEIGHTS_FILE} to check the ONNX graph against.")
    return rebuild_classifier(weights, metadata)


def check_onnx_matches_torch(classifier: torch.nn.Module, model: OnnxClassifier, images: torch.Tensor) -> float:
    expected = torch_probabilities(classifier, images)
    return float(np.abs(expected - model.predict_proba(images.numpy())).max())


def build_explainer(classifier: torch.nn.Module, model: OnnxClassifier, images: torch.Tensor,
                    out: Path) -> dict[str, float]:
    """Export explain.onnx/explain.json into ``out``; check its probabilities against model.onnx and
    its Grad-CAM against torch autograd. Returns the two largest differences."""
    from pipeline.explain import export_explain, gradcam_autograd

    export_explain(classifier, model.image_size, out)
    session = Explainer(out, model.classes).session
    probabilities, cam = session.run(["probabilities", "cam"], {"image": images.numpy().astype(np.float32) / 255})
    reference = gradcam_autograd(classifier, images.float() / 255).numpy()
    diffs = {
        "explain_probability_max_abs_diff": float(np.abs(probabilities - model.predict_proba(images.numpy())).max()),
        "gradcam_max_rel_diff": float(np.abs(cam - reference).max() / max(float(np.abs(reference).max()), 1e-12)),
    }
    if diffs["explain_probability_max_abs_diff"] > TOLERANCE or diffs["gradcam_max_rel_diff"] > 1e-3:
        raise ModelError(f"The explain graph disagrees with the model ({diffs}): not packaging.")
    return diffs


def package(model_uri: str, tracking_uri: str, bento_model: str = "cifar4-classifier",
            build: bool = True, project_root: Path | None = None) -> Packaged:
    import bentoml

    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    version = resolve_version(client, model_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    onnx_path, meta_path = find_model_files(local)
    metadata = json.loads(meta_path.read_text())
    classifier, model = load_weights(local, metadata), OnnxClassifier.from_dir(local)
    images = check_images(metadata)
    max_diff = check_onnx_matches_torch(classifier, model, images)
    if max_diff > TOLERANCE:
        raise ModelError(f"ONNX and torch outputs differ by {max_diff:.2e} (> {TOLERANCE}): not packaging.")
    with tempfile.TemporaryDirectory() as tmp:
        explain_dir = Path(tmp)
        files = {ONNX_FILE: onnx_path, METADATA_FILE: meta_path}
        try:
            explain_diffs = build_explainer(classifier, model, images[:16], explain_dir)
            files.update({EXPLAIN_ONNX: explain_dir / EXPLAIN_ONNX, EXPLAIN_JSON: explain_dir / EXPLAIN_JSON})
        except ValueError as error:  # a network without named stages: /classify works, /explain says why not
            print(f"No explain graph for this model ({error}); /explain will answer 503.", file=sys.stderr)
            explain_diffs = {}
        info = {
            **metadata,
            "registered_model": version.name, "model_version": str(version.version),
            "mlflow_run_id": version.run_id, "mlflow_model_uri": model_uri, "onnx_torch_max_abs_diff": max_diff,
            **explain_diffs,
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
    return Packaged(str(stored.tag), bento_tag, version.name, str(version.version), max_diff,
                    explain_diffs.get("gradcam_max_rel_diff", float("nan")))


def make_world_readable(folder: Path) -> None:
    """BentoML creates stores with mode 700; the container's non-root user must read them."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
