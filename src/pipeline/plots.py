"""PNG figures logged with every run: confusion matrix and learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
    matrix = np.asarray(matrix)
    fraction = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5), dpi=100)
    ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{matrix[i, j]}\n{fraction[i, j]:.0%}", ha="center", va="center",
                    color="white" if fraction[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title or "confusion matrix (rows: true class)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_learning_curves(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """``history`` maps metric names (``train/loss``, ``val/acc``, ...) to one value per epoch."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for name, values in sorted(history.items()):
        if not values:
            continue
        epochs = range(1, len(values) + 1)
        if name.endswith("/loss"):
            loss_ax.plot(epochs, values, marker=".", label=name)
        elif name.endswith("/acc"):
            acc_ax.plot(epochs, values, marker=".", label=name)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_mistakes(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                  path: Path, limit: int = 16, title: str = "") -> Path:
    """The ``limit`` most confident mistakes: uint8 ``(N, 3, H, W)`` images with true and predicted labels."""
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    cols = 4 if len(order) > 1 else 1
    rows = max(1, -(-len(order) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows + 0.4), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        ax.imshow(images[i].transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(f"true {classes[labels[i]]}\npredicted {classes[predicted[i]]} {confidence[i]:.2f}",
                     fontsize=9, color="#8a1c12")
    if not len(order):
        axes.flat[0].text(0.5, 0.5, f"no mistakes on {len(labels)} images", ha="center", va="center")
    fig.suptitle(title or f"most confident mistakes ({len(wrong)} of {len(labels)} wrong)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, title: str = "",
                     bins: int = 15) -> Path:
    """One panel per split: accuracy against mean top probability in ``bins`` equal-width bins, after
    calibration (bars, with the image count on each) and before (line); the diagonal is perfect."""
    from pipeline.calibration import calibration_scores, reliability

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 5), dpi=100, squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (split, (before, after, labels)) in zip(axes[0], curves.items()):
        counts, _, accuracy = reliability(after, labels, bins)
        b_counts, b_conf, b_acc = reliability(before, labels, bins)
        ax.bar(edges[:-1], np.where(counts > 0, accuracy, 0), width=1 / bins, align="edge", alpha=0.7,
               edgecolor="black", label="calibrated")
        for left, count, acc in zip(edges[:-1], counts, accuracy):
            if count:
                ax.text(left + 0.5 / bins, min(acc, 0.93) + 0.02, f"{int(count)}", ha="center", fontsize=6,
                        rotation=90)
        seen = b_counts > 0
        ax.plot(b_conf[seen], b_acc[seen], "o-", color="tab:red", markersize=3, label="before calibration")
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        ece_before, ece_after = calibration_scores(before, labels)["ece"], calibration_scores(after, labels)["ece"]
        ax.set_title(f"{split}: ECE {ece_before:.3f} -> {ece_after:.3f} ({len(labels):,} images)", fontsize=10)
        ax.set_xlabel("top probability")
        ax.set_ylabel("accuracy (bar labels: images in the bin)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or "reliability")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
