"""Scoring predicted probabilities: accuracy, per-class accuracy, confusion matrix, calibration (ECE, NLL,
Brier, reliability), out-of-scope ranking (AUROC, false-positive rate) and extra evaluation folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from pipeline.calibration import calibration_scores


@dataclass
class Scores:
    accuracy: float
    per_class: dict[str, float]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    classes: list[str]

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}acc": self.accuracy}
        out.update({f"{prefix}acc_{name}": value for name, value in self.per_class.items()})
        return out

    def table(self, title: str = "") -> Table:
        table = Table(title=title or f"accuracy {self.accuracy:.4f}")
        table.add_column("true \\ predicted")
        for name in self.classes:
            table.add_column(name, justify="right")
        table.add_column("class acc", justify="right")
        for i, name in enumerate(self.classes):
            table.add_row(name, *[str(v) for v in self.confusion[i]], f"{self.per_class[name]:.4f}")
        return table


def score(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> Scores:
    predicted = probabilities.argmax(axis=1)
    k = len(classes)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    totals = confusion.sum(axis=1)
    per_class = {name: float(confusion[i, i] / totals[i]) if totals[i] else float("nan")
                 for i, name in enumerate(classes)}
    return Scores(float((predicted == labels).mean()), per_class, confusion, list(classes))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """How well an out-of-scope score (higher: more likely out of scope) ranks out-of-scope images above
    in-scope ones: the Mann-Whitney U statistic over both sets (ties count half)."""
    scores = np.concatenate([in_scores, out_scores])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    sorted_scores = scores[order]  # average ranks over ties
    unique, start, count = np.unique(sorted_scores, return_index=True, return_counts=True)
    for s, c in zip(start[count > 1], count[count > 1]):
        ranks[order[s : s + c]] = ranks[order[s : s + c]].mean()
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Share of out-of-scope images still answered when the threshold keeps ``tpr`` of the in-scope ones
    (FPR@95, the literature's figure: fixed, whatever ``out_of_scope.keep`` the deployed threshold uses)."""
    threshold = np.quantile(in_scores, tpr)
    return float((out_scores <= threshold).mean())


@dataclass
class EvalFolder:
    """An extra evaluation folder: labelled (subfolders named after the model's classes) or out of scope."""

    name: str
    path: Path
    images: np.ndarray  # (N, 3, H, W) uint8
    labels: np.ndarray | None  # model class indices; None: every image is out of scope

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def check_eval_folders(folders: dict[str, str]) -> None:
    """One sentence for an ``evaluation.folders`` entry that is not a folder (checked before training)."""
    from pipeline.errors import DataError

    for name, path in folders.items():
        if not Path(path).expanduser().is_dir():
            raise DataError(f"Evaluation folder {name!r} ({str(path)!r}) does not exist or is not a folder.")


def load_eval_folder(name: str, path: str | Path, classes: list[str], size: int) -> EvalFolder:
    """Decode a folder for evaluation. Its subfolders all named after classes: labelled; otherwise every
    image under it, at any depth, is taken as out of scope."""
    from pipeline.data import load_image_folder
    from pipeline.predict import find_images
    from pipeline.runtime.imaging import decode_image

    check_eval_folders({name: str(path)})
    path = Path(path).expanduser()
    subfolders = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if subfolders and subfolders <= set(classes):
        # Labelled, with any of the classes (one is enough: a folder of dogs); the rest of the file
        # handling is the training loader's (cache, one sentence for a file that does not decode).
        data = load_image_folder(path, size, min_classes=1)
        labels = np.array([classes.index(data.classes[i]) for i in data.labels.tolist()])
        return EvalFolder(name, path, data.images.numpy(), labels)
    images = np.stack([decode_image(file, size) for file in find_images(path)])
    return EvalFolder(name, path, images, None)


def folder_metrics(folder: EvalFolder, probabilities: np.ndarray, flagged: np.ndarray | None,
                   classes: list[str]) -> dict[str, float]:
    """``eval/<name>/...`` metrics: accuracy (overall, class-balanced, per class) and calibration for a
    labelled folder; for every folder, the share of answers flagged out of scope."""
    return labelled_metrics(f"eval/{folder.name}/", probabilities, folder.labels, flagged, classes)


def score_folders(folders: dict[str, str], classes: list[str], image_size: int, answer, threshold: float,
                  in_scope: dict[str, np.ndarray]) -> dict[str, float]:
    """``evaluation.folders`` after training: each folder's :func:`folder_metrics`, and for each out-of-scope
    folder the AUROC and FPR@95 of its scope scores against every in-scope set (``in_scope``: split name ->
    scores, e.g. the test split; each labelled folder joins them). ``answer(images)`` gives a batch of uint8
    images' (calibrated probabilities, scope scores), so every folder goes through the network once."""
    metrics: dict[str, float] = {}
    inside = dict(in_scope)
    unlabelled = []
    for name, path in folders.items():
        folder = load_eval_folder(name, path, classes, image_size)
        probabilities, scores = answer(folder.images)
        metrics.update(folder_metrics(folder, probabilities, scores > threshold, classes))
        if folder.labelled:
            inside[name] = scores
        else:
            unlabelled.append((folder, scores))
    for folder, scores in unlabelled:
        for name, in_scores in inside.items():
            metrics[f"eval/{folder.name}/auroc_vs_{name}"] = auroc(in_scores, scores)
            metrics[f"eval/{folder.name}/fpr_at_95_vs_{name}"] = fpr_at_tpr(in_scores, scores)
    return metrics


def labelled_metrics(prefix: str, probabilities: np.ndarray, labels: np.ndarray | None, flagged: np.ndarray | None,
                     classes: list[str]) -> dict[str, float]:
    """``<prefix>acc``, ``balanced_acc``, ``acc_<class>``, ``ece``, ``nll``, ``brier`` (with labels), ``images``,
    ``mean_confidence`` and ``out_of_scope_rate`` (with ``flagged``) of one set of answers."""
    out: dict[str, float] = {f"{prefix}images": float(len(probabilities)),
                             f"{prefix}mean_confidence": float(probabilities.max(axis=1).mean())}
    if flagged is not None:
        out[f"{prefix}out_of_scope_rate"] = float(np.mean(flagged))
    if labels is not None:
        scores = score(probabilities, labels, classes)
        present = [name for name in classes if not np.isnan(scores.per_class[name])]
        out[f"{prefix}acc"] = scores.accuracy
        out[f"{prefix}balanced_acc"] = float(np.mean([scores.per_class[name] for name in present]))
        out.update({f"{prefix}acc_{name}": scores.per_class[name] for name in present})
        calibration = calibration_scores(probabilities, labels)
        out.update({f"{prefix}{key}": calibration[key] for key in ("ece", "nll", "brier")})
    return out


def evaluate_model(model_uri: str, data: str, log: bool, experiment: str) -> None:
    """``pipeline evaluate``: score a logged or registered model on a labelled folder (its ``test/`` split
    when it has one) with the served graph; print accuracy, calibration and the flagged share; with ``log``,
    an MLflow run in ``experiment`` with the scores and the confusion matrix."""
    import tempfile
    import time

    import mlflow

    from pipeline.console import console
    from pipeline.data import DataError, load_image_folder, resolve_data_dir
    from pipeline.runtime.onnx_model import OnnxClassifier
    from pipeline.tracking import setup_tracking

    _, experiment_id = setup_tracking(experiment)
    model = OnnxClassifier.from_mlflow(model_uri)
    train_dir, test_dir = resolve_data_dir(data)
    folder = test_dir or train_dir
    images = load_image_folder(folder, model.image_size)
    missing = sorted(set(images.classes) - set(model.classes))
    if missing:
        raise DataError(f"Folder {str(folder)!r} has classes the model does not know: {', '.join(missing)}.")
    labels = np.array([model.classes.index(images.classes[i]) for i in images.labels.tolist()])
    started = time.perf_counter()
    probabilities, scope_scores = model.predict(images.images.numpy())
    seconds = time.perf_counter() - started
    scores = score(probabilities, labels, model.classes)
    calibration = calibration_scores(probabilities, labels)
    flagged = model.out_of_scope(scope_scores)
    console.print(scores.table(f"{model_uri} on {folder}: accuracy {scores.accuracy:.4f} "
                               f"({len(labels):,} images, {len(labels) / seconds:,.0f} img/s)"))
    console.print(f"calibration: mean top probability {calibration['mean_confidence']:.4f} against accuracy "
                  f"{calibration['acc']:.4f}; ECE {calibration['ece']:.4f}, NLL {calibration['nll']:.4f}, "
                  f"Brier {calibration['brier']:.4f}"
                  + ("" if flagged is None else f"; flagged out of scope: {np.mean(flagged):.1%}"))
    if not log:
        return
    from pipeline.plots import plot_confusion_matrix

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate {Path(folder).name}") as run:
        mlflow.set_tags({"kind": "evaluation", "model": model_uri, "data_dir": str(folder),
                         "data_fingerprint": images.fingerprint})
        mlflow.log_metrics({**scores.metrics("eval/"), **{f"eval/{k}": v for k, v in calibration.items()},
                            **({} if flagged is None else {"eval/out_of_scope_rate": float(np.mean(flagged))})})
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_confusion_matrix(scores.confusion, model.classes, Path(tmp) / "confusion_matrix.png",
                                         f"{model_uri} on {folder}")
            mlflow.log_artifact(str(path), artifact_path="plots")
    console.print(f"Logged to MLflow run {run.info.run_id}")
