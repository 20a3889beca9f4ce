"""A model folder: what an exported model is made of, and the checks every reader of one makes.

Training writes these files, ``pipeline package`` copies them into the BentoML store, the
service loads them from there and the registry follower downloads them from MLflow. All of
them use this module, so a model is checked the same way wherever it is read:

- the file names (``model.onnx``, ``classifier.json``, ``explain.onnx``, ``explain.json``);
- sha256 checksums: recorded when a run is logged (run tags ``checksum.<file>``) and when a model
  is packaged (BentoML metadata ``checksums``), verified on every load;
- the probe check: finite probabilities that sum to 1 on fixed images;
- the ONNX Runtime session options;
- the pixel limit for decoded images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

ONNX_FILE = "model.onnx"
METADATA_FILE = "classifier.json"
EXPLAIN_ONNX = "explain.onnx"
EXPLAIN_JSON = "explain.json"
MODEL_FILES = (ONNX_FILE, METADATA_FILE, EXPLAIN_ONNX, EXPLAIN_JSON)
REQUIRED_FILES = (ONNX_FILE, METADATA_FILE)
CHECKSUM_TAG = "checksum."  # run tags checksum.<file> = sha256, written when a training run logs its model
MAX_PIXELS = 40_000_000  # 40 MP: a large phone photo, far below a decompression bomb


class ModelError(RuntimeError):
    """A model folder is missing, incomplete, modified or gives bad answers; the message says which."""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def locate(folder: Union[str, Path], name: str) -> Path | None:
    """``name`` under ``folder`` at any depth (MLflow puts extra files in ``extra_files/``), or None."""
    return next(iter(sorted(Path(folder).rglob(name))), None)


def find_model_files(folder: Union[str, Path]) -> tuple[Path, Path]:
    """(model.onnx, classifier.json) under ``folder``; ModelError when either is missing."""
    onnx_path, meta_path = locate(folder, ONNX_FILE), locate(folder, METADATA_FILE)
    if onnx_path is None or meta_path is None:
        raise ModelError(f"Model folder {str(folder)!r} lacks {ONNX_FILE} or {METADATA_FILE}.")
    return onnx_path, meta_path


def file_checksums(folder: Union[str, Path]) -> dict[str, str]:
    """sha256 of each model file found under ``folder``."""
    return {name: sha256(path) for name in MODEL_FILES if (path := locate(folder, name)) is not None}


def modified_files(folder: Union[str, Path], recorded: Mapping[str, str]) -> list[str]:
    """The recorded files that are missing from ``folder`` or whose sha256 differs from the record."""
    folder = Path(folder)
    return [name for name, digest in recorded.items()
            if not (folder / name).is_file() or sha256(folder / name) != digest]


def probe_images(size: int, n: int = 16) -> np.ndarray:
    """Fixed uint8 images (seeded noise) to check that a model answers at all."""
    return np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def bad_answers(probabilities: np.ndarray) -> bool:
    """True when some probabilities are not finite or a row does not sum to 1."""
    return not np.isfinite(probabilities).all() or bool(np.abs(probabilities.sum(1) - 1).max() > 1e-4)


def check_answers(model: Any, n: int = 16) -> None:
    """ModelError unless ``model`` (an OnnxClassifier) gives valid probabilities on the probe images."""
    if bad_answers(model.predict_proba(probe_images(model.image_size, n))):
        raise ModelError(f"{ONNX_FILE} gives probabilities that are not finite or do not sum to 1 on the probe images.")


def ort_session(graph: Union[str, Path, bytes], threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (default: the cores, up to 4), one inter-op.

    ``spinning=False`` lets idle threads sleep instead of spinning, so the CPU goes to the event loop
    (the service) or to /classify (the occasional /explain).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), options,
                                providers=["CPUExecutionProvider"])
