"""Calibration: how far the probabilities are from the accuracy (ECE, NLL, Brier, reliability bins), and
fitting a temperature to a trained net's logits on the validation split (Guo et al. 2017).

Softmax(logits / T) with the T that minimises the validation negative log-likelihood: one number,
so the accuracy cannot change, and it goes into ``model.onnx`` after the TTA averaging and before
the softmax. numpy only.
"""

from __future__ import annotations

import numpy as np


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


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0,
                    groups: np.ndarray | None = None) -> float:
    """The temperature in [low, high] with the smallest NLL (with ``groups``, the mean over groups of their
    NLLs): golden-section search on log T (the NLL is unimodal in T), to a relative precision of about 1e-5."""
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, np.exp(c), groups), nll(logits, labels, np.exp(d), groups)
    while b - a > 1e-5:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, np.exp(c), groups)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, np.exp(d), groups)
    return float(np.exp((a + b) / 2))


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
