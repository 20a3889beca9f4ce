"""Turn a trained :class:`~pipeline.module.Classifier` into an MLflow Model (ONNX + metadata)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import torch
from mlflow.models import infer_signature
from torch import nn

from pipeline.calibration import Temperature
from pipeline.explain_graph import export_checked_explain
from pipeline.models import build_model, load_family_module
from pipeline.runtime.model_folder import EXPLAIN_JSON, EXPLAIN_ONNX, METADATA_FILE, ONNX_FILE
from pipeline.runtime.onnx_model import PROBABILITIES, SCOPE_SCORE, OnnxClassifier
from pipeline.scope import Deployed, score_tolerance

WEIGHTS_FILE = "weights.pt"


def export_onnx(deployed: nn.Module, image_size: int, path: Path) -> Path:
    """Export normalization + network + TTA + temperature + softmax (and the out-of-scope score when given
    a :class:`Deployed` with a scorer; a bare Classifier exports probabilities only), with a dynamic batch
    dimension."""
    if not isinstance(deployed, Deployed):
        deployed = Deployed(deployed)
    model = deployed.eval().to(memory_format=torch.contiguous_format).float().cpu()
    example = torch.rand(2, 3, image_size, image_size)
    outputs = [PROBABILITIES] + ([SCOPE_SCORE] if deployed.scorer is not None else [])
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["image"], output_names=outputs,
        dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},), verbose=False,
    )
    program.save(str(path))
    return path


def torch_outputs(deployed: nn.Module, images_uint8: torch.Tensor,
                  chunk: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """What model.onnx gives for uint8 images, computed by torch: probabilities and out-of-scope scores
    (None without a scorer)."""
    if not isinstance(deployed, Deployed):
        deployed = Deployed(deployed)
    deployed = deployed.eval().cpu().float()
    probabilities, scores = [], []
    with torch.inference_mode():
        for start in range(0, len(images_uint8), chunk):
            out = deployed(images_uint8[start : start + chunk].float().div(255.0))
            probabilities.append((out[0] if isinstance(out, tuple) else out).numpy())
            if isinstance(out, tuple):
                scores.append(out[1].numpy())
    if not probabilities:
        return np.zeros((0, 0), np.float32), None
    return np.concatenate(probabilities), np.concatenate(scores) if scores else None


def log_classifier(
    deployed: Deployed, metadata: dict[str, Any], example_images: torch.Tensor
) -> tuple[str, dict[str, float]]:
    """Log the model to the active MLflow run: model.onnx, classifier.json, weights.pt, and the explain
    graph (explain.onnx + explain.json) checked against model.onnx and torch autograd, so that packaging
    only copies. Returns (model_uri, the checks' largest differences)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        classifier = deployed.classifier
        onnx_path = export_onnx(deployed, int(metadata["image_size"]), folder / ONNX_FILE)
        meta_path = folder / METADATA_FILE
        meta_path.write_text(json.dumps(metadata, indent=2))
        # The state_dict too (tensors only, loadable with weights_only=True): packaging checks
        # ONNX against a rebuilt torch net, and tools that need torch layers can use it.
        weights_path = folder / WEIGHTS_FILE
        torch.save(classifier.state_dict(), weights_path)
        expected, expected_scores = torch_outputs(deployed, example_images)
        onnx_model = OnnxClassifier(onnx_path, metadata)
        probabilities, scores = onnx_model.predict(example_images.numpy())
        max_diff = float(np.abs(expected - probabilities).max())
        if max_diff > 1e-5:
            raise RuntimeError(f"ONNX export disagrees with torch by {max_diff:.2e} (> 1e-5)")
        checks = {"onnx_max_abs_diff": max_diff}
        if expected_scores is not None:
            checks["onnx_scope_score_max_abs_diff"] = float(np.abs(expected_scores - scores).max())
            tolerance = score_tolerance(deployed.scorer)
            if checks["onnx_scope_score_max_abs_diff"] > tolerance:
                raise RuntimeError(f"ONNX out-of-scope scores disagree with torch by "
                                   f"{checks['onnx_scope_score_max_abs_diff']:.2e} (> {tolerance:.1e})")
        # Every family keeps the explain contract (checked when its network is built): the graph always exports.
        checks.update(export_checked_explain(classifier, onnx_model, example_images[:16], folder))
        extra_files = [str(meta_path), str(weights_path), str(folder / EXPLAIN_ONNX), str(folder / EXPLAIN_JSON)]
        example = example_images[:2].numpy().astype(np.float32) / 255.0
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            input_example=example,
            signature=infer_signature(example, expected[:2] if expected_scores is None else
                                      {PROBABILITIES: expected[:2], SCOPE_SCORE: expected_scores[:2]}),
            metadata=metadata,
            extra_files=extra_files,
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    return info.model_uri, checks


def rebuild_classifier(weights_path: Path, metadata: dict[str, Any]) -> nn.Module:
    """The torch net from a state_dict and its metadata: no pickled code is loaded."""
    from pipeline.module import Classifier

    load_family_module(metadata.get("model_module", ""))
    net = build_model(metadata["arch"], len(metadata["classes"]), **metadata.get("model_args", {}))
    classifier = Classifier(net, metadata["mean"], metadata["std"], tta=int(metadata.get("tta", 0)),
                            temperature=Temperature(**metadata["calibration"]) if "calibration" in metadata
                            else float(metadata.get("temperature", 1.0)))
    classifier.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return classifier.eval()
