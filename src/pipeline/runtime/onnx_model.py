"""Run an exported classifier with ONNX Runtime: no torch, no training code, no pickles.

A model folder holds ``model.onnx`` (normalization, network, TTA, temperature and softmax in one
graph, input ``image``: float32 ``(N, 3, H, W)`` in [0, 1]; outputs ``probabilities`` and, for
models trained since it exists, ``out_of_scope_score``) and ``classifier.json`` (class names, input
size, normalization, architecture and its constructor arguments, the temperature, and the
out-of-scope threshold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.runtime.model_folder import ModelError, find_model_files, ort_session

PROBABILITIES = "probabilities"
SCOPE_SCORE = "out_of_scope_score"


class OnnxClassifier:
    def __init__(self, onnx_path: str | Path, metadata: dict[str, Any], threads: int | None = None,
                 spinning: bool = True) -> None:
        self.metadata = metadata
        self.classes: list[str] = list(metadata["classes"])
        self.image_size: int = int(metadata["image_size"])
        self.session = ort_session(onnx_path, threads, spinning)
        outputs = self.session.get_outputs()
        width = outputs[0].shape[-1]
        if isinstance(width, int) and width != len(self.classes):
            raise ModelError(
                f"Model {str(onnx_path)!r} outputs {width} classes but its metadata names "
                f"{len(self.classes)}: {self.classes}."
            )
        self.input_name = self.session.get_inputs()[0].name
        names = [output.name for output in outputs]
        scope = metadata.get("out_of_scope") or {}
        # Models logged before the out-of-scope score have one output and no threshold: answers then carry
        # null for both fields rather than a made-up flag.
        self.has_scope = SCOPE_SCORE in names and "threshold" in scope
        self.scope_threshold = float(scope["threshold"]) if self.has_scope else None
        self.output_names = [names[0]] + ([SCOPE_SCORE] if self.has_scope else [])

    @classmethod
    def from_dir(cls, directory: str | Path, threads: int | None = None, spinning: bool = True) -> "OnnxClassifier":
        onnx_path, meta_path = find_model_files(directory)
        return cls(onnx_path, json.loads(meta_path.read_text()), threads, spinning)

    @classmethod
    def from_mlflow(cls, model_uri: str, threads: int | None = None) -> "OnnxClassifier":
        import mlflow

        return cls.from_dir(mlflow.artifacts.download_artifacts(model_uri), threads)

    def predict(self, images: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 ``(N, 3, H, W)`` images -> float32 ``(N, classes)`` calibrated softmax probabilities and
        ``(N,)`` out-of-scope scores (None for a model without them)."""
        if images.ndim == 3:
            images = images[None]
        probabilities, scores = [], []
        for start in range(0, len(images), chunk):
            batch = images[start : start + chunk].astype(np.float32) / np.float32(255.0)
            out = self.session.run(self.output_names, {self.input_name: batch})
            probabilities.append(out[0])
            if self.has_scope:
                scores.append(out[1])
        if not probabilities:
            return np.zeros((0, len(self.classes)), np.float32), (np.zeros(0, np.float32) if self.has_scope else None)
        return np.concatenate(probabilities), (np.concatenate(scores) if self.has_scope else None)

    def predict_proba(self, images: np.ndarray, chunk: int = 512) -> np.ndarray:
        """uint8 ``(N, 3, H, W)`` images -> float32 ``(N, classes)`` softmax probabilities."""
        return self.predict(images, chunk)[0]

    def out_of_scope(self, scores: np.ndarray | None) -> np.ndarray | None:
        """True where a score is over the threshold stored with the model (None without one)."""
        return None if scores is None else scores > self.scope_threshold
