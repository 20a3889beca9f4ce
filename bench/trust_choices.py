"""Trust choices, read from trained checkpoints on the validation split only (no test split, no development
set): which out-of-scope score, whether the temperature weighs sources equally, and whether it follows the
confidence.

    .venv/bin/python bench/trust_choices.py --data cifar4/train,photos-train --outliers outliers-train CKPT [CKPT ...]
    .venv/bin/python bench/trust_choices.py --data cifar4/train CKPT [CKPT ...]     # no outliers: temperature only

For each checkpoint (a Lightning ``last.ckpt`` of ``pipeline train`` on those sources; the splits are
drawn again from the same seeds):

* **score**: AUROC of energy, kNN distance, their maximum in validation standard deviations (``combined``),
  their sum, and ``combined`` with the energy of logits calibrated by confidence (calibration.by_confidence),
  between the in-scope validation split (pooled and per source) and the validation half of the held-out
  outlier classes, and the share of those outliers flagged at the per-source 95% threshold;
* **temperature**: one number fitted pooled, one number fitted on the mean over sources of the NLL
  (``balanced``), and that with a slope on the top logit (``by confidence``, calibration.by_confidence),
  each on a random half of every source's validation images and scored on the other half (``--halvings``
  times): ECE per source and the mean NLL over sources, out of sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_budget import machine  # noqa: E402


def classifier_size(dm) -> int:
    return int(dm.val_images.shape[-1])


def synthetic(size: int, n: int, seed: int = 0):
    """``n`` uint8 images, in turn uniform noise, 4x4 random blocks scaled up, and one flat random colour."""
    import torch

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            x = rng.integers(0, 256, (3, size, size))
        elif kind == 1:
            x = np.kron(rng.integers(0, 256, (3, 4, 4)), np.ones((1, size // 4, size // 4), int))
        else:
            x = np.broadcast_to(rng.integers(0, 256, (3, 1, 1)), (3, size, size))
        images.append(x)
    return torch.from_numpy(np.stack(images).astype(np.uint8))


def choose_score(classifier, config, dm, val, ids: np.ndarray, names: list[str]) -> None:
    """AUROC of each out-of-scope score between the in-scope validation split and the validation outliers."""
    from pipeline.calibration import fit_temperature, fit_temperature_by_confidence
    from pipeline.evaluation import auroc
    import torch

    from pipeline.scope import bank_rows, knn_scores, outputs, threshold_for

    out = outputs(classifier, dm.outlier_val.cpu())
    labels = dm.val_labels.numpy()
    temperature = fit_temperature(val.logits, labels, groups=ids)
    bank = outputs(classifier, dm.train_images[bank_rows(len(dm.train_labels), config.out_of_scope.bank_size,
                                                         config.seed)].cpu()).features.numpy()

    shaped = fit_temperature_by_confidence(val.logits, labels, groups=ids)

    def energy(o, calibrated=None):
        z = o.logits / temperature if calibrated is None else calibrated
        top = z.max(1)
        return -(top + np.log(np.exp(z - top[:, None]).sum(1)))

    size, k = config.out_of_scope.bank_size, config.out_of_scope.k
    # the same bank size, an equal share from every source (photographs are a quarter of a random bank)
    by_source = torch.cat([members[bank_rows(len(members), size // len(names), config.seed)]
                           for members in (torch.nonzero(dm.train_source.cpu() == s).flatten() for s in range(len(names)))])
    even = outputs(classifier, dm.train_images[by_source].cpu()).features.numpy()
    # the outliers trained on (never the held-out classes): how much nearer an image is to them than to the bank
    trained_out = outputs(classifier, dm.outlier_train[bank_rows(len(dm.outlier_train), size, config.seed)].cpu())
    outlier_bank = trained_out.features.numpy()

    def distance(o, rows=bank):
        return knn_scores(rows, o.features.numpy(), k)

    def relative(o, rows=bank):
        return distance(o, rows) - distance(o, outlier_bank)

    synth = outputs(classifier, synthetic(classifier_size(dm), 600))
    ev, eo, kv, ko = energy(val), energy(out), distance(val), distance(out)
    sv, so = energy(val, val.calibrated(shaped)), energy(out, out.calibrated(shaped))
    bv, bo, rv, ro = distance(val, even), distance(out, even), relative(val), relative(out)
    qv, qo = relative(val, even), relative(out, even)
    z = lambda x, ref: (x - ref.mean()) / ref.std()  # noqa: E731
    hotter = {t: (energy(val, val.logits / temperature / t), energy(out, out.logits / temperature / t)) for t in (2, 5)}
    ez = lambda e: z(e, ev)  # noqa: E731
    kz = lambda k: z(k, kv)  # noqa: E731
    sz = lambda e: z(e, sv)  # noqa: E731
    for name, (inside, outside) in {"energy": (ev, eo), "knn": (kv, ko),
                                    "combined": (np.maximum(ez(ev), kz(kv)), np.maximum(ez(eo), kz(ko))),
                                    "sum": (ez(ev) + kz(kv), ez(eo) + kz(ko)),
                                    # the energy of logits calibrated by confidence (calibration.by_confidence)
                                    "combined, T by confidence": (np.maximum(sz(sv), kz(kv)),
                                                                  np.maximum(sz(so), kz(ko))),
                                    "knn, bank even by source": (bv, bo),
                                    "combined, bank even": (np.maximum(ez(ev), z(bv, bv)),
                                                            np.maximum(ez(eo), z(bo, bv))),
                                    "knn - outlier knn": (rv, ro),
                                    "combined, minus outlier knn": (np.maximum(ez(ev), z(rv, rv)),
                                                                    np.maximum(ez(eo), z(ro, rv))),
                                    "knn even - outlier knn": (qv, qo),
                                    "combined, even, minus outlier": (np.maximum(ez(ev), z(qv, qv)),
                                                                      np.maximum(ez(eo), z(qo, qv))),
                                    # energy, with the kNN distance only as a guard for inputs far from every
                                    # image (noise), `margin` validation standard deviations further out
                                    **{f"combined, knn margin {m}": (np.maximum(ez(ev), kz(kv) - m),
                                                                     np.maximum(ez(eo), kz(ko) - m))
                                       for m in (1, 2, 3, 4)},
                                    # energy at a higher temperature than the calibrated one (z-scored, so the
                                    # factor T_e in front of T_e x logsumexp(z / T_e) drops out)
                                    **{f"combined, energy T x{t}, knn margin 1": (
                                        np.maximum(z(hv, hv), kz(kv) - 1), np.maximum(z(ho, hv), kz(ko) - 1))
                                       for t, (hv, ho) in hotter.items()}}.items():
        threshold = threshold_for(inside, 0.95, ids)
        per = " ".join(f"{n} {auroc(inside[ids == i], outside):.3f}" for i, n in enumerate(names))
        # synthetic inputs no photograph resembles: energy alone passes them (docs/trust.md)
        es, ks = ez(energy(synth)), kz(distance(synth))
        margin = float(name.rsplit(" ", 1)[1]) if "margin" in name else 0.0
        noise = {"energy": es, "knn": ks, "combined": np.maximum(es, ks)}.get(
            name, np.maximum(es, ks - margin) if "margin" in name and "energy T" not in name else None)
        flags = "" if noise is None else " noise/blocks/flat flagged " + "/".join(
            f"{np.mean(noise[i::3] > threshold):.2f}" for i in range(3))
        print(f"  score {name:25s} AUROC {auroc(inside, outside):.3f} ({per}), outliers flagged "
              f"{np.mean(outside > threshold):.3f}{flags}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", required=True, help="the run's training sources, comma-separated")
    parser.add_argument("--outliers", help="the run's outlier folder (without: the temperature choice only)")
    parser.add_argument("--halvings", type=int, default=20)
    args = parser.parse_args()
    from dataclasses import replace

    from pipeline.calibration import calibration_scores, fit_temperature, fit_temperature_by_confidence
    from pipeline.config import resolve_config
    from pipeline.data import ImageFolderDataModule
    from pipeline.module import LitClassifier
    from pipeline.scope import outputs

    data = ",".join(str(Path(p).resolve()) for p in args.data.split(","))
    modules: dict = {}
    totals: dict[str, list] = {"pooled": [], "balanced": [], "by confidence": []}
    for ckpt in args.checkpoints:
        lit = LitClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        config = resolve_config(lit.hparams.arch, "cpu")
        settings = replace(config.data, outliers=[str(Path(args.outliers).resolve())] if args.outliers else [])
        key = (settings.image_size, settings.seed, settings.test_seed)
        if key not in modules:
            modules[key] = ImageFolderDataModule(data, settings)
            modules[key].prepare()
        dm = modules[key]
        classifier = lit.model.eval().float()
        val = outputs(classifier, dm.val_images.cpu())
        labels, ids = dm.val_labels.numpy(), dm.val_source.numpy()
        names = dm.source_names
        print(f"{lit.hparams.arch} {ckpt.parent.name[:8]}: {len(labels)} validation images"
              + (f", {len(dm.outlier_val)} validation outliers (held-out classes)" if args.outliers else ""))

        if args.outliers:
            choose_score(classifier, config, dm, val, ids, names)
        rng = np.random.default_rng(0)
        found: dict[str, list] = {name: [] for name in totals}
        for _ in range(args.halvings):
            fit = np.zeros(len(labels), bool)
            for s in np.unique(ids):
                members = np.flatnonzero(ids == s)
                fit[rng.choice(members, len(members) // 2, replace=False)] = True
            for name in found:
                groups = None if name == "pooled" else ids[fit]
                if name == "by confidence":
                    t = fit_temperature_by_confidence(val.logits[fit], labels[fit], groups=groups)
                else:
                    t = fit_temperature(val.logits[fit], labels[fit], groups=groups)
                p = val.probabilities(t)
                per = [calibration_scores(p[~fit & (ids == s)], labels[~fit & (ids == s)]) for s in np.unique(ids)]
                found[name].append([c["ece"] for c in per] + [float(np.mean([c["nll"] for c in per])),
                                                              getattr(t, "base", t), getattr(t, "slope", 0.0)])
        for name, rows in found.items():
            m = np.mean(rows, axis=0)
            totals[name].append(m)
            eces = " ".join(f"{n} {e:.4f}" for n, e in zip(names, m[:-3]))
            print(f"  temperature {name:13s} T {m[-2]:.3f} slope {m[-1]:+.3f}, out-of-sample ECE {eces}, "
                  f"mean NLL {m[-3]:.4f}")
    if len(args.checkpoints) > 1:
        for name, rows in totals.items():
            m = np.mean(rows, axis=0)
            print(f"all checkpoints, temperature {name}: ECE {' '.join(f'{e:.4f}' for e in m[:-3])}, "
                  f"mean NLL {m[-3]:.4f}")
    print(machine())


if __name__ == "__main__":
    main()
