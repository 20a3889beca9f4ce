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

from pipeline.explain import export_checked_explain
from pipeline.runtime.explainer import EXPLAIN_JSON, EXPLAIN_ONNX
from pipeline.models import build_model
from pipeline.runtime.onnx_model import METADATA_FILE, ONNX_FILE, OnnxClassifier

WEIGHTS_FILE = "weights.pt"


class WithSoftmax(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(image), dim=-1)


def export_onnx(classifier: nn.Module, image_size: int, path: Path) -> Path:
    """Export normalization + network + softmax, with a dynamic batch dimension."""
    model = WithSoftmax(classifier).eval().to(memory_format=torch.contiguous_format).float().cpu()
    example = torch.rand(2, 3, image_size, image_size)
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["image"], output_names=["probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},), verbose=False,
    )
    program.save(str(path))
    return path


def torch_probabilities(classifier: nn.Module, images_uint8: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    classifier = classifier.eval().cpu().float()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images_uint8), batch_size):
            batch = images_uint8[start : start + batch_size].float().div(255.0)
            out.append(torch.softmax(classifier(batch), dim=-1).numpy())
    return np.concatenate(out)


def log_classifier(
    classifier: nn.Module, metadata: dict[str, Any], example_images: torch.Tensor
) -> tuple[str, dict[str, float]]:
    """Log the model to the active MLflow run: model.onnx, classifier.json, weights.pt, and the explain
    graph (explain.onnx + explain.json) checked against model.onnx and torch autograd, so that packaging
    only copies. Returns (model_uri, the checks' largest differences)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx_path = export_onnx(classifier, int(metadata["image_size"]), folder / ONNX_FILE)
        meta_path = folder / METADATA_FILE
        meta_path.write_text(json.dumps(metadata, indent=2))
        # The state_dict too (tensors only, loadable with weights_only=True): packaging checks
        # ONNX against a rebuilt torch net, and tools that need torch layers can use it.
        weights_path = folder / WEIGHTS_FILE
        torch.save(classifier.state_dict(), weights_path)
        expected = torch_probabilities(classifier, example_images)
        onnx_model = OnnxClassifier(onnx_path, metadata)
        max_diff = float(np.abs(expected - onnx_model.predict_proba(example_images.numpy())).max())
        if max_diff > 1e-5:
            raise RuntimeError(f"ONNX export disagrees with torch by {max_diff:.2e} (> 1e-5)")
        checks = {"onnx_max_abs_diff": max_diff}
        extra_files = [str(meta_path), str(weights_path)]
        try:
            checks.update(export_checked_explain(classifier, onnx_model, example_images[:16], folder))
            extra_files += [str(folder / EXPLAIN_ONNX), str(folder / EXPLAIN_JSON)]
        except ValueError as error:  # a network without named stages: /classify works, /explain says why not
            print(f"No explain graph for this model ({error}); /explain will answer 503.")
        example = example_images[:2].numpy().astype(np.float32) / 255.0
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            input_example=example,
            signature=infer_signature(example, expected[:2]),
            metadata=metadata,
            extra_files=extra_files,
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    return info.model_uri, checks


def rebuild_classifier(weights_path: Path, metadata: dict[str, Any]) -> nn.Module:
    """The torch net from a state_dict and its metadata: no pickled code is loaded."""
    from pipeline.module import Classifier

    net = build_model(metadata["arch"], len(metadata["classes"]), **metadata.get("model_args", {}))
    classifier = Classifier(net, metadata["mean"], metadata["std"], tta=int(metadata.get("tta", 0)))
    classifier.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return classifier.eval()
