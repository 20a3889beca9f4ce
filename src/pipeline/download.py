"""Fetch CIFAR-10 with torchvision and write four classes as an image folder.

Writes ``OUT/{train,test}/{bird,boat,cat,dog}/NNNNN.png`` (CIFAR's "ship" renamed "boat").
Needs a network; everything else in the project runs on any local folder of that shape.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import track

from pipeline.data import DataError

CIFAR4 = {"bird": "bird", "cat": "cat", "dog": "dog", "ship": "boat"}


def download_cifar4(out_dir: str | Path, raw_dir: str | Path | None = None) -> Path:
    from torchvision.datasets import CIFAR10

    out = Path(out_dir)
    raw = Path(raw_dir) if raw_dir else out / "raw"
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = CIFAR10(root=str(raw), train=train, download=True)
        except Exception as error:  # torchvision raises URLError, RuntimeError, ... on no network
            raise DataError(
                f"Could not download CIFAR-10 into {str(raw)!r} ({error}); "
                "pass --data with a local folder of class subfolders instead."
            ) from error
        wanted = {dataset.class_to_idx[name]: renamed for name, renamed in CIFAR4.items()}
        for renamed in wanted.values():
            (out / split / renamed).mkdir(parents=True, exist_ok=True)
        counters = dict.fromkeys(wanted, 0)
        for image, label in track(dataset, description=f"Writing CIFAR-4 {split}", total=len(dataset)):
            if label in wanted:
                image.save(out / split / wanted[label] / f"{counters[label]:05d}.png")
                counters[label] += 1
    return out
