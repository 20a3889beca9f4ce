"""``pipeline download --photos``: Tiny-ImageNet's train photos as ``photos-train/`` and ``outliers-train/``.

Writes, from the Tiny-ImageNet archive (downloaded from ``configs/photos.yaml``'s ``url``, or a local
``--archive`` zip or unpacked folder):

- ``OUT/photos-train/<label>/<wnid>_<n>.JPEG``: every train image of the classes listed per label;
- ``OUT/outliers-train/images/tin_<wnid>_<n>.JPEG``: images ``_0`` .. ``_<outliers_per_class - 1>`` of every
  other class, less ``not_outliers`` (scenes that often hold a boat or a bird);
- with ``cifar`` (CIFAR-10 through torchvision), ``cifar_<class>_<nnnn>.jpg`` of CIFAR's other classes.

The JPEG files are copied byte for byte. Licence: Tiny-ImageNet is a subset of ImageNet, whose terms allow
non-commercial research and educational use only; keep the files inside the project.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import yaml

from pipeline.config import config_dir
from pipeline.errors import DataError

TRAIN_FILE = re.compile(r"(?:^|/)train/(n\d+)/images/(n\d+_(\d+)\.JPEG)$")


def photo_settings(path: Path | None = None) -> dict:
    with open(path or config_dir() / "photos.yaml") as handle:
        return yaml.safe_load(handle)


def _archive(source: str | Path | None, url: str, work: Path) -> Path:
    """The archive or folder to read: ``source`` when given, else a download of ``url``."""
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"Tiny-ImageNet archive {str(path)!r} does not exist.")
        return path
    target = work / "tiny-imagenet-200.zip"
    try:
        urllib.request.urlretrieve(url, target)
    except Exception as error:  # URLError, HTTPError, timeouts: no network
        raise DataError(f"Could not download Tiny-ImageNet from {url} ({error}); pass --archive with a local copy "
                        "of tiny-imagenet-200.zip (or its unpacked folder).") from error
    return target


def _members(archive: Path):
    """(wnid, file name, image number, opener) of every train image in a zip or an unpacked folder."""
    if archive.is_dir():
        for path in sorted(archive.rglob("*.JPEG")):
            match = TRAIN_FILE.search(path.relative_to(archive).as_posix())
            if match:
                yield match.group(1), match.group(2), int(match.group(3)), path.open
        return
    try:
        handle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as error:
        raise DataError(f"Tiny-ImageNet archive {str(archive)!r} is not a zip file.") from error
    with handle:
        for name in sorted(handle.namelist()):
            match = TRAIN_FILE.search(name)
            if match:
                yield match.group(1), match.group(2), int(match.group(3)), (lambda n=name: handle.open(n))


def download_photos(out_dir: str | Path, archive: str | Path | None = None, settings: dict | None = None,
                    cifar: bool = True) -> dict[str, int]:
    """Write ``photos-train/`` and ``outliers-train/`` under ``out_dir``; returns the images written per set."""
    settings = settings or photo_settings()
    label_of = {wnid: label for label, wnids in settings["labels"].items() for wnid in wnids}
    skip = set(settings.get("not_outliers") or [])
    per_class = int(settings.get("outliers_per_class", 100))
    out = Path(out_dir)
    photos, outliers = out / "photos-train", out / "outliers-train" / "images"
    written = {"photos-train": 0, "outliers-train": 0}
    with tempfile.TemporaryDirectory() as work:
        for wnid, name, number, opener in _members(_archive(archive, settings["url"], Path(work))):
            if wnid in label_of:
                target = photos / label_of[wnid] / name
                written["photos-train"] += 1
            elif wnid not in skip and number < per_class:
                target = outliers / f"tin_{name}"
                written["outliers-train"] += 1
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with opener() as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
    if not written["photos-train"]:
        raise DataError(f"No Tiny-ImageNet train images of the configured classes in {archive or settings['url']}.")
    if cifar and settings.get("cifar_outliers"):
        written["outliers-train"] += _cifar_outliers(outliers, out / "raw", settings["cifar_outliers"])
    return written


def _cifar_outliers(folder: Path, raw: Path, wanted: dict) -> int:
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(root=str(raw), train=True, download=True)
    except Exception as error:
        raise DataError(f"Could not download CIFAR-10 into {str(raw)!r} ({error}); the Tiny-ImageNet part is "
                        "written, add --no-cifar to stop here.") from error
    keep = {dataset.class_to_idx[name]: name for name in wanted["classes"]}
    counters = dict.fromkeys(keep, 0)
    folder.mkdir(parents=True, exist_ok=True)
    for image, label in dataset:
        if label in keep and counters[label] < int(wanted["per_class"]):
            image.save(folder / f"cifar_{keep[label]}_{counters[label]:04d}.jpg", quality=95)
            counters[label] += 1
    return sum(counters.values())
