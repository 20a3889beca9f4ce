"""Calibration: how far the probabilities are from the accuracy (ECE, NLL, Brier, reliability bins), and
fitting a temperature to a trained net's logits on the validation split (Guo et al. 2017).

Softmax(logits / T) with the T that minimises the validation negative log-likelihood. Every logit of an
image is divided by the same number, so the answer (the top class) cannot change; T goes into
``model.onnx`` after the TTA averaging and before the softmax.

T may also grow with the image's top logit (:class:`Temperature`, ``calibration.by_confidence``): nets
trained with outlier exposure are sharp where they are sure and too flat where they are not (the uniform
loss pulls hard in-scope images towards "none of these"), which no single number undoes (docs/trust.md).
numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Temperature:
    """``T(z) = base * exp(slope * (max(z) - mean) / std)`` for an image's logits ``z``: one number when
    ``slope`` is 0. ``mean`` and ``std`` are those of the top logit on the validation split."""

    base: float = 1.0
    slope: float = 0.0
    mean: float = 0.0
    std: float = 1.0

    def of(self, logits: np.ndarray) -> np.ndarray:
        """``(N,)`` temperatures of ``(N, classes)`` logits."""
        logits = np.asarray(logits, np.float64)
        if self.slope == 0.0:
            return np.full(len(logits), self.base)
        return self.base * np.exp(self.slope * (logits.max(axis=1) - self.mean) / self.std)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated logits ``z / T(z)``, whose softmax is the answer."""
        return np.asarray(logits, np.float64) / self.of(logits)[:, None]

    def metadata(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        if self.slope == 0.0:
            return f"{self.base:.3f}"
        return f"{self.base:.3f} x exp({self.slope:+.3f} x top-logit z-score)"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float, groups: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of softmax(logits / T); with ``groups`` (one id per image), the mean over
    groups of each group's mean, so that every group counts the same however many images it has."""
    losses = -log_softmax(np.asarray(logits, np.float64) / temperature)[np.arange(len(labels)), labels]
    if groups is None:
        return float(losses.mean())
    return float(np.mean([losses[groups == g].mean() for g in np.unique(groups)]))


def golden_section(f, a: float, b: float, tolerance: float = 1e-5) -> float:
    """The x in [a, b] where the unimodal ``f`` is smallest, to within ``tolerance``."""
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0,
                    groups: np.ndarray | None = None) -> float:
    """The temperature in [low, high] with the smallest NLL (with ``groups``, the mean over groups of their
    NLLs): golden-section search on log T (the NLL is unimodal in T), to a relative precision of about 1e-5."""
    return float(np.exp(golden_section(lambda t: nll(logits, labels, np.exp(t), groups), np.log(low), np.log(high))))


def fit_temperature_by_confidence(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None,
                                  max_slope: float = 2.0) -> Temperature:
    """The :class:`Temperature` (base and slope) with the smallest NLL (with ``groups``, the mean over groups):
    for each slope the best base (:func:`fit_temperature`), and golden-section search over the slope in
    [-max_slope, max_slope]. Never worse on these images than the one-number fit, which is slope 0."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=1)
    mean, std = float(top.mean()), float(top.std()) or 1.0
    scale = np.exp((top - mean) / std)

    def best(slope: float) -> tuple[float, float]:
        shaped = logits / scale[:, None] ** slope
        base = fit_temperature(shaped, labels, groups=groups)
        return nll(shaped, labels, base, groups), base

    slope = golden_section(lambda s: best(s)[0], -max_slope, max_slope, 1e-4)
    flat_nll, flat_base = best(0.0)
    fitted_nll, base = best(slope)
    if flat_nll <= fitted_nll:
        return Temperature(flat_base)
    return Temperature(base, float(slope), mean, std)


def calibration_scores(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, float]:
    """Accuracy, mean top probability, ECE (``bins`` equal-width bins of the top probability), negative
    log-likelihood and Brier score (sum over classes of the squared error, mean over images)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    top = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    counts, confidence, accuracy = reliability(probabilities, labels, bins)
    ece = float(np.sum(counts * np.abs(confidence - accuracy)) / max(1, len(labels)))
    onehot = np.eye(probabilities.shape[1])[labels]
    return {
        "acc": float(right.mean()), "mean_confidence": float(top.mean()), "ece": ece,
        "nll": float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).mean()),
        "brier": float(((probabilities - onehot) ** 2).sum(axis=1).mean()),
    }


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin of the top probability (equal width on [0, 1]): image count, mean top probability, accuracy
    (0 where a bin is empty)."""
    top = probabilities.max(axis=1)
    right = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip((top * bins).astype(int), 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1)
    confidence = np.bincount(which, weights=top, minlength=bins) / safe
    accuracy = np.bincount(which, weights=right, minlength=bins) / safe
    return counts, confidence, accuracy
