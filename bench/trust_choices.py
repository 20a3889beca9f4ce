"""Two trust choices, read from trained checkpoints on the validation split only (no test split, no
development set): which out-of-scope score, and whether the temperature should weigh sources equally.

    .venv/bin/python bench/trust_choices.py --data cifar4/train,photos-train --outliers outliers-train CKPT [CKPT ...]

For each checkpoint (a Lightning ``last.ckpt`` of ``pipeline train`` on those sources; the splits are
drawn again from the same seeds):

* **score**: AUROC of energy, kNN distance, their maximum in validation standard deviations (``combined``)
  and their sum, between the in-scope validation split (pooled and per source) and the validation half
  of the held-out outlier classes, and the share of those outliers flagged at the per-source 95% threshold;
* **temperature**: fitted pooled and fitted on the mean over sources of the NLL, each on a random half of
  every source's validation images and scored on the other half (``--halvings`` times): ECE per source and
  the mean NLL over sources, out of sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_budget import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", required=True, help="the run's training sources, comma-separated")
    parser.add_argument("--outliers", required=True, help="the run's outlier folder")
    parser.add_argument("--halvings", type=int, default=20)
    args = parser.parse_args()
    from dataclasses import replace

    from pipeline.calibration import calibration_scores, fit_temperature
    from pipeline.config import resolve_config
    from pipeline.data import ImageFolderDataModule
    from pipeline.evaluation import auroc
    from pipeline.module import LitClassifier
    from pipeline.scope import bank_rows, knn_scores, outputs, threshold_for

    data = ",".join(str(Path(p).resolve()) for p in args.data.split(","))
    modules: dict = {}
    totals: dict[str, list] = {"pooled": [], "balanced": []}
    for ckpt in args.checkpoints:
        lit = LitClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        config = resolve_config(lit.hparams.arch, "cpu")
        settings = replace(config.data, outliers=[str(Path(args.outliers).resolve())])
        key = (settings.image_size, settings.seed, settings.test_seed)
        if key not in modules:
            modules[key] = ImageFolderDataModule(data, settings)
            modules[key].prepare()
        dm = modules[key]
        classifier = lit.model.eval().float()
        val, out = outputs(classifier, dm.val_images.cpu()), outputs(classifier, dm.outlier_val.cpu())
        labels, ids = dm.val_labels.numpy(), dm.val_source.numpy()
        names = dm.source_names
        print(f"{lit.hparams.arch} {ckpt.parent.name[:8]}: {len(labels)} validation images, {len(out.logits)} "
              f"validation outliers (held-out classes)")

        temperature = fit_temperature(val.logits, labels, groups=ids)
        bank = outputs(classifier, dm.train_images[bank_rows(len(dm.train_labels), config.out_of_scope.bank_size,
                                                             config.seed)].cpu()).features.numpy()

        def energy(o):
            z = o.logits / temperature
            top = z.max(1)
            return -(top + np.log(np.exp(z - top[:, None]).sum(1)))

        def distance(o):
            return knn_scores(bank, o.features.numpy(), config.out_of_scope.k)

        ev, eo, kv, ko = energy(val), energy(out), distance(val), distance(out)
        ez = lambda e: (e - ev.mean()) / ev.std()  # noqa: E731
        kz = lambda k: (k - kv.mean()) / kv.std()  # noqa: E731
        for name, (inside, outside) in {"energy": (ev, eo), "knn": (kv, ko),
                                        "combined": (np.maximum(ez(ev), kz(kv)), np.maximum(ez(eo), kz(ko))),
                                        "sum": (ez(ev) + kz(kv), ez(eo) + kz(ko))}.items():
            threshold = threshold_for(inside, 0.95, ids)
            per = " ".join(f"{n} {auroc(inside[ids == i], outside):.3f}" for i, n in enumerate(names))
            print(f"  score {name:9s} AUROC {auroc(inside, outside):.3f} ({per}), outliers flagged "
                  f"{np.mean(outside > threshold):.3f}")

        rng = np.random.default_rng(0)
        found: dict[str, list] = {"pooled": [], "balanced": []}
        for _ in range(args.halvings):
            fit = np.zeros(len(labels), bool)
            for s in np.unique(ids):
                members = np.flatnonzero(ids == s)
                fit[rng.choice(members, len(members) // 2, replace=False)] = True
            for name, groups in (("pooled", None), ("balanced", ids[fit])):
                t = fit_temperature(val.logits[fit], labels[fit], groups=groups)
                p = val.probabilities(t)
                per = [calibration_scores(p[~fit & (ids == s)], labels[~fit & (ids == s)]) for s in np.unique(ids)]
                found[name].append([c["ece"] for c in per] + [float(np.mean([c["nll"] for c in per])), t])
        for name, rows in found.items():
            m = np.mean(rows, axis=0)
            totals[name].append(m)
            eces = " ".join(f"{n} {e:.4f}" for n, e in zip(names, m[:-2]))
            print(f"  temperature {name:8s} T {m[-1]:.3f}, out-of-sample ECE {eces}, mean NLL {m[-2]:.4f}")
    if len(args.checkpoints) > 1:
        for name, rows in totals.items():
            m = np.mean(rows, axis=0)
            print(f"all checkpoints, temperature {name}: ECE {' '.join(f'{e:.4f}' for e in m[:-2])}, "
                  f"mean NLL {m[-2]:.4f}")
    print(machine())


if __name__ == "__main__":
    main()
