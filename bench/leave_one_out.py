"""Leave-one-species-out: does a photographed bird of a species never trained on stay a bird?

    .venv/bin/python bench/leave_one_out.py --photos ../shared/data/photos-train \
        --data ../shared/data/cifar4/train --outliers ../shared/data/outliers-train --models resnet
    .venv/bin/python bench/leave_one_out.py ... --species n01855672,n02123394 --seeds 1,2

``photos-train`` names its files ``<wnid>_<n>.JPEG``. For each species (default: one per class, the
first wnid of each class folder; ``--species all`` takes all of them), a run trains on the other sources
and on the photos less that species (``data.sources`` entry with ``exclude: [<wnid>_*]``, left out of
every split), then scores the left-out photos as a labelled evaluation folder: their accuracy and the
share flagged out of scope. Nothing here reads photos-dev, other-dev or a test split for a choice: the
runs print validation figures, and the left-out species were never trained on in their run.

Each run goes to its own project folder under ``--home`` (default: a new temporary folder). Prints one
row per species and seed, then the mean per class, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from train_budget import machine  # noqa: E402


def species_of(photos: Path) -> dict[str, str]:
    """wnid -> class folder, from the ``<wnid>_<n>`` file names of an ImageFolder of photos."""
    found: dict[str, str] = {}
    for folder in sorted(p for p in photos.iterdir() if p.is_dir()):
        for file in sorted(folder.iterdir()):
            wnid = file.name.split("_", 1)[0]
            if wnid != file.name:
                found.setdefault(wnid, folder.name)
    if not found:
        raise SystemExit(f"{photos} has no files named <species>_<n>: nothing to leave out.")
    return found


def held_out_folder(photos: Path, wnid: str, label: str, where: Path) -> Path:
    """A labelled evaluation folder of links to one species' photos."""
    folder = where / label
    folder.mkdir(parents=True, exist_ok=True)
    for file in sorted((photos / label).glob(f"{wnid}_*")):
        link = folder / file.name
        if not link.exists():
            link.symlink_to(file.resolve())
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="the photo source whose species are left out")
    parser.add_argument("--data", default="", help="the other training sources, comma-separated")
    parser.add_argument("--outliers", help="out-of-scope folder for outlier exposure")
    parser.add_argument("--models", default="resnet", help="families to train (comma-separated)")
    parser.add_argument("--species", default="", help="wnids, comma-separated, or 'all' (default: one per class)")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds")
    parser.add_argument("--profile", default="auto", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--epochs", type=int, help="shorten every run to this many epochs (smoke runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--home", type=Path, help="folder for the runs' projects (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    photos = args.photos.expanduser().resolve()
    every = species_of(photos)
    if args.species == "all":
        chosen = list(every)
    elif args.species:
        chosen = [s.strip() for s in args.species.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in every]
        if unknown:
            raise SystemExit(f"{photos} has no species {unknown[0]} (it has {', '.join(every)}).")
    else:
        chosen = list({label: wnid for wnid, label in reversed(list(every.items()))}.values())
    home = (args.home or Path(tempfile.mkdtemp(prefix="leave-one-out-"))).resolve()
    others = [str(Path(p).expanduser().resolve()) for p in args.data.split(",") if p.strip()]
    console = Console(width=140)
    results = []
    for wnid in chosen:
        for seed in [int(s) for s in args.seeds.split(",")]:
            project = home / f"{wnid}-seed{seed}"
            project.mkdir(parents=True, exist_ok=True)
            label = every[wnid]
            held = held_out_folder(photos, wnid, label, project / "held-out")
            sources = json.dumps([*others, {"path": str(photos), "exclude": [f"{wnid}_*"]}])
            command = [sys.executable, "-m", "pipeline", "train", "--models", args.models, "--profile", args.profile,
                       "--set", f"data.sources={sources}", "--set", f"seed={seed}",
                       "--set", f"evaluation.folders.held-out={held}"]
            command += ["--outliers", str(Path(args.outliers).expanduser().resolve())] if args.outliers else []
            command += ["--epochs", str(args.epochs)] if args.epochs else []
            for override in args.set:
                command += ["--set", override]
            started = time.perf_counter()
            with open(project / "train.log", "w") as log:  # the log also prints the test split: not read here
                subprocess.run(command, check=True, cwd=project, env={**os.environ, "PIPELINE_HOME": str(project)},
                               stdout=log, stderr=subprocess.STDOUT)
            client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
            for run in client.search_runs([client.get_experiment_by_name("cifar4").experiment_id]):
                m = run.data.metrics
                results.append({"species": wnid, "class": label, "seed": seed, "family": run.data.tags["family"],
                                "images": len(list((held / label).iterdir())),
                                "acc": m.get("eval/held-out/acc"), "flagged": m.get("eval/held-out/out_of_scope_rate"),
                                "val acc (mean over sources)": m.get("val_acc_source_mean"),
                                "minutes": (time.perf_counter() - started) / 60})
            console.print(f"{wnid} ({label}), seed {seed}: done in {(time.perf_counter() - started) / 60:.1f} min")

    table = Table(title="Leave-one-species-out: accuracy on photos of a species left out of training")
    for column in ("species", "class", "seed", "family", "images", "acc", "flagged", "val acc (mean over sources)"):
        table.add_column(column, justify="left" if column in ("species", "class", "family") else "right")
    for row in results:
        table.add_row(row["species"], row["class"], str(row["seed"]), row["family"], str(row["images"]),
                      f"{row['acc']:.3f}", f"{row['flagged']:.3f}", f"{row['val acc (mean over sources)']:.4f}")
    console.print(table)
    for family in dict.fromkeys(r["family"] for r in results):
        for label in dict.fromkeys(r["class"] for r in results):
            accs = [r["acc"] for r in results if r["family"] == family and r["class"] == label]
            console.print(f"{family} {label}: mean accuracy on left-out species {statistics.mean(accs):.3f} "
                          f"over {len(accs)} run(s)")
    console.print(machine())
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
