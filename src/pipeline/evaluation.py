"""Accuracy, per-class accuracy and confusion matrix from predicted probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.table import Table


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
