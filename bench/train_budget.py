"""The CPU budget: `pipeline train` on a data folder, timed per family, with accuracies.

    .venv/bin/python bench/train_budget.py --data ../shared/data/cifar4/train      # trains (about 30 min on 2 cores)
    .venv/bin/python bench/train_budget.py --report mlflow.db                      # report runs already logged

Prints a table: family, architecture, parameters, epochs, wall time, best validation
accuracy, the champion, and the machine and versions. Targets (issue 2): all three
families in <= 30 minutes on 2 cores; champion val acc >= 0.88; LeNet >= 0.65.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table


def report(db: Path, experiment: str, wall: float | None) -> None:
    import lightning
    import torch

    client = MlflowClient(f"sqlite:///{db.resolve()}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    try:
        champion = client.get_model_version_by_alias("cifar4-classifier", "champion").run_id
    except Exception:
        champion = None
    table = Table(title=f"CPU budget: {db}")
    for column in ("family", "model", "params", "epochs", "minutes", "s/epoch", "best val acc", ""):
        table.add_column(column, justify="left" if column in ("family", "model", "") else "right")
    total = 0.0
    for run in runs:
        p = run.data.params
        minutes = (run.info.end_time - run.info.start_time) / 60000
        total += minutes
        epochs = int(p.get("trainer.max_epochs", 0))
        args = " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(p.items()) if k.startswith("model.args."))
        table.add_row(run.data.tags.get("family"), f"{p.get('model.arch')} {args}", f"{int(p['n_parameters']):,}",
                      str(epochs), f"{minutes:.1f}", f"{minutes * 60 / max(epochs, 1):.1f}",
                      f"{run.data.metrics.get('best_val_acc', float('nan')):.4f}",
                      "champion" if run.info.run_id == champion else "")
    console = Console(width=130)
    console.print(table)
    console.print(f"sum of run times {total:.1f} min" + (f"; wall time of `pipeline train` {wall / 60:.1f} min" if wall else ""))
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
                  f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="train on this folder in a fresh temporary project, then report")
    parser.add_argument("--report", type=Path, help="report the runs of an existing mlflow.db")
    parser.add_argument("--experiment", default="cifar4")
    args = parser.parse_args()
    if args.report:
        report(args.report, args.experiment, None)
        return
    if not args.data:
        parser.error("give --data DIR or --report mlflow.db")
    home = Path(tempfile.mkdtemp(prefix="budget-"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "train", "--data", args.data, "--profile", "cpu"],
                   check=True, cwd=home, env={**os.environ, "PIPELINE_HOME": str(home)})
    report(home / "mlflow.db", args.experiment, time.perf_counter() - started)


if __name__ == "__main__":
    main()
