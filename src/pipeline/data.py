"""Image folders -> uint8 tensors -> batches augmented on the training device.

A folder ``DIR/<class>/*.jpg|png`` is decoded once (cached on disk, keyed by a fingerprint
of the file list) into a ``(N, 3, H, W)`` uint8 tensor. Training batches are sliced from
that tensor with ``randperm``, then cropped and flipped a whole batch at a time on the
device: no per-sample PIL work in the training loop.

A run may take several labelled folders (``--data A,B`` or ``data.sources``), each split on its own
(seeded, stratified), so every split holds every source and every figure can be given per source;
and unlabelled folders of out-of-scope images (``data.outliers``) for outlier exposure, held out
**by class** (a seeded share of the outlier classes never trained on) for the validation and test
outliers.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch
from rich.progress import Progress

from pipeline.config import DataSettings, check_section, choices
from pipeline.errors import DataError
from pipeline.runtime.imaging import IMAGE_SUFFIXES, ImageDecodeError, decode_image

CACHE_VERSION = 1
BAD_IMAGE_MODES = choices(DataSettings, "on_bad_image")
MAX_BAD_FRACTION = 0.01  # with on_bad_image=skip, more unreadable files than this still stop training


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    fingerprint: str
    root: str
    skipped: list[str] = field(default_factory=list)  # files that did not decode (on_bad_image=skip)


def resolve_data_dir(root: str | Path) -> tuple[Path, Optional[Path]]:
    """Return (train folder, test folder or None) for DIR or DIR/{train,test}."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"Data folder {str(path)!r} does not exist.")
    if not path.is_dir():
        raise DataError(f"Data folder {str(path)!r} is not a folder.")
    if (path / "train").is_dir():
        test = path / "test"
        return path / "train", test if test.is_dir() else None
    return path, None


@dataclass
class Source:
    """One labelled training folder of a run and its sampling weight (images of it per epoch, x its size)."""
    path: str
    weight: float = 1.0
    name: str = ""
    exclude: tuple[str, ...] = ()  # file-name patterns left out of every split (leave-one-species-out checks)


def parse_sources(data: str | list | tuple) -> list[Source]:
    """``--data A,B`` (``A:2`` gives A the sampling weight 2) or ``data.sources`` (paths, or
    ``{path: ..., weight: ...}``) -> sources named after their folders (``DIR`` for ``DIR/train``)."""
    items: list = [part for part in data.split(",") if part.strip()] if isinstance(data, str) else list(data)
    sources: list[Source] = []
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {"path", "weight", "name", "exclude"}
            if "path" not in item or unknown:
                raise DataError(f"A data.sources entry is a folder or {{path: folder, weight: number, exclude: "
                                f"[file-name patterns]}}, got {item!r}.")
            exclude = item.get("exclude") or ()
            source = Source(str(item["path"]), float(item.get("weight", 1.0)), str(item.get("name", "")),
                            (exclude,) if isinstance(exclude, str) else tuple(str(x) for x in exclude))
        else:
            text, weight = str(item).strip(), 1.0
            head, _, tail = text.rpartition(":")
            if head:
                try:
                    text, weight = head, float(tail)
                except ValueError:
                    pass
            source = Source(text, weight)
        if not source.weight > 0:
            raise DataError(f"Data source {source.path!r} has weight {source.weight}; a weight must be above 0.")
        sources.append(source)
    if not sources:
        raise DataError("No data folder given: pass --data DIR (or DIR1,DIR2) or set data.sources.")
    seen: dict[str, int] = {}
    for source in sources:
        if not source.name:
            path = Path(source.path).expanduser().resolve()
            source.name = path.parent.name if path.name in ("train", "images") else path.name
        seen[source.name] = seen.get(source.name, 0) + 1
        if seen[source.name] > 1:
            source.name = f"{source.name}-{seen[source.name]}"
    return sources


def check_data_folders(data: str | list | tuple) -> list[Source]:
    """Fail early, naming the folder, when any source of ``--data`` is missing or not a folder."""
    sources = parse_sources(data)
    for source in sources:
        resolve_data_dir(source.path)
    return sources


def weighted_order(source_ids: torch.Tensor, weights: list[float], generator: torch.Generator) -> torch.Tensor:
    """One epoch's shuffled indices when sources have sampling weights: each source's images ``weight`` times
    (the whole part as repeats, the rest as a seeded sample), then everything shuffled together."""
    parts = []
    for source, weight in enumerate(weights):
        members = torch.nonzero(source_ids == source).flatten()
        parts += [members] * int(weight)
        extra = int(round((weight - int(weight)) * len(members)))
        if extra:
            parts.append(members[torch.randperm(len(members), generator=generator)[:extra]])
    pool = torch.cat(parts)
    return pool[torch.randperm(len(pool), generator=generator)]


def hold_out_classes(n_classes: int, share: float, seed: int, test_seed: int) -> tuple[set[int], set[int]]:
    """(validation classes, test classes) of the outliers: a seeded ``share`` of the classes, half each, never
    trained on. The test classes are drawn first, with the test split's own seed."""
    n_hold = max(2, int(round(share * n_classes)))
    order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(test_seed)).tolist()
    n_test = n_hold - n_hold // 2
    test, rest = order[:n_test], order[n_test:]
    rest = [rest[i] for i in torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()]
    return set(rest[: n_hold // 2]), set(test)


def cap_per_class(chosen: torch.Tensor, groups: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """``chosen`` (a mask) with at most ``cap`` images of each class left, a seeded sample (0: all kept)."""
    if cap <= 0:
        return chosen
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))
    kept = torch.zeros_like(chosen)
    for group in groups[chosen].unique().tolist():
        members = order[chosen[order] & (groups[order] == group)]
        kept[members[:cap]] = True
    return kept


def scan_image_folder(root: str | Path, exclude: tuple[str, ...] = (),
                      min_classes: int = 2) -> tuple[list[str], list[tuple[Path, int]]]:
    """List ``(file, class index)`` pairs; class names are the sorted subfolder names. Files whose name
    matches a pattern of ``exclude`` (``fnmatch``, e.g. ``n01855672_*``) are left out."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} does not exist.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < min_classes:
        raise DataError(
            f"Data folder {str(root)!r} has {len(classes)} class folder(s); "
            f"it needs at least {min_classes} subfolders, one per class, each holding images."
        )
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in exclude)
        )
        if not found:
            raise DataError(
                f"Class folder {str(root / name)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})."
            )
        files += [(p, index) for p in found]
    return classes, files


def fingerprint_files(files: list[tuple[Path, int]], root: Path, size: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{size}".encode())
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{label}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE_DIR", Path.home() / ".cache" / "pipeline"))


def _decode_cached(files: list[tuple[Path, int]], root: Path, size: int, cache_dir: str | Path | None,
                   on_bad_image: str) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, str], str]:
    """Decode ``(file, label)`` pairs into uint8 images, through the on-disk cache keyed by their fingerprint."""
    if on_bad_image not in BAD_IMAGE_MODES:
        raise DataError(f"data.on_bad_image must be error or skip, got {on_bad_image!r}.")
    fingerprint = fingerprint_files(files, root, size)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = cache / f"images-{fingerprint}.npz"
    if cached.exists():
        with np.load(cached) as stored:
            images, labels = stored["images"], stored["labels"]
            skipped = [str(name) for name in stored["skipped"]] if "skipped" in stored else []
        return images, labels, skipped, {}, fingerprint  # the reasons are not cached; the names are
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    keep = np.ones(len(files), dtype=bool)
    errors: dict[str, str] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task(f"Decoding {len(files):,} images", total=len(files))
        for i, (path, _) in enumerate(files):
            try:
                images[i] = decode_image(path, size)
            except ImageDecodeError as error:
                if on_bad_image == "error":
                    raise DataError(
                        f"Image {str(path)!r} could not be decoded: {error} "
                        "(--set data.on_bad_image=skip leaves unreadable files out)."
                    ) from error
                keep[i] = False
                errors[str(path.relative_to(root))] = str(error)
            if i % 256 == 0:
                progress.update(task, completed=i)
    labels = np.array([label for _, label in files], dtype=np.int64)[keep]
    images = images[keep] if errors else images
    skipped = list(errors)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"images-{fingerprint}.{os.getpid()}.tmp.npz"
    np.savez(partial, images=images, labels=labels, skipped=np.array(skipped, dtype=str))
    partial.replace(cached)  # atomic: a killed run never leaves a half-written cache
    return images, labels, skipped, errors, fingerprint


def _report_skipped(root: Path, skipped: list[str], total: int, errors: dict[str, str], on_bad_image: str) -> None:
    if not skipped:
        return
    if on_bad_image == "error":
        raise DataError(
            f"Image {str(root / skipped[0])!r} could not be decoded ({len(skipped)} file(s) in "
            f"{str(root)!r} do not decode; --set data.on_bad_image=skip leaves them out)."
        )
    _check_bad_fraction(root, skipped, total, errors)
    shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    print(f"note: skipped {len(skipped)} of {total:,} images in {root} that do not decode: {shown}"
          + (f" (first error: {next(iter(errors.values()))})" if errors else ""))


def load_image_folder(root: str | Path, size: int = DataSettings.image_size, cache_dir: str | Path | None = None,
                      on_bad_image: str = DataSettings.on_bad_image, exclude: tuple[str, ...] = (),
                      min_classes: int = 2) -> ImageSet:
    """Decode every image of an ImageFolder-shaped directory, using the cache when it matches.

    ``on_bad_image="error"`` stops at the first file that does not decode, naming it; ``"skip"``
    leaves such files out (``ImageSet.skipped`` names them) unless more than 1% of the files fail.
    """
    if on_bad_image not in BAD_IMAGE_MODES:
        raise DataError(f"data.on_bad_image must be error or skip, got {on_bad_image!r}.")
    root = Path(root)
    classes, files = scan_image_folder(root, exclude, min_classes)
    images, labels, skipped, errors, fingerprint = _decode_cached(files, root, size, cache_dir, on_bad_image)
    _report_skipped(root, skipped, len(files), errors, on_bad_image)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes, fingerprint, str(root), skipped)


_NUMBERED = re.compile(r"^(.*?)[_-]?\d+$")


def outlier_group(relative: Path, by_folder: bool = True) -> str:
    """The class an out-of-scope file belongs to, for holding outliers out by class: its subfolder when the
    files are in several (``by_folder``), else its name less a trailing number (``tin_n01443537_12.JPEG`` ->
    ``tin_n01443537``, ``cifar_airplane_0001.jpg`` -> ``cifar_airplane``)."""
    if by_folder and len(relative.parts) > 1:
        return str(relative.parent)
    match = _NUMBERED.match(relative.stem)
    return match.group(1) if match and match.group(1) else relative.stem


def load_outlier_folder(root: str | Path, size: int = DataSettings.image_size, cache_dir: str | Path | None = None,
                        on_bad_image: str = DataSettings.on_bad_image) -> ImageSet:
    """Decode every image under an unlabelled folder of out-of-scope images (any depth, or ``images/``).

    ``labels`` index ``classes``, the outlier classes found by :func:`outlier_group`: they are what the
    validation and test outliers are held out by, never training targets.
    """
    from pipeline.predict import find_images

    root = Path(root).expanduser()
    found = find_images(root, "Outlier folder")
    by_folder = len({p.parent for p in found}) > 1  # one folder (outliers-train/images/): classes from the names
    groups = [outlier_group(p.relative_to(root), by_folder) for p in found]
    classes = sorted(set(groups))
    index = {name: i for i, name in enumerate(classes)}
    files = [(p, index[g]) for p, g in zip(found, groups)]
    images, labels, skipped, errors, fingerprint = _decode_cached(files, root, size, cache_dir, on_bad_image)
    _report_skipped(root, skipped, len(files), errors, on_bad_image)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes, fingerprint, str(root), skipped)


def _check_bad_fraction(root: Path, skipped: list[str], total: int, errors: dict[str, str]) -> None:
    if len(skipped) > MAX_BAD_FRACTION * total:
        first = skipped[0] + (f" ({errors[skipped[0]]})" if skipped[0] in errors else "")
        raise DataError(
            f"{len(skipped)} of {total:,} images in {str(root)!r} do not decode, more than "
            f"{MAX_BAD_FRACTION:.0%}: the folder looks damaged, so training stops (first: {first})."
        )


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, stratified train/val split: every class keeps images on both sides."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(1, int(round(len(members) * val_fraction))), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    flat = images.permute(1, 0, 2, 3).reshape(images.shape[1], -1).double() / 255.0
    return flat.mean(1).tolist(), flat.std(1).tolist()


FLIP_MODES = choices(DataSettings, "flip")


def cutout_batch(images: torch.Tensor, size: int, fill: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): a ``size`` x ``size`` square per image, at a random centre, set to ``fill``
    (the mean colour: zero after normalization). Squares may hang over the edge, as in the paper."""
    n, _, h, w = images.shape
    top = torch.randint(0, h, (n, 1, 1), device=images.device, generator=generator) - size // 2
    left = torch.randint(0, w, (n, 1, 1), device=images.device, generator=generator) - size // 2
    rows = torch.arange(h, device=images.device)[None, :, None]
    cols = torch.arange(w, device=images.device)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return torch.where(inside[:, None], fill.view(1, -1, 1, 1).to(images.dtype), images)


def augment_batch(images: torch.Tensor, padding: int = DataSettings.crop_padding, flip: bool = DataSettings.flip,
                  pad_mode: str = DataSettings.pad_mode,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop (zero or reflect padding) and random horizontal flip for a whole (N, C, H, W) batch."""
    n, _, h, w = images.shape
    if flip:
        flipped = torch.rand(n, device=images.device, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4, mode=pad_mode)
        dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
        rows = (torch.arange(h, device=images.device)[None, :] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=images.device)[None, :] + dx[:, None])[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, channels, rows, cols]
    return images


def zoom_batch(images: torch.Tensor, min_area: float, max_aspect: float = 4 / 3,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random-resized crops of a whole batch: each image is cut to a random box of ``min_area``..1 of its area
    and aspect ``1/max_aspect``..``max_aspect``, anywhere inside it, and scaled back to its size (bilinear).

    Photographs frame their subject more loosely or tightly than CIFAR's crops and arrive through another
    resize; this teaches the net those scales (see docs/trust.md for what it bought on photographs).
    """
    n, _, h, w = images.shape
    device = images.device
    area = min_area + (1.0 - min_area) * torch.rand(n, device=device, generator=generator)
    log_aspect = (torch.rand(n, device=device, generator=generator) * 2 - 1) * float(np.log(max_aspect))
    aspect = torch.exp(log_aspect)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)  # box width and height as fractions of the image
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    tx = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - sy)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                                           align_corners=False)


def color_jitter_batch(images: torch.Tensor, strength: float,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a random factor in 1 +/- ``strength`` per image
    (images in [0, 1]): cameras and lighting differ more than CIFAR's photographs show."""
    n = images.shape[0]

    def factor() -> torch.Tensor:
        return 1.0 + (torch.rand(n, 1, 1, 1, device=images.device, generator=generator) * 2 - 1) * strength

    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    images = images * factor()
    grey = (images * weights).sum(1, keepdim=True)
    images = grey + (images - grey) * factor()
    mean = grey.mean(dim=(2, 3), keepdim=True)
    images = mean + (images - mean) * factor()
    return images.clamp(0.0, 1.0)


def alternating_flip_mask(n: int, seed: int) -> torch.Tensor:
    """airbench's alternating flip: a seeded random half of the images is mirrored in epoch 0, the other
    half in epoch 1, and so on, so every image is seen both ways in any two epochs."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + 7)) < 0.5


class TensorBatches:
    """Batches sliced from in-memory tensors, reshuffled each epoch, sharded across DDP ranks.

    Training (``shuffle``, ``drop_last``): every rank gets the same number of full batches of
    ``batch_size`` (the per-rank size). Evaluation: each rank gets every world_size-th image,
    no padding, so no image is counted twice.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = DataSettings.seed,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        flip_mask: Optional[torch.Tensor] = None,
        source_ids: Optional[torch.Tensor] = None,
        source_weights: Optional[list[float]] = None,
    ) -> None:
        self.images, self.labels = images, labels
        weighted = source_weights is not None and any(w != 1.0 for w in source_weights)
        self.source_ids = source_ids.cpu() if weighted and source_ids is not None else None
        self.source_weights = source_weights
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.flip_mask = None if flip_mask is None else flip_mask.to(images.device)
        self.epoch = 0

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle and self.source_ids is not None:
            order = weighted_order(self.source_ids, self.source_weights,
                                   torch.Generator().manual_seed(self.seed + self.epoch))
            n = len(order)
        elif self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = (n // self.world_size) * self.world_size if self.drop_last else n
            order = order[self.rank : total : self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices().to(self.images.device)
        self.epoch += 1
        odd_epoch = self.epoch % 2 == 0  # self.epoch was just advanced: the current epoch is self.epoch - 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if self.flip_mask is not None:
                flip = self.flip_mask[index] ^ odd_epoch
                images = torch.where(flip[:, None, None, None], images.flip(3), images)
            yield images, self.labels[index]


class OutlierBatches:
    """Training batches with ``per_batch`` outliers appended to each, labelled -1 (outlier exposure).

    The outliers are drawn without repeats until all were seen, reshuffled each pass (seeded by epoch
    and rank), so a step's share of outliers costs the same every epoch.
    """

    def __init__(self, batches: TensorBatches, outliers: torch.Tensor, per_batch: int, seed: int, rank: int = 0):
        self.batches, self.outliers, self.per_batch = batches, outliers, per_batch
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.batches.epoch * 31 + self.rank)
        n = len(self.outliers)
        order, used = torch.randperm(n, generator=generator), 0
        for images, labels in self.batches:
            if used + self.per_batch > n:
                order, used = torch.randperm(n, generator=generator), 0
            index = order[used : used + self.per_batch].to(self.outliers.device)
            used += self.per_batch
            extra = self.outliers[index]
            yield (torch.cat([images, extra]),
                   torch.cat([labels, torch.full((len(extra),), -1, dtype=labels.dtype, device=labels.device)]))


class ImageFolderDataModule(L.LightningDataModule):
    """Train/val/test splits of one or more labelled image folders, and outliers, as uint8 tensors.

    ``data_dir`` is a folder, or several joined by commas (``A,B``; ``A:2`` weights A); without it,
    ``sources`` (``data.sources``). Each source is split on its own: without a ``test/`` folder,
    ``test_fraction`` of its images is held out first (seeded, stratified): no training step, checkpoint
    choice or champion choice ever sees them. ``val_fraction`` of the rest is its validation split.
    ``train_source``/``val_source``/``test_source`` say which source each image came from.
    ``outliers`` are unlabelled folders of out-of-scope images: ``outlier_holdout`` of their classes is
    held out (half validation, half test outliers), and each training step appends ``outlier_share`` x its
    batch of the others, labelled -1 (0: outliers only scored, never trained on).
    ``batch_size`` is the global batch: each DDP rank takes ``batch_size / world_size``.
    """

    def __init__(self, data_dir: str = "", settings: Optional[DataSettings] = None, **keys: Any) -> None:
        """``settings`` is the run's ``data:`` section; ``keys`` replace some of its keys (tests, benches)."""
        super().__init__()
        self.settings = check_section(replace(settings or DataSettings(), **keys), "data")
        s = self.settings
        self.data_dir = data_dir or ",".join(str(x["path"] if isinstance(x, dict) else x) for x in s.sources)
        self.sources = parse_sources(data_dir if data_dir else s.sources)
        self.outlier_dirs = [str(o) for o in s.outliers]
        self.skipped: list[str] = []
        self.augment_generator: Optional[torch.Generator] = None
        self._prepared = False

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    def prepare(self) -> None:
        """Decode (or load from cache) and split; safe to call more than once."""
        if self._prepared:
            return
        parts: dict[str, list] = {split: [] for split in ("train", "val", "test")}
        fingerprints, self.classes, self.test_from_folder, self.source_fingerprints = [], None, [], []
        for index, source in enumerate(self.sources):
            split = self._split_source(index, source)
            self.source_fingerprints.append(split["fingerprint"])
            fingerprints.append(f"{split['fingerprint']}:{source.weight}")
            for name in parts:
                if split[name] is not None:
                    parts[name].append(split[name])
        for name, found in parts.items():
            images = torch.cat([f[0] for f in found]) if found else None
            labels = torch.cat([f[1] for f in found]) if found else None
            ids = torch.cat([f[2] for f in found]) if found else None
            setattr(self, f"{name}_images", images)
            setattr(self, f"{name}_labels", labels)
            setattr(self, f"{name}_source", ids)
        self.mean, self.std = channel_stats(self.train_images)
        fingerprints += self._prepare_outliers()
        self.fingerprint = (fingerprints[0].split(":")[0] if len(fingerprints) == 1 and self.sources[0].weight == 1.0
                            else hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:16])
        self._prepared = True

    def _split_source(self, index: int, source: Source) -> dict:
        """One source's train/val/test images, labels and source ids."""
        train_dir, test_dir = resolve_data_dir(source.path)
        full = load_image_folder(train_dir, self.settings.image_size, self.settings.cache_dir, self.settings.on_bad_image,
                                 source.exclude)
        self.skipped += [f"{source.name}/{name}" if len(self.sources) > 1 else name for name in full.skipped]
        if self.classes is None:
            self.classes = full.classes
        elif full.classes != self.classes:
            raise DataError(f"Data folder {str(train_dir)!r} has classes {full.classes}, but "
                            f"{self.sources[0].path!r} has {self.classes}: every source needs the same class folders.")
        hold_test = test_dir is None and self.settings.test_fraction > 0
        needed = 3 if hold_test else 2
        counts = torch.bincount(full.labels, minlength=len(full.classes))
        for name, count in zip(full.classes, counts.tolist()):
            if count < needed:
                raise DataError(
                    f"Class {name!r} in {str(train_dir)!r} has {count} image(s); it needs at least {needed} "
                    f"(one each for training, validation{' and test' if hold_test else ''})."
                )

        def tagged(images, labels):
            return images, labels, torch.full((len(labels),), index, dtype=torch.int64)

        out = {"fingerprint": full.fingerprint, "test": None}
        pool = torch.arange(len(full.labels))
        if hold_test:
            # The test split is drawn first, with its own seed, so val_fraction never moves it, and a new
            # test_seed draws a fresh test split without touching anything else of the config.
            pool, test_idx = split_indices(full.labels, self.settings.test_fraction, self.settings.test_seed)
            out["test"] = tagged(full.images[test_idx], full.labels[test_idx])
        train_rel, val_rel = split_indices(full.labels[pool], self.settings.val_fraction, self.settings.seed)
        out["train"] = tagged(full.images[pool[train_rel]], full.labels[pool[train_rel]])
        out["val"] = tagged(full.images[pool[val_rel]], full.labels[pool[val_rel]])
        if test_dir is not None:
            test = load_image_folder(test_dir, self.settings.image_size, self.settings.cache_dir, self.settings.on_bad_image)
            self.skipped += [f"test/{name}" for name in test.skipped]
            if test.classes != self.classes:
                raise DataError(
                    f"Test folder {str(test_dir)!r} has classes {test.classes}, "
                    f"but the training folder has {self.classes}."
                )
            out["test"] = tagged(test.images, test.labels)
        self.test_from_folder.append(test_dir is not None)
        return out

    def _prepare_outliers(self) -> list[str]:
        """Load the outlier folders; hold out a seeded share of their classes as validation and test outliers."""
        self.outlier_classes: list[str] = []
        self.outlier_fingerprint = ""
        self.outlier_train = self.outlier_val = self.outlier_test = None
        if not self.outlier_dirs:
            return []
        images, groups, fingerprints = [], [], []
        for folder in self.outlier_dirs:
            found = load_outlier_folder(folder, self.settings.image_size, self.settings.cache_dir, self.settings.on_bad_image)
            prefix = f"{Path(folder).name}/" if len(self.outlier_dirs) > 1 else ""
            groups.append(found.labels + len(self.outlier_classes))
            self.outlier_classes += [prefix + name for name in found.classes]
            images.append(found.images)
            fingerprints.append(found.fingerprint)
            self.skipped += [f"outliers/{name}" for name in found.skipped]
        images, groups = torch.cat(images), torch.cat(groups)
        self.outlier_fingerprint = hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:16]
        cap = self.settings.outlier_holdout_images
        if len(self.outlier_classes) >= 3:
            val_classes, test_classes = hold_out_classes(len(self.outlier_classes), self.settings.outlier_holdout,
                                                         self.settings.seed, self.settings.test_seed)
            val = torch.isin(groups, torch.tensor(sorted(val_classes)))
            test = torch.isin(groups, torch.tensor(sorted(test_classes)))
            train = ~(val | test)  # a held-out class's images past the cap are neither trained on nor scored
            val, test = cap_per_class(val, groups, cap, self.settings.seed), cap_per_class(test, groups, cap,
                                                                                         self.settings.test_seed)
        else:  # one or two classes (file names without a class): held out by image, and said so
            print(f"note: the outliers in {', '.join(self.outlier_dirs)} show {len(self.outlier_classes)} class(es), "
                  "so their validation and test outliers are held out by image, not by class")
            order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(self.settings.test_seed))
            n = max(1, int(round(self.settings.outlier_holdout / 2 * len(groups))))
            val, test = torch.zeros(len(groups), dtype=torch.bool), torch.zeros(len(groups), dtype=torch.bool)
            test[order[:n]], val[order[n : 2 * n]] = True, True
            train = ~(val | test)
        self.outlier_train_groups = groups[train]
        self.outlier_train, self.outlier_val, self.outlier_test = images[train], images[val], images[test]
        if len(self.outlier_train) == 0 or len(self.outlier_val) == 0 or len(self.outlier_test) == 0:
            raise DataError(f"Outlier folder(s) {', '.join(self.outlier_dirs)} hold {len(groups)} image(s): too few "
                            "for training, validation and test outliers.")
        return [f"outliers:{f}:{self.settings.outlier_share}:{self.settings.outlier_holdout}:{cap}"
                for f in fingerprints]

    def summary(self) -> dict:
        self.prepare()
        return {
            "data_dir": str(self.data_dir),
            "fingerprint": self.fingerprint,
            "classes": self.classes,
            "sources": self.source_names,
            "train_size": len(self.train_labels),
            "val_size": len(self.val_labels),
            "test_size": 0 if self.test_labels is None else len(self.test_labels),
            "test_source": "none" if self.test_labels is None else ("test/ folder" if all(self.test_from_folder)
                                                                    else f"{self.settings.test_fraction:.0%} held out"),
            "mean": self.mean,
            "std": self.std,
            "skipped_images": len(self.skipped),
            "outliers": {split: 0 if images is None else len(images) for split, images in
                         (("train", self.outlier_train), ("val", self.outlier_val), ("test", self.outlier_test))},
        }

    def split_counts(self, source: Optional[int] = None) -> dict[str, dict[str, int]]:
        """Images per class in each split (of one source, or all), for the MLflow dataset inputs."""
        self.prepare()

        def counts(labels, ids) -> dict[str, int]:
            if labels is None:
                return {}
            labels = labels.cpu() if source is None else labels.cpu()[ids.cpu() == source]
            found = torch.bincount(labels, minlength=len(self.classes)).tolist()
            return dict(zip(self.classes, found))

        return {"training": counts(self.train_labels, self.train_source),
                "validation": counts(self.val_labels, self.val_source),
                "test": counts(self.test_labels, self.test_source)}

    def has_test_folder(self) -> bool:
        return all(resolve_data_dir(source.path)[1] is not None for source in self.sources)

    def rank_batch_size(self) -> int:
        """This rank's share of the global batch, capped so that the smallest data set still has one batch."""
        rank, world = self._rank()
        per_rank_images = len(self.train_labels) // world
        size = max(1, min(self.settings.batch_size // world, per_rank_images))
        if size * world != self.settings.batch_size and rank == 0 and not getattr(self, "_warned_batch", False):
            self._warned_batch = True
            print(f"note: global batch {self.settings.batch_size} over {world} rank(s) with {len(self.train_labels):,} "
                  f"training images: {size} per rank ({size * world} in all)")
        return size

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        rank, _ = self._rank()
        # Each rank draws its own crops and flips (the same seed everywhere would repeat them).
        self.augment_generator = torch.Generator(device=device).manual_seed(self.settings.seed * 1000 + rank)
        if device.type == "cuda":
            # Device-resident data: 18k CIFAR images are 55 MB, batches never cross PCIe.
            for name in ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels",
                         "outlier_train"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(device, non_blocking=True))

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> TensorBatches:
        rank, world = self._rank()
        flip_mask = alternating_flip_mask(len(self.train_labels), self.settings.seed) if self.settings.flip == "alternate" else None
        batches = TensorBatches(
            self.train_images, self.train_labels, self.rank_batch_size(), shuffle=True,
            seed=self.settings.seed, drop_last=True, rank=rank, world_size=world, flip_mask=flip_mask,
            source_ids=self.train_source, source_weights=[source.weight for source in self.sources],
        )
        # A resumed run continues the shuffle order where the interrupted one was.
        batches.epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self.outlier_train is not None and self.settings.outlier_share > 0:
            per_batch = max(1, int(round(self.settings.outlier_share * batches.batch_size)))
            return OutlierBatches(batches, self.outlier_train, per_batch, self.settings.seed, rank)
        return batches

    def val_dataloader(self) -> TensorBatches:
        rank, world = self._rank()
        return TensorBatches(self.val_images, self.val_labels, self.settings.eval_batch_size, False, rank=rank, world_size=world)

    def test_dataloader(self) -> TensorBatches:
        if self.test_images is None:
            raise DataError(f"Data folder {str(self.data_dir)!r} has no test/ split.")
        rank, world = self._rank()
        return TensorBatches(self.test_images, self.test_labels, self.settings.eval_batch_size, False, rank=rank, world_size=world)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        images = images.float().div_(255.0)
        if self.trainer is not None and self.trainer.training:
            if self.settings.zoom:
                images = zoom_batch(images, self.settings.zoom, generator=self.augment_generator)
            images = augment_batch(images, self.settings.crop_padding, self.settings.flip is True, self.settings.pad_mode, self.augment_generator)
            if self.settings.color_jitter:
                images = color_jitter_batch(images, self.settings.color_jitter, self.augment_generator)
            if self.settings.cutout:
                fill = torch.tensor(self.mean, device=images.device)
                images = cutout_batch(images, self.settings.cutout, fill, self.augment_generator)
        return images.contiguous(memory_format=torch.channels_last), labels

