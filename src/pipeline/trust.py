"""After training: make a run's answers mean what they say, and measure how far they can be trusted.

1. Fit a temperature on the validation split (:mod:`pipeline.calibration`): model.onnx divides the
   TTA-averaged logits by it before the softmax. After the uniform outlier loss it grows with the image's
   top logit (``calibration.by_confidence``: sure answers are sharpened less than unsure ones). With several sources
   it minimises the mean over sources of their NLLs (``calibration.balance_sources``), so photographs count
   as much as a larger CIFAR source.
2. Add the out-of-scope score to the graph (:mod:`pipeline.scope`: the energy of the calibrated logits,
   the distance to a bank of training images' features, or the larger of the two in validation
   standard deviations) and set the threshold that keeps ``out_of_scope.keep`` of the validation
   split in scope.
3. Report, before and after calibration, ECE, NLL and Brier score on the validation and test splits,
   the share of each split flagged, and the same on every ``evaluation.folders`` entry, with the
   AUROC of the out-of-scope score between the in-scope and out-of-scope sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from pipeline.calibration import Temperature, calibration_scores, fit_temperature, fit_temperature_by_confidence
from pipeline.config import Config
from pipeline.evaluation import auroc, fpr_at_tpr, labelled_metrics, score_folders
from pipeline.scope import (
    CombinedScore, Deployed, EnergyScore, NearestNeighbourScore, Outputs, bank_rows, outputs, threshold_for,
)


@dataclass
class TrustReport:
    temperature: Temperature
    scope_metadata: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)  # split -> before/after/labels
    answers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # split -> probabilities, scope scores

    def table(self, family: str) -> Table:
        m = self.metrics
        table = Table(title=f"{family}: calibration (temperature {self.temperature}) and out-of-scope "
                            f"(threshold {self.scope_metadata['threshold']:.4f})")
        for column in ("split", "acc", "ECE before", "ECE", "NLL before", "NLL", "flagged out of scope"):
            table.add_column(column, justify="right")
        for split in ("val", "test"):
            if f"{split}_ece" in m:
                table.add_row(split, f"{m[f'{split}_acc_calibrated']:.4f}", f"{m[f'{split}_ece_uncalibrated']:.4f}",
                              f"{m[f'{split}_ece']:.4f}", f"{m[f'{split}_nll_uncalibrated']:.4f}",
                              f"{m[f'{split}_nll']:.4f}", f"{m[f'{split}_out_of_scope_rate']:.3f}")
        names = sorted({key.split("/")[1] for key in m if key.startswith("eval/")})
        for name in names:
            get = lambda key: m.get(f"eval/{name}/{key}")  # noqa: E731
            acc = get("balanced_acc")
            table.add_row(name, "" if acc is None else f"{acc:.4f} (balanced)", "",
                          "" if get("ece") is None else f"{get('ece'):.4f}", "",
                          "" if get("nll") is None else f"{get('nll'):.4f}",
                          f"{get('out_of_scope_rate'):.3f}"
                          + ("" if get("auroc_vs_test") is None else f" (AUROC vs test {get('auroc_vs_test'):.3f})"))
        sources = sorted({key.split("/")[1] for key in m if key.startswith("source/")})
        for name in sources if len(sources) > 1 else []:
            for split in ("val", "test"):
                get = lambda key: m.get(f"source/{name}/{split}_{key}")  # noqa: E731
                if get("acc") is not None:
                    table.add_row(f"{split}: {name}", f"{get('acc'):.4f} ({get('balanced_acc'):.4f} balanced)", "",
                                  f"{get('ece'):.4f}", "", f"{get('nll'):.4f}", f"{get('out_of_scope_rate'):.3f}")
        for split in ("val", "test"):
            if f"outliers/{split}/auroc" in m:
                table.add_row(f"{split} outliers (held-out classes)", "", "", "", "", "",
                              f"{m[f'outliers/{split}/flagged']:.3f} (AUROC {m[f'outliers/{split}/auroc']:.3f}, "
                              f"FPR@95 {m[f'outliers/{split}/fpr_at_95']:.3f})")
        return table

    def plot(self, path: Path, family: str) -> Path:
        from pipeline.plots import plot_reliability

        return plot_reliability(self.curves, path, f"{family}: reliability (T = {self.temperature.base:.3f}"
                                + (")" if not self.temperature.slope else f", slope {self.temperature.slope:+.2f})"))


def source_metrics(dm, split: str, probabilities: np.ndarray, labels: np.ndarray,
                   flagged: np.ndarray) -> dict[str, float]:
    """``source/<name>/<split>_...`` (accuracy, balanced accuracy, calibration, share flagged) for each training
    source, ``<split>_balanced_acc`` overall, and ``<split>_acc_source_mean``: the mean over sources of accuracy,
    what the champion rule compares (a family better on one source and worse on another does not win by size)."""
    ids = getattr(dm, f"{split}_source", None)
    names = list(getattr(dm, "source_names", []) or ["data"])
    ids = np.zeros(len(labels), dtype=np.int64) if ids is None else ids.cpu().numpy()
    overall = labelled_metrics(f"{split}_", probabilities, labels, None, dm.classes)
    metrics = {f"{split}_balanced_acc": overall[f"{split}_balanced_acc"]}
    accuracies = []
    for index, name in enumerate(names):
        inside = ids == index
        if not inside.any():
            continue
        found = labelled_metrics(f"source/{name}/{split}_", probabilities[inside], labels[inside], flagged[inside],
                                 dm.classes)
        accuracies.append(found[f"source/{name}/{split}_acc"])
        metrics.update(found)
    metrics[f"{split}_acc_source_mean"] = float(np.mean(accuracies))
    return metrics


def outlier_metrics(dm, in_scope: dict[str, np.ndarray], answer, threshold: float) -> dict[str, float]:
    """Validation and test outliers (classes never trained on) against the in-scope split of the same name:
    ``outliers/<split>/auroc``, ``fpr_at_95`` and ``flagged`` (share above the threshold), also per source."""
    metrics: dict[str, float] = {}
    names = list(getattr(dm, "source_names", []) or [])
    for split, inside in in_scope.items():
        images = getattr(dm, f"outlier_{split}", None)
        if images is None:
            continue
        scores = answer(images.cpu().numpy())[1]
        metrics.update({f"outliers/{split}/images": float(len(scores)), f"outliers/{split}/auroc": auroc(inside, scores),
                        f"outliers/{split}/fpr_at_95": fpr_at_tpr(inside, scores),
                        f"outliers/{split}/flagged": float(np.mean(scores > threshold))})
        ids = getattr(dm, f"{split}_source", None)
        if ids is not None and len(names) > 1:
            ids = ids.cpu().numpy()
            for index, name in enumerate(names):
                if (ids == index).any():
                    metrics[f"source/{name}/{split}_outlier_auroc"] = auroc(inside[ids == index], scores)
    return metrics


def make_trustworthy(config: Config, classifier: torch.nn.Module, dm) -> tuple[Deployed, TrustReport]:
    """Calibrate ``classifier`` in place, build its out-of-scope scorer, and measure both.

    Each split goes through the network once: the report keeps its calibrated probabilities and scope
    scores (``report.answers``), which publishing scores and plots.
    """
    classifier = classifier.eval().float().cpu()
    scope = config.out_of_scope
    val_labels = dm.val_labels.cpu().numpy()
    val = outputs(classifier, dm.val_images.cpu())
    val_source = getattr(dm, "val_source", None)
    val_source = None if val_source is None else val_source.cpu().numpy()
    groups = val_source if config.calibration.balance_sources else None
    calibration = config.calibration
    temperature = Temperature()
    # auto: where it was measured to pay, nets trained with the uniform outlier loss (docs/trust.md).
    shaped = calibration.by_confidence == "always" or (
        calibration.by_confidence == "auto" and bool(getattr(dm, "outlier_dirs", None))
        and config.optim.outlier_loss == "uniform" and config.data.outlier_share > 0)
    if calibration.temperature and shaped:
        temperature = fit_temperature_by_confidence(val.logits, val_labels, groups=groups)
    elif calibration.temperature:
        temperature = Temperature(fit_temperature(val.logits, val_labels, groups=groups))
    classifier.set_temperature(temperature)
    described: dict[str, Any] = {"score": scope.score, "keep": scope.keep}

    def scored(scorer: torch.nn.Module, out: Outputs) -> np.ndarray:
        with torch.inference_mode():
            return scorer(out.features, torch.from_numpy(out.calibrated(temperature)).float()).numpy()

    scorer: torch.nn.Module = EnergyScore()
    if scope.score in ("knn", "combined"):
        rows = bank_rows(len(dm.train_labels), scope.bank_size, config.seed)
        knn = NearestNeighbourScore(outputs(classifier, dm.train_images[rows].cpu()).features, min(scope.k, len(rows)))
        described.update(k=knn.k, bank_size=len(rows))
        scorer = knn
        if scope.score == "combined":
            energy, distance = scored(EnergyScore(), val), scored(knn, val)
            scorer = CombinedScore(knn, (float(energy.mean()), float(energy.std())),
                                   (float(distance.mean()), float(distance.std())), scope.knn_margin)
            described.update(knn_margin=scope.knn_margin)

    val_scores = scored(scorer, val)
    threshold = threshold_for(val_scores, scope.keep, val_source)
    report = TrustReport(temperature, {**described, "threshold": threshold})
    metrics = report.metrics
    metrics.update({"temperature": temperature.base, "temperature_slope": temperature.slope,
                    "out_of_scope_threshold": threshold})

    splits = {"val": (val, val_labels, val_scores)}
    if dm.test_images is not None:
        test = outputs(classifier, dm.test_images.cpu())
        splits["test"] = (test, dm.test_labels.cpu().numpy(), scored(scorer, test))
    for split, (out, labels, scores) in splits.items():
        probabilities = out.probabilities(temperature)
        before, after = calibration_scores(out.probabilities(), labels), calibration_scores(probabilities, labels)
        metrics.update({f"{split}_{key}_uncalibrated": before[key] for key in ("ece", "nll", "brier",
                                                                                "mean_confidence")})
        metrics.update({f"{split}_{key}": after[key] for key in ("ece", "nll", "brier", "mean_confidence")})
        metrics[f"{split}_acc_calibrated"] = after["acc"]
        metrics[f"{split}_out_of_scope_rate"] = float(np.mean(scores > threshold))
        report.curves[split] = (out.probabilities(), probabilities, labels)
        report.answers[split] = (probabilities, scores)
        metrics.update(source_metrics(dm, split, probabilities, labels, scores > threshold))

    def answer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = outputs(classifier, torch.from_numpy(images))
        return out.probabilities(temperature), scored(scorer, out)

    metrics.update(outlier_metrics(dm, {split: v[2] for split, v in splits.items()}, answer, threshold))
    metrics.update(score_folders(config.evaluation.folders, dm.classes, config.data.image_size, answer, threshold,
                                 {"test": splits["test"][2]} if "test" in splits else {}))
    return Deployed(classifier, scorer), report
