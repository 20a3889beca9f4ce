"""One loader for a served model, whichever way its files came: ``make package`` (the BentoML store) or
the registry follower (downloaded from MLflow).

:func:`load_served` checks a model folder against the sha256 recorded for its files (at packaging, or
as run tags at training), loads ``model.onnx`` with its metadata, checks its answers on the probe
images, and keeps the explain graph (when one was recorded) as bytes, so the folder may go once it
returns. A problem is a :class:`ModelError` whose message says what is wrong; the caller says what
to do about it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from pipeline.runtime.explainer import Explainer, LazyExplainer
from pipeline.runtime.model_folder import (EXPLAIN_JSON, EXPLAIN_ONNX, METADATA_FILE, ONNX_FILE, REQUIRED_FILES,
                                           ModelError, check_answers, modified_files)
from pipeline.runtime.onnx_model import OnnxClassifier


@dataclass
class Served:
    """One model as the service uses it; swapped as a whole, never changed in place."""
    model: OnnxClassifier
    explainer: Optional[LazyExplainer]
    info: dict[str, Any]

    @property
    def answer_info(self) -> dict[str, Any]:
        return {"name": self.info.get("registered_model"), "version": self.info.get("model_version"),
                "run_id": self.info.get("run_id")}


def load_served(folder: Path, recorded: Mapping[str, str], info: Mapping[str, Any], threads: int, spinning: bool,
                classes: Optional[list[str]] = None) -> Served:
    """The model in ``folder``, checked against ``recorded`` (file -> sha256); ``info`` joins its metadata.

    ``classes``: the served model's, which a replacement must have (None: the first model, any classes).
    """
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if name not in recorded or not (folder / name).is_file()]
    if missing:
        raise ModelError(f"it lacks {missing[0]}")
    changed = modified_files(folder, recorded)
    if changed:
        raise ModelError(f"its {changed[0]} does not match the checksum recorded for it")
    metadata = json.loads((folder / METADATA_FILE).read_text())
    if classes is not None and list(metadata.get("classes", [])) != list(classes):
        raise ModelError(f"it has classes {metadata.get('classes')}, the served model {classes}")
    model = OnnxClassifier(folder / ONNX_FILE, metadata, threads=threads, spinning=spinning)
    check_answers(model)
    explainer = None
    if EXPLAIN_ONNX in recorded and EXPLAIN_JSON in recorded:  # models logged before /explain have none
        graph, explain_info = (folder / EXPLAIN_ONNX).read_bytes(), json.loads((folder / EXPLAIN_JSON).read_text())
        explainer = LazyExplainer(lambda: Explainer(model.classes, threads, graph, explain_info))
    return Served(model, explainer, {**metadata, **info, "checksums": dict(recorded)})
