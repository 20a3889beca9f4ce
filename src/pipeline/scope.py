"""The out-of-scope signal: a score per image, higher meaning further from what the net was trained on.

Three scores, chosen with ``out_of_scope.score`` (docs/trust.md has the measurements behind the default):

- ``energy`` (Liu et al. 2020): minus the log-sum-exp of the calibrated logits. An image that excites
  none of the classes' evidence much has a high energy. Free, but blind to inputs far from every
  image (noise): ReLU/GELU nets give those huge logits, so a low energy.
- ``knn``: 1 - the cosine similarity to the k-th nearest of a bank of training images' penultimate
  features (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"). The bank
  sits in ``model.onnx`` as a constant.
- ``combined`` (the default): the larger of the two, each in standard deviations from its mean on the
  validation split (those four numbers are in the graph too), the distance's less ``knn_margin``.

Either way the score is an output of ``model.onnx``, so the service, ``pipeline predict`` and
``pipeline evaluate`` all get it from the graph and stay torch-free. The threshold keeps ``keep``
(95%) of the validation split in scope; it is stored in ``classifier.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.calibration import Temperature


SCORES = ("combined", "energy", "knn")


class EnergyScore(nn.Module):
    """``(N, classes)`` calibrated logits -> ``(N,)`` scores: minus their log-sum-exp."""

    name = "energy"

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(logits, dim=1)


class NearestNeighbourScore(nn.Module):
    """``(N, D)`` features -> ``(N,)`` out-of-scope scores: 1 - cosine similarity to the k-th nearest bank row."""

    name = "knn"

    def __init__(self, bank: torch.Tensor, k: int) -> None:
        super().__init__()
        if not 1 <= k <= len(bank):
            raise ValueError(f"out_of_scope.k must be between 1 and the bank size {len(bank)}, got {k}")
        self.k = int(k)
        self.register_buffer("bank", nn.functional.normalize(bank.float(), dim=1))

    def forward(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        similarity = nn.functional.normalize(features, dim=1) @ self.bank.T
        return 1.0 - torch.topk(similarity, self.k, dim=1).values[:, -1]


class CombinedScore(nn.Module):
    """max((energy - mean) / std, (knn - mean) / std - margin), with the means and stds of the validation split.

    ``margin`` (``out_of_scope.knn_margin``) lets energy rank the images that look like photographs and keeps
    the distance as a guard for inputs far from every training image (noise), which energy may pass.
    """

    name = "combined"

    def __init__(self, knn: NearestNeighbourScore, energy_stats: tuple[float, float],
                 knn_stats: tuple[float, float], margin: float = 0.0) -> None:
        super().__init__()
        self.knn, self.energy, self.margin = knn, EnergyScore(), float(margin)
        self.register_buffer("stats", torch.tensor([*energy_stats, *knn_stats], dtype=torch.float32))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        energy = (self.energy(features, logits) - self.stats[0]) / self.stats[1]
        distance = (self.knn(features) - self.stats[2]) / self.stats[3] - self.margin
        return torch.maximum(energy, distance)


def score_tolerance(scorer: nn.Module | None, raw: float = 1e-4) -> float:
    """How far model.onnx's scores may drift from torch's: ``raw`` in the raw units (energy, cosine distance).
    The combined score divides by validation standard deviations, which scales float32 rounding up by as
    much (a toy run's kNN spread of 1e-3 turned 1e-7 into 1.4e-4)."""
    stats = getattr(scorer, "stats", None)
    return raw if stats is None else raw / min(1.0, float(stats[1]), float(stats[3]))


class Deployed(nn.Module):
    """What model.onnx computes: calibrated probabilities and, with a scorer, the out-of-scope score."""

    def __init__(self, classifier: nn.Module, scorer: nn.Module | None = None) -> None:
        super().__init__()
        self.classifier, self.scorer = classifier, scorer

    def forward(self, images: torch.Tensor):
        if self.scorer is None:
            return self.classifier.probabilities(images)
        features, logits = self.classifier.features_and_logits(images)
        calibrated = self.classifier.calibrate(logits)
        return torch.softmax(calibrated, dim=-1), self.scorer(features, calibrated)


@dataclass
class Outputs:
    """TTA-averaged logits and penultimate features of one image set."""

    logits: np.ndarray
    features: torch.Tensor

    def calibrated(self, temperature: Temperature | float = 1.0) -> np.ndarray:
        """The logits divided by their temperature (one number, or a fitted :class:`Temperature`)."""
        if isinstance(temperature, Temperature):
            return temperature.apply(self.logits)
        return self.logits / temperature

    def probabilities(self, temperature: Temperature | float = 1.0) -> np.ndarray:
        z = self.calibrated(temperature)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@torch.inference_mode()
def outputs(classifier: nn.Module, images_uint8: torch.Tensor, chunk: int = 512) -> Outputs:
    """TTA-averaged logits and penultimate features of uint8 images, as the exported graph computes them."""
    classifier = classifier.eval()
    logits, feats = [], []
    for start in range(0, len(images_uint8), chunk):
        f, z = classifier.features_and_logits(images_uint8[start : start + chunk].float() / 255)
        logits.append(z.double().numpy())
        feats.append(f)
    return Outputs(np.concatenate(logits), torch.cat(feats))


def features(classifier: nn.Module, images_uint8: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Penultimate features (TTA-averaged, as the exported graph computes them) of uint8 images."""
    return outputs(classifier, images_uint8, chunk).features


def bank_rows(n: int, size: int, seed: int) -> torch.Tensor:
    """Which training images go into the bank: all when there are at most ``size``, else a seeded sample."""
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def knn_scores(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """numpy twin of :class:`NearestNeighbourScore`, for trying settings on saved features."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-12)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    similarity = queries @ bank.T
    return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]


def threshold_for(scores: np.ndarray, keep: float, sources: np.ndarray | None = None) -> float:
    """The score below which ``keep`` of these (in-scope validation) images fall, in every source.

    With ``sources`` (which training source each image came from), the largest of the per-source
    quantiles: a pooled quantile is set by the biggest source (CIFAR), and kept 97% of CIFAR but only
    89% of photographs in the first run with both (docs/trust.md).
    """
    scores = np.asarray(scores, np.float64)
    if sources is None:
        return float(np.quantile(scores, keep))
    sources = np.asarray(sources)
    return max(float(np.quantile(scores[sources == s], keep)) for s in np.unique(sources))
