"""Publish trained checkpoints again under two calibration settings, side by side: what a calibration change
does to the figures a run logs (accuracy, ECE and flagged share per source, held-out outlier AUROC, and
the evaluation folders), without training again.

    .venv/bin/python bench/recalibrate.py --data cifar4/train,photos-train --outliers outliers-train \\
        --eval photos-dev=../shared/data/photos-dev,other-dev=../shared/data/other-dev \\
        --set calibration.by_confidence=never --set calibration.by_confidence=auto CKPT [CKPT ...]

Each ``--set`` is one setting (several keys: separate them with ``;``; give the run's ``seed=S`` too, which
draws the kNN bank). It runs ``pipeline.trust``'s
``make_trustworthy`` (what publishing runs) on each checkpoint's ``last.ckpt`` weights, with the splits drawn
again from the same seeds. It reads the test splits and the evaluation folders: run it once per adopted
change, and make the choice itself on validation (``bench/trust_choices.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_budget import machine  # noqa: E402

KEYS = [("test acc", "source/{s0}/test_acc"), ("test ECE", "source/{s0}/test_ece"),
        ("photo test bal", "source/{s1}/test_balanced_acc"), ("photo test ECE", "source/{s1}/test_ece"),
        ("photo kept", "source/{s1}/test_out_of_scope_rate"), ("CIFAR kept", "source/{s0}/test_out_of_scope_rate"),
        ("outlier AUROC", "outliers/test/auroc"), ("outlier AUROC CIFAR", "source/{s0}/test_outlier_auroc"),
        ("outlier AUROC photo", "source/{s1}/test_outlier_auroc"), ("outliers flagged", "outliers/test/flagged"),
        ("photos-dev bal", "eval/photos-dev/balanced_acc"), ("photos-dev ECE", "eval/photos-dev/ece"),
        ("photos-dev kept", "eval/photos-dev/out_of_scope_rate"), ("other-dev AUROC", "eval/other-dev/auroc_vs_photos-dev"),
        ("other-dev flagged", "eval/other-dev/out_of_scope_rate"),
        ("val NLL", "val_nll"), ("slope", "temperature_slope")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", required=True, help="the run's training sources, comma-separated")
    parser.add_argument("--outliers", help="the run's outlier folder")
    parser.add_argument("--eval", default="", help="NAME=FOLDER,... scored as evaluation folders")
    parser.add_argument("--set", action="append", required=True, dest="settings",
                        help="one setting: KEY=VALUE[;KEY=VALUE]; give two or more")
    args = parser.parse_args()
    from dataclasses import replace

    from pipeline.config import resolve_config
    from pipeline.data import ImageFolderDataModule
    from pipeline.module import LitClassifier
    from pipeline.trust import make_trustworthy

    data = ",".join(str(Path(p).resolve()) for p in args.data.split(","))
    folders = dict(item.split("=", 1) for item in args.eval.split(",") if item)
    modules: dict = {}
    table: dict[str, list[list[float]]] = {setting: [] for setting in args.settings}
    for ckpt in args.checkpoints:
        lit = LitClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        for setting in args.settings:
            config = resolve_config(lit.hparams.arch, "cpu", [s for s in setting.split(";") if s])
            config = replace(config, data=replace(config.data, outliers=[str(Path(args.outliers).resolve())]
                                                  if args.outliers else []),
                             evaluation=replace(config.evaluation, folders=folders))
            key = (config.data.seed, config.data.test_seed, tuple(config.data.outliers))
            if key not in modules:
                modules[key] = ImageFolderDataModule(data, config.data)
                modules[key].prepare()
            dm = modules[key]
            names = dm.source_names
            _, report = make_trustworthy(config, lit.model.eval().float(), dm)
            m = report.metrics
            row = []
            for label, pattern in KEYS:
                value = m.get(pattern.format(s0=names[0], s1=names[-1]), float("nan"))
                row.append(1 - value if label.endswith("kept") else value)
            table[setting].append(row)
            print(f"{lit.hparams.arch} {ckpt.parent.name[:8]} {setting}: "
                  + ", ".join(f"{label} {value:.4f}" for (label, _), value in zip(KEYS, row)), flush=True)
    print("\nmean over the checkpoints (kept = share of in-scope images below the threshold)")
    print("| setting | " + " | ".join(label for label, _ in KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for setting, rows in table.items():
        print(f"| {setting} | " + " | ".join(f"{v:.4f}" for v in np.nanmean(rows, axis=0)) + " |")
    print(machine())


if __name__ == "__main__":
    main()
