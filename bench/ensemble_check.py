"""Would serving two families together pay? Validation only: pairs of checkpoints (say ResNet-9 and VGG of one
seed), each calibrated on its own, their calibrated logits averaged and calibrated again, against each alone.

    .venv/bin/python bench/ensemble_check.py --data cifar4/train,photos-train --outliers outliers-train \\
        RESNET.ckpt VGG.ckpt [RESNET.ckpt VGG.ckpt ...]

Prints, per pair: validation accuracy of the first source (CIFAR), class-balanced validation accuracy of the
last (the photographs), and the energy score's AUROC between the in-scope validation split and the validation
outliers (held-out classes). No test split and no development set is read. Serving the pair costs the two
nets' time together (bench/serve_load.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_budget import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="pairs: first family, second family, ...")
    parser.add_argument("--data", required=True, help="the runs' training sources, comma-separated")
    parser.add_argument("--outliers", required=True, help="the runs' outlier folder")
    args = parser.parse_args()
    if len(args.checkpoints) % 2:
        parser.error("give the checkpoints in pairs")
    from pipeline.calibration import fit_temperature
    from pipeline.config import resolve_config
    from pipeline.data import ImageFolderDataModule
    from pipeline.evaluation import auroc
    from pipeline.module import LitClassifier
    from pipeline.scope import outputs

    config = resolve_config("resnet", "cpu")
    data = ",".join(str(Path(p).resolve()) for p in args.data.split(","))
    dm = ImageFolderDataModule(data, replace(config.data, outliers=[str(Path(args.outliers).resolve())]))
    dm.prepare()
    labels, ids = dm.val_labels.numpy(), dm.val_source.numpy()
    last = ids.max()

    def energy(z: np.ndarray) -> np.ndarray:
        top = z.max(1)
        return -(top + np.log(np.exp(z - top[:, None]).sum(1)))

    def line(name: str, z: np.ndarray, out: np.ndarray) -> str:
        t = fit_temperature(z, labels, groups=ids)
        pred = (z / t).argmax(1)
        first = np.mean(pred[ids == 0] == labels[ids == 0])
        balanced = np.mean([np.mean(pred[(ids == last) & (labels == c)] == c)
                            for c in np.unique(labels[ids == last])])
        return (f"  {name:9s} {dm.source_names[0]} val acc {first:.4f}, {dm.source_names[-1]} val balanced acc "
                f"{balanced:.4f}, energy AUROC vs val outliers {auroc(energy(z / t), energy(out / t)):.4f}")

    for a, b in zip(args.checkpoints[::2], args.checkpoints[1::2]):
        calibrated, names = [], []
        for ckpt in (a, b):
            lit = LitClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
            model = lit.model.eval().float()
            z, out = outputs(model, dm.val_images.cpu()).logits, outputs(model, dm.outlier_val.cpu()).logits
            t = fit_temperature(z, labels, groups=ids)
            calibrated.append((z / t, out / t))
            names.append(lit.hparams.arch)
        print(f"{names[0]} {a.parent.name[:8]} + {names[1]} {b.parent.name[:8]}:")
        for name, (z, out) in zip(names, calibrated):
            print(line(name, z, out))
        print(line("together", (calibrated[0][0] + calibrated[1][0]) / 2, (calibrated[0][1] + calibrated[1][1]) / 2),
              flush=True)
    print(machine())


if __name__ == "__main__":
    main()
