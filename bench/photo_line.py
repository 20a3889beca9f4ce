"""Accuracy on the line: how real-photo accuracy follows CIFAR-style accuracy across runs.

    .venv/bin/python bench/photo_line.py mlflow.db [more/mlflow.db ...] [--folder photos-dev] [--target 0.80]

Reads every finished training run that scored an evaluation folder (``evaluation.folders.<name>``),
and fits ``probit(folder balanced accuracy) = a + b * probit(validation accuracy)`` by least squares
over the runs (Taori et al. 2020, Miller et al. 2021: across models trained on one data set, accuracy
under a natural distribution shift lies close to such a line). Prints the runs, the line, how far each
run sits from it, and the validation accuracy at which the line reaches ``--target``.

It reads the validation split only (never the test split), so it can be run after every try.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import NormalDist

import numpy as np
from mlflow.tracking import MlflowClient

PROBIT, PHI = NormalDist().inv_cdf, NormalDist().cdf


def runs(db: Path, folder: str) -> list[dict]:
    client = MlflowClient(f"sqlite:///{db.resolve()}")
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
            metrics = run.data.metrics
            key = f"eval/{folder}/balanced_acc"
            if key not in metrics or "best_val_acc" not in metrics:
                continue
            out.append({"db": str(db), "family": run.data.tags.get("family", "?"),
                        "seed": run.data.params.get("seed", "?"),
                        "epochs": run.data.params.get("trainer.max_epochs", "?"),
                        "val": metrics["best_val_acc"], "folder": metrics[key]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dbs", nargs="+", type=Path, help="mlflow.db files")
    parser.add_argument("--folder", default="photos-dev", help="the labelled evaluation folder's name")
    parser.add_argument("--target", type=float, default=0.80, help="folder balanced accuracy to solve for")
    args = parser.parse_args()
    found = [row for db in args.dbs for row in runs(db, args.folder)]
    if len(found) < 3:
        raise SystemExit(f"{len(found)} run(s) scored {args.folder!r}; the line needs at least 3.")
    x = np.array([PROBIT(r["val"]) for r in found])
    y = np.array([PROBIT(r["folder"]) for r in found])
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    r = float(np.corrcoef(x, y)[0, 1])
    print(f"{'family':8} {'seed':>5} {'epochs':>6} {'val acc':>8} {args.folder + ' bal':>16} {'line':>6} {'off':>6}")
    for row, res, xi in sorted(zip(found, residual, x), key=lambda t: t[0]["val"]):
        print(f"{row['family']:8} {row['seed']:>5} {row['epochs']:>6} {row['val']:8.4f} {row['folder']:16.3f} "
              f"{PHI(a + b * xi):6.3f} {PHI(a + b * xi + res) - PHI(a + b * xi):+6.3f}")
    needed = (PROBIT(args.target) - a) / b
    print(f"\nline over {len(found)} runs: probit({args.folder}) = {a:.3f} + {b:.3f} * probit(val acc), r = {r:.3f}, "
          f"residual sd {residual.std(ddof=2):.3f} (probit units)")
    print(f"{args.folder} balanced accuracy {args.target:.2f} lies on the line at validation accuracy "
          f"{PHI(needed):.4f}")


if __name__ == "__main__":
    main()
