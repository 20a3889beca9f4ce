"""What `make train` buys: its recipes trained on a data folder, timed, and scored on a held-out test split.

    .venv/bin/python bench/train_budget.py --data ../shared/data/cifar4/train      # CPU: 15-25 min on 2 cores
    .venv/bin/python bench/train_budget.py --data DIR --seeds 1,2,3                # each family 3 times: mean and spread
    .venv/bin/python bench/train_budget.py --report mlflow.db                      # runs already logged

The runs go to a fresh temporary project (its own mlflow.db). Without a test/ folder the
data module holds out 10% of the images first (seeded, stratified): no training step,
checkpoint choice or champion choice sees them. Validation is 10% of the rest.

Prints, per family: the net, parameters, epochs, minutes, seconds per epoch, validation and
test accuracy (both with the exported TTA), per-class test accuracy, precision, GPU memory
peak, and which run is the champion; then, per family, the mean and spread (sample standard
deviation, min-max) over the runs (``--seeds`` trains every family once per seed: ``--set seed=S``,
the split stays the same); per training source and evaluation folder, each run's figures, then their
means per family and for each seed's champion (the headline table); then the machine: CPU model,
cores, bf16/AMX, GPU, versions, so that figures from different machines can be read side by side.
``--markdown`` also prints the tables as Markdown, ``--json`` writes them to a file.
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

from pipeline.champion import METRIC as CHAMPION_METRIC

COLUMNS = ("family", "model", "params", "epochs", "minutes", "s/epoch", "val acc", "test acc",
           "test acc per class", "precision", "GPU mem", "")


def machine() -> str:
    import lightning
    import torch

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = ", ".join(name for name in ("avx512_bf16", "amx_bf16") if name in have) or "no bf16 units"
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {cpu} ({flags}), {os.cpu_count()} cores{gpu}; python {platform.python_version()}, "
            f"torch {torch.__version__}, lightning {lightning.__version__}")


def spread(values: list[float], digits: int = 4) -> str:
    """mean +/- sample standard deviation (min-max) of the values; the value alone for one."""
    import statistics

    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.mean(values):.{digits}f} +/- {statistics.stdev(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def summary(found: list[dict]) -> list[dict]:
    """Per family: runs, and mean and spread of val acc, test acc, minutes and seconds per epoch."""
    out = []
    for family in dict.fromkeys(row["family"] for row in found):
        rows = [row for row in found if row["family"] == family]
        numbers = lambda key: [float(r[key]) for r in rows if r[key] not in ("", "no test split", "(not read)")]  # noqa: E731
        out.append({"family": family, "runs": str(len(rows)), "seeds": " ".join(r["seed"] for r in rows),
                    "val acc": spread(numbers("val acc")), "test acc": spread(numbers("test acc")),
                    "minutes": spread(numbers("minutes"), 1), "s/epoch": spread(numbers("s/epoch"), 1)})
    return out


def rows(db: Path, experiment: str) -> list[dict]:
    client = MlflowClient(f"sqlite:///{db.resolve()}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"{db} has no experiment {experiment!r}")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    try:
        champion = client.get_model_version_by_alias("cifar4-classifier", "champion").run_id
    except Exception:
        champion = None
    out = []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        if t.get("kind") == "evaluation":
            continue
        args = " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(p.items()) if k.startswith("model.args."))
        per_class = {k[len("best/test_acc_"):]: v for k, v in m.items() if k.startswith("best/test_acc_")}
        out.append({
            "family": t.get("family", "?"), "model": f"{p.get('model.arch')} {args} tta={p.get('model.tta', 0)}",
            "params": f"{int(p.get('n_parameters', 0)):,}", "epochs": p.get("trainer.max_epochs", "?"),
            "minutes": f"{(run.info.end_time - run.info.start_time) / 60000:.1f}",
            "s/epoch": f"{m['seconds_per_epoch']:.1f}" if "seconds_per_epoch" in m else "",
            "val acc": f"{m.get('best_val_acc', float('nan')):.4f}",
            "test acc": f"{m['test_acc']:.4f}" if "test_acc" in m else "no test split",
            "test acc per class": " ".join(f"{k} {v:.3f}" for k, v in sorted(per_class.items())),
            "precision": t.get("precision", ""),
            "GPU mem": f"{m['gpu_memory_peak_gb']:.2f} GB" if "gpu_memory_peak_gb" in m else "",
            "": "champion" if run.info.run_id == champion else "", "seed": p.get("seed", "?"),
        })
    return out


def report(db: Path, experiment: str, wall: float | None, markdown: bool, title: str,
           json_path: Path | None = None, val_only: bool = False) -> None:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("family", "model", "test acc per class", "") else "right")
    found = rows(db, experiment)
    if val_only:
        for row in found:
            row.update({"test acc": "(not read)", "test acc per class": ""})
    for row in found:
        table.add_row(*[row[c] for c in COLUMNS])
    console = Console(width=200)
    console.print(table)
    total = sum(float(r["minutes"]) for r in found)
    console.print(f"sum of run times {total:.1f} min" + (f"; wall time of `pipeline train` {wall / 60:.1f} min"
                                                          if wall else ""))
    families = summary(found)
    columns = ("family", "runs", "seeds", "val acc", "test acc", "minutes", "s/epoch")
    per_family = Table(title="per family: mean +/- standard deviation (min-max) over the runs")
    for column in columns:
        per_family.add_column(column, justify="left" if column in ("family", "seeds") else "right")
    for row in families:
        per_family.add_row(*[row[c] for c in columns])
    console.print(per_family)
    client = MlflowClient(f"sqlite:///{db.resolve()}")
    exp = client.get_experiment_by_name(experiment)
    finished = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                               order_by=["attributes.start_time ASC"])
                if r.data.tags.get("kind") != "evaluation"]
    console.print(source_table(finished, val_only))
    header, headlines = headline(finished, val_only)
    means = Table(title="the headline figures: mean +/- sd over the runs (kept: the share left in scope at the "
                        "stored threshold)")
    for column in header:
        means.add_column(column, justify="left" if column in ("", "runs") else "right")
    for line in headlines:
        means.add_row(*line)
    console.print(means)
    console.print(machine())
    if json_path is not None:
        import json

        json_path.write_text(json.dumps({"title": title, "machine": machine(), "rows": found, "families": families,
                                         "headline": [dict(zip(header, line)) for line in headlines],
                                         "sum_minutes": total,
                                         "wall_minutes": None if wall is None else wall / 60}, indent=2) + "\n")
    if markdown:
        print("| " + " | ".join(c or "champion" for c in COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row in found:
            print("| " + " | ".join(row[c] for c in COLUMNS) + " |")
        print()
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in families:
            print("| " + " | ".join(row[c] for c in columns) + " |")
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in headlines:
            print("| " + " | ".join(line) + " |")


def headline(found_runs: list, val_only: bool) -> tuple[list[str], list[list[str]]]:
    """The figures a user reads, per family and for the champion of each seed (the run the champion rule,
    ``pipeline.champion.METRIC``, picks among that seed's runs): mean +/- sd over the runs of each training
    source's accuracy (balanced), ECE, share kept in scope and AUROC against the held-out outlier classes;
    those outliers' AUROC against the whole in-scope split and share flagged; each evaluation folder's
    the same; on the test split (validation with ``--val-only``)."""
    import statistics

    split = "val" if val_only else "test"
    sources = sorted({k.split("/")[1] for r in found_runs for k in r.data.metrics if k.startswith("source/")})
    folders = [] if val_only else sorted({k.split("/")[1] for r in found_runs for k in r.data.metrics
                                          if k.startswith("eval/")})

    def labelled(name: str) -> bool:
        return any(f"eval/{name}/balanced_acc" in r.data.metrics for r in found_runs)

    def against(name: str) -> str:
        """An unlabelled folder's AUROC is against a labelled evaluation folder where there is one (other-dev
        against photos-dev: photographs against photographs), else against the in-scope test split."""
        return next((other for other in folders if labelled(other) and any(
            f"eval/{name}/auroc_vs_{other}" in r.data.metrics for r in found_runs)), "test")

    header = ["runs", *(f"{name} {split} acc (balanced) / ECE / kept / AUROC against the {split} outliers"
                        for name in sources),
              f"{split} outliers AUROC / flagged",
              *(f"{name} balanced acc / ECE / kept" if labelled(name) else f"{name} AUROC vs {against(name)} / flagged"
                for name in folders), "minutes"]

    def mean(values: list[float], digits: int = 3, sd: bool = False) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return ""
        text = f"{statistics.mean(values):.{digits}f}"
        return text + (f" +/- {statistics.stdev(values):.{digits}f}" if sd and len(values) > 1 else "")

    def kept(rates: list) -> str:
        """The share left in scope, in percent, from the share flagged."""
        return mean([None if v is None else 100 * (1 - v) for v in rates], 1) + "%"

    def row(runs: list) -> list[str]:
        ms = [r.data.metrics for r in runs]
        cells = [" ".join(f"{r.data.tags.get('family', '?')}/{r.data.params.get('seed', '?')}" for r in runs)]
        for name in sources:
            get = lambda key: [m.get(f"source/{name}/{split}_{key}") for m in ms]  # noqa: E731
            cells.append(f"{mean(get('acc'), sd=True)} ({mean(get('balanced_acc'), sd=True)}) / {mean(get('ece'))} / "
                         f"{kept(get('out_of_scope_rate'))}"
                         + (f" / {mean(get('outlier_auroc'))}" if any(get("outlier_auroc")) else ""))
        auroc = mean([m.get(f"outliers/{split}/auroc") for m in ms])
        cells.append(f"{auroc} / {mean([m.get(f'outliers/{split}/flagged') for m in ms])}" if auroc else "")
        for name in folders:
            get = lambda key: [m.get(f"eval/{name}/{key}") for m in ms]  # noqa: E731
            if labelled(name):
                cells.append(f"{mean(get('balanced_acc'), sd=True)} / {mean(get('ece'))} / "
                             f"{kept(get('out_of_scope_rate'))}")
            else:
                cells.append(f"{mean(get(f'auroc_vs_{against(name)}'))} / {mean(get('out_of_scope_rate'))}")
        cells.append(mean([(r.info.end_time - r.info.start_time) / 60000 for r in runs], 1))
        return cells

    seeds = dict.fromkeys(r.data.params.get("seed", "?") for r in found_runs)
    champions = [max((r for r in found_runs if r.data.params.get("seed", "?") == seed),
                     key=lambda r: r.data.metrics.get(CHAMPION_METRIC, float("-inf"))) for seed in seeds]
    rows = [["champion of each seed", *row(champions)]]
    for family in dict.fromkeys(r.data.tags.get("family", "?") for r in found_runs):
        rows.append([family, *row([r for r in found_runs if r.data.tags.get("family", "?") == family])])
    return ["", *header], rows


def absolute(part: str) -> str:
    """A --data entry with its folder made absolute (the runs start in another folder); ``:weight`` kept."""
    head, _, tail = part.rpartition(":")
    try:
        float(tail)
        return f"{Path(head).resolve()}:{tail}" if head else str(Path(part).resolve())
    except ValueError:
        return str(Path(part).resolve())


def source_table(found_runs: list, val_only: bool) -> Table:
    """Per run and training source: accuracy, balanced accuracy, ECE and the share flagged, on validation (and
    test); the held-out outlier classes' AUROC; every evaluation folder's balanced accuracy or flagged share."""
    splits = ("val",) if val_only else ("val", "test")
    table = Table(title="per source" + (" (validation only)" if val_only else ""))
    for column in ("family", "seed", "source", *(f"{s} {k}" for s in splits for k in ("acc", "bal", "ECE", "flagged"))):
        table.add_column(column, justify="left" if column in ("family", "source") else "right")
    for run in found_runs:
        m, family, seed = run.data.metrics, run.data.tags.get("family", "?"), run.data.params.get("seed", "?")
        names = sorted({k.split("/")[1] for k in m if k.startswith("source/")})
        for name in names:
            cells = []
            for split in splits:
                get = lambda key: m.get(f"source/{name}/{split}_{key}")  # noqa: E731
                cells += [f"{get(k):.4f}" if get(k) is not None else "" for k in ("acc", "balanced_acc", "ece",
                                                                                  "out_of_scope_rate")]
            table.add_row(family, seed, name, *cells)
        for split in splits:
            if f"outliers/{split}/auroc" in m:
                cells = [""] * (4 * len(splits))
                cells[4 * splits.index(split) + 3] = (f"{m[f'outliers/{split}/flagged']:.3f} "
                                                      f"(AUROC {m[f'outliers/{split}/auroc']:.3f})")
                table.add_row(family, seed, f"{split} outliers (held-out classes)", *cells)
        for name in sorted({k.split("/")[1] for k in m if k.startswith("eval/")}):
            get = lambda key: m.get(f"eval/{name}/{key}")  # noqa: E731
            cells = [""] * (4 * len(splits))
            if get("balanced_acc") is not None:
                cells[0], cells[1], cells[2] = f"{get('acc'):.4f}", f"{get('balanced_acc'):.4f}", f"{get('ece'):.4f}"
            against = "photos-dev" if val_only or get("auroc_vs_photos-dev") is not None else "test"
            auroc = get(f"auroc_vs_{against}")
            cells[3] = f"{get('out_of_scope_rate'):.3f}" + (f" (AUROC vs {against} {auroc:.3f})" if auroc else "")
            table.add_row(family, seed, f"eval: {name}", *cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="train on this folder in a fresh temporary project, then report")
    parser.add_argument("--outliers", help="out-of-scope folders for outlier exposure (pipeline train --outliers)")
    parser.add_argument("--report", type=Path, help="report the runs of an existing mlflow.db")
    parser.add_argument("--experiment", default="cifar4")
    parser.add_argument("--profile", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--models", help="comma-separated families (default: all, as `make train`)")
    parser.add_argument("--epochs", type=int, help="shorten every family to this many epochs (smoke runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--seeds", help="comma-separated training seeds: every family once per seed (--set seed=S)")
    parser.add_argument("--val-only", action="store_true",
                        help="a recipe try: report validation only and send training's output (which prints the test "
                             "split) to HOME/train.log, so that comparing tries never reads the test split")
    parser.add_argument("--home", type=Path, help="project folder for the runs (default: a new temporary one)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--json", type=Path, help="also write the table, the machine and versions to this file")
    args = parser.parse_args()
    if args.report:
        report(args.report, args.experiment, None, args.markdown, f"Runs in {args.report}", args.json, args.val_only)
        return
    if not args.data:
        parser.error("give --data DIR or --report mlflow.db")
    home = args.home or Path(tempfile.mkdtemp(prefix="budget-"))
    home.mkdir(parents=True, exist_ok=True)
    data = ",".join(absolute(part) for part in args.data.split(","))
    command = [sys.executable, "-m", "pipeline", "train", "--data", data, "--profile", args.profile]
    if args.outliers:
        command += ["--outliers", ",".join(absolute(part) for part in args.outliers.split(","))]
    if args.models:
        command += ["--models", args.models]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    for override in args.set:
        command += ["--set", override]
    env = {**os.environ, "PIPELINE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    log = open(home / "train.log", "a") if args.val_only else None
    for seed in (args.seeds.split(",") if args.seeds else [None]):
        subprocess.run(command + ([] if seed is None else ["--set", f"seed={int(seed)}"]), check=True, cwd=home,
                       env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
    report(home / "mlflow.db", args.experiment, time.perf_counter() - started, args.markdown,
           f"`pipeline train --profile {args.profile}` on {args.data}", args.json, args.val_only)


if __name__ == "__main__":
    main()
