"""Classify a folder of unlabeled images offline with a registered model: one CSV row per file.

The model is the run's ``model.onnx`` (the same graph ``/classify`` serves), run with ONNX
Runtime; decoding is ``pipeline.runtime.imaging.decode_image``, the service's own. No torch.
A file that does not decode gets a row with its error, and the work goes on.
"""

from __future__ import annotations

import csv
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.errors import DataError
from pipeline.runtime.imaging import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from pipeline.runtime.onnx_model import OnnxClassifier

CHUNK = 256  # files decoded, then classified, at a time


@dataclass
class Predicted:
    out: Path
    files: int
    failed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return (self.files - self.failed) / self.seconds if self.seconds > 0 else float("nan")


def find_images(root: Path, what: str = "Folder") -> list[Path]:
    """Every image file under ``root``, recursively, in a stable order; hidden files and folders are left out.
    ``what`` names the folder in the errors ("Outlier folder")."""
    if not root.is_dir():
        raise DataError(f"{what} {str(root)!r} does not exist or is not a folder.")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not found:
        raise DataError(f"{what} {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}), at any depth.")
    return found


def _decode(path: Path, size: int) -> np.ndarray | str:
    try:
        return decode_image(path, size)
    except ImageDecodeError as error:
        return str(error)
    except OSError as error:  # unreadable file: permissions, vanished, a broken link
        return f"{path.name} could not be read: {error.strerror or error}."


def predict_folder(model: OnnxClassifier, root: str | Path, out: str | Path, threads: int = 2) -> Predicted:
    """Write ``out`` (CSV): path (relative to ``root``), label, probability of each class, out_of_scope
    (true/false), out_of_scope_score, error. The two out-of-scope columns are empty for a model without
    the score, and for a file that does not decode."""
    root, out = Path(root), Path(out)
    files = find_images(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed, started = 0, time.perf_counter()
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn()]
    with open(out, "w", newline="") as handle, ThreadPoolExecutor(threads) as pool, \
            Progress(*columns, transient=False) as progress:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *model.classes, "out_of_scope", "out_of_scope_score", "error"])
        task = progress.add_task("predict", total=len(files), rate="")
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            decoded = list(pool.map(lambda p: _decode(p, model.image_size), chunk))
            good = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
            probabilities, scores = model.predict(np.stack([decoded[i] for i in good])) if good else (None, None)
            flagged = model.out_of_scope(scores)
            rows = {i: j for j, i in enumerate(good)}
            for i, path in enumerate(chunk):
                name = path.relative_to(root).as_posix()
                if i in rows:
                    row = probabilities[rows[i]]
                    scope = ["", ""] if scores is None else [str(bool(flagged[rows[i]])).lower(),
                                                             f"{scores[rows[i]]:.6f}"]
                    writer.writerow([name, model.classes[int(row.argmax())], *(f"{p:.8f}" for p in row), *scope, ""])
                else:
                    failed += 1
                    writer.writerow([name, "", *([""] * len(model.classes)), "", "", decoded[i]])
            done = start + len(chunk)
            rate = (done - failed) / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=done, rate=f"{rate:,.0f} img/s")
    return Predicted(out, len(files), failed, time.perf_counter() - started)
