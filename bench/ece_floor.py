"""What ECE can show at a split's size, and where a checkpoint's confidence is off, on the validation split only.

    .venv/bin/python bench/ece_floor.py --data cifar4/train,photos-train CKPT [--sizes 340,750,2000]

For each training source: the reliability bins (10 equal-width bins of the top probability: images, mean
confidence, accuracy) after the one-number source-balanced temperature, and the ECE that a *perfectly*
calibrated model with the same confidences would read on N images (labels drawn from its own
probabilities, ``--draws`` times): the floor below which a measured ECE says nothing. docs/trust.md's fourth
measurement quotes both.
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
    parser.add_argument("--sizes", default="340,750,2000", help="split sizes to give the floor for")
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()
    from dataclasses import replace

    from pipeline.calibration import calibration_scores, fit_temperature, reliability
    from pipeline.config import resolve_config
    from pipeline.data import ImageFolderDataModule
    from pipeline.module import LitClassifier
    from pipeline.scope import outputs

    data = ",".join(str(Path(p).resolve()) for p in args.data.split(","))
    sizes = [int(n) for n in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    for ckpt in args.checkpoints:
        lit = LitClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        config = resolve_config(lit.hparams.arch, "cpu")
        dm = ImageFolderDataModule(data, replace(config.data, outliers=[]))
        dm.prepare()
        val = outputs(lit.model.eval().float(), dm.val_images.cpu())
        labels, ids = dm.val_labels.numpy(), dm.val_source.numpy()
        temperature = fit_temperature(val.logits, labels, groups=ids)
        probabilities = val.probabilities(temperature)
        print(f"{lit.hparams.arch} {ckpt.parent.name[:8]}: balanced T {temperature:.3f}")
        for index, name in enumerate(dm.source_names):
            mine, truth = probabilities[ids == index], labels[ids == index]
            counts, confidence, accuracy = reliability(mine, truth, 10)
            print(f"  {name}: {len(truth)} validation images, ECE {calibration_scores(mine, truth)['ece']:.4f}; bins "
                  + " ".join(f"[{lo / 10:.1f}-{(lo + 1) / 10:.1f}: {int(n)}, {c:.2f} / {a:.2f}]"
                             for lo, (n, c, a) in enumerate(zip(counts, confidence, accuracy)) if n))
            for n in sizes:
                found = []
                for _ in range(args.draws):
                    sample = mine[rng.integers(0, len(mine), n)]
                    drawn = (rng.random((n, 1)) > sample.cumsum(axis=1)).sum(axis=1).clip(0, sample.shape[1] - 1)
                    found.append(calibration_scores(sample, drawn)["ece"])
                print(f"    a perfectly calibrated model with these confidences, {n} images: ECE mean "
                      f"{np.mean(found):.4f}, 90th percentile {np.percentile(found, 90):.4f}")
    print(machine())


if __name__ == "__main__":
    main()
