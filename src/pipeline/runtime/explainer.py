"""Run explain.onnx with ONNX Runtime and turn its outputs into pictures (no torch).

``explain.onnx`` and ``explain.json`` are written when a run logs its model (:mod:`pipeline.explain_graph`)
and travel with it; packaging and the registry follower copy them. The output names are read from
``explain.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.runtime import pictures
from pipeline.runtime.model_folder import EXPLAIN_JSON, EXPLAIN_ONNX, ModelError, ort_session

DISPLAY_SIDE = 128  # the input, overlay and kernel pictures are shown this many pixels square


class Explainer:
    def __init__(self, classes: list[str], threads: int | None, graph: bytes, info: dict) -> None:
        """From the explain graph's bytes and its ``explain.json`` (both travel with the model)."""
        self.info = info
        self.classes = list(classes)
        # Idle threads sleep: /explain is occasional, and spinning threads would take the CPU from /classify.
        self.session = ort_session(graph, threads, spinning=False)
        # The names come with the model (explain.json "outputs", written at export), not from this file.
        self.output_names = list(info.get("outputs") or [o.name for o in self.session.get_outputs()])
        weight = np.asarray(self.info["first_layer"]["weight"], np.float32)
        self.filters_png = pictures.png_base64(pictures.filter_grid(weight))

    @classmethod
    def from_folder(cls, folder: str | Path, classes: list[str], threads: int | None = None) -> "Explainer":
        """From a model folder holding explain.onnx and explain.json."""
        folder = Path(folder)
        for name in (EXPLAIN_ONNX, EXPLAIN_JSON):
            if not (folder / name).is_file():
                raise ModelError(f"Model folder {str(folder)!r} lacks {name}: run `make package` again.")
        return cls(classes, threads, (folder / EXPLAIN_ONNX).read_bytes(), json.loads((folder / EXPLAIN_JSON).read_text()))

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """One uint8 ``(3, H, W)`` image -> the graph's outputs by name, batch dimension dropped."""
        batch = image[None].astype(np.float32) / np.float32(255.0)
        outputs = self.session.run(self.output_names, {self.session.get_inputs()[0].name: batch})
        return {name: value[0] for name, value in zip(self.output_names, outputs)}

    def explain(self, image: np.ndarray, target: int) -> dict:
        """Pictures for one uint8 ``(3, H, W)`` image; Grad-CAM for class index ``target``."""
        out = self.run(image)
        rgb = np.ascontiguousarray(image.transpose(1, 2, 0))
        stages = []
        for stage in self.info["stages"]:
            maps = out[f"stage_{stage['name']}"]
            stages.append({"name": stage["name"], "shape": list(maps.shape),
                           "shown": min(len(maps), pictures.MAX_MAPS),
                           "png": pictures.png_base64(pictures.feature_map_grid(maps))})
        kernels = [{"name": name, "kernel": pictures.KERNELS[name], "png": pictures.png_base64(
                    pictures.upscale(picture, DISPLAY_SIDE))} for name, picture in pictures.apply_kernels(rgb).items()]
        return {
            "input": pictures.png_base64(pictures.upscale(rgb, DISPLAY_SIDE)),
            "saliency": {
                "method": "grad-cam", "stage": self.info["cam_stage"], "class": self.classes[target],
                "overlay": pictures.png_base64(pictures.overlay(rgb, out["cam"][target], DISPLAY_SIDE)),
                "heatmap": pictures.png_base64(pictures.heatmap(out["cam"][target], DISPLAY_SIDE)),
            },
            "stages": stages,
            "first_layer": {
                "shape": self.info["first_layer"]["shape"],
                "filters": self.filters_png,
                "responses": pictures.png_base64(pictures.feature_map_grid(out["first_conv"])),
            },
            "kernels": kernels,
        }


class LazyExplainer:
    """Builds its Explainer on the first /explain: an ONNX Runtime session costs 25-40 MB per worker
    (measured, ResNet-9), which a service that is never asked to explain should not pay."""

    def __init__(self, build) -> None:
        self._build, self._explainer = build, None

    def explain(self, image: np.ndarray, target: int) -> dict:
        if self._explainer is None:  # called from the service's single explain thread
            self._explainer = self._build()
        return self._explainer.explain(image, target)
